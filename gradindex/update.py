"""Changing a built index without a rebuild: ``add`` rows (the index's own factors and compression),
``remove`` rows (tombstones: never in any answer again) and ``compact`` (rewrite without them).

Each writes the next generation beside the current one and its manifest last (``store``), under the
writer lock: a reader keeps answering from the generation it opened, and a killed update re-run with
the same arguments ends exactly as an uninterrupted one (an ``add`` records what it appends first).
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from tqdm.auto import tqdm

from . import ann, store
from .builder import publish
from .compress import Compressor
from .corpus import describe_data, load_texts, texts_fingerprint
from .data import DEFAULT_TOKEN_BUDGET, TokenizedSet, tokenize_texts
from .documents import Rows, split_documents
from .errors import GradIndexError
from .factors import Factors
from .files import writer_lock
from .lexical import Lexical
from .manifest import Addition, Manifest
from .model import LanguageModel
from .reader import ShardReader

DRIFT_REFIT = 1.5  # added rows whose typical self-influence per token is this many times the built rows': refit advised (README: drift)
_DRIFT_SAMPLE = 10_000


def add(lm: LanguageModel, data, index: str | Path, *, text_field: str | None = None, split: str | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET,
        progress: bool = True) -> Manifest:
    """Append the rows of ``data`` to the index, coded with its own factors and compression; the FAISS index
    is extended (not retrained) and the TF-IDF refitted. Returns the new manifest (its last addition
    carries the factors' measured ``drift``), or the index's own, unchanged, when it already holds these rows."""
    root = Path(index)
    with writer_lock(root, "add"):
        manifest = store.load_manifest(root)
        store.check_hashes(root, [*manifest.factors_files, manifest.index.file])
        factors = Factors.load(root / store.FACTORS_DIR)
        factors.check_model(lm.model_hash, lm.tokenizer_hash)
        field = text_field or manifest.build.text_field
        dataset = load_texts(data, text_field=field, split=split, chat=lm.tokenizer if manifest.build.chat else None)
        if len(dataset) == 0:
            raise GradIndexError(f"data {data} has no rows")
        fingerprint = texts_fingerprint(dataset, field)
        pending = store.read_pending(root)
        if pending is not None and any((a.first_shard, a.data_fingerprint) == (pending.first_shard, pending.data_fingerprint)
                                       for a in manifest.additions):  # killed after its manifest: it is done
            store.save_pending(root, None)
            return manifest
        if fingerprint == manifest.build.data_fingerprint or any(a.data_fingerprint == fingerprint for a in manifest.additions):
            return manifest  # already added (a re-run after a kill, or twice by mistake): its rows are never indexed twice
        rows = split_documents(lm.tokenizer, dataset[field], manifest.build.max_length, chunk=manifest.build.stride > 0,
                               stride=manifest.build.stride or None)  # as the build split its documents
        start = manifest.n_rows
        addition = Addition(describe_data(data), fingerprint, field, (start, start + len(rows)), len(manifest.shards))
        directory = store.shards_of(manifest)
        if pending != addition:  # another add was killed: its shards are in no manifest
            store.drop_shards(root, directory, addition.first_shard)
            store.save_pending(root, addition)
        records = _add_shards(lm, Compressor(factors, manifest.compression), rows, dataset[field], addition, manifest, root, directory, token_budget,
                              progress)
        reader = ShardReader(root, manifest.shards + records, manifest.compression.stage1_dim,
                             removed=store.read_removed(root, manifest), check=False)
        faiss_index = store.read_faiss(root, manifest)
        for record in records:  # the stage-1 quantizer stays: an added row is coded as a built one would be
            faiss_index.add(np.ascontiguousarray(reader.vectors(np.arange(*record.rows)), dtype=np.float32))
        addition = replace(addition, drift=drift(reader, manifest.build.data_rows, addition))
        new = publish(root, manifest.build, reader, manifest.index.key, faiss_index, generation=manifest.generation + 1,
                      additions=[*manifest.additions, addition], removed_file=manifest.removed)
        store.save_pending(root, None)
        return new


def _add_shards(lm, compressor, windows: Rows, documents, addition: Addition, manifest: Manifest, root: Path, directory: str, token_budget: int,
                progress: bool):
    config, (first, stop) = manifest.build, addition.rows
    records = []
    bar = tqdm(total=stop - first, desc="adding rows", unit="seq", disable=not progress)
    for i, begin in enumerate(range(first, stop, config.shard_size)):
        rows, j = range(begin, min(begin + config.shard_size, stop)), addition.first_shard + i
        record = store.read_record(root, j, directory)
        if record is None or record.rows != (rows.start, rows.stop):
            started = time.perf_counter()
            local = slice(rows.start - first, rows.stop - first)
            texts = windows.texts(documents, range(local.start, local.stop))
            tokens = tokenize_texts(lm.tokenizer, texts, config.max_length)
            codes, self_influence = compressor.encode(lm.model, tokens, token_budget)
            record = store.write_shard(root, j, rows, texts=texts, tokens=tokens, codes=codes, self_influence=self_influence,
                                       source=addition.data, started=started, offsets=windows.documents[local],
                                       starts=windows.starts[local], directory=directory)
        records.append(record)
        bar.update(len(rows))
    bar.close()
    return records


def drift(reader: ShardReader, fitted_rows: int, addition: Addition) -> float:
    """How far the added rows sit from the data the factors were fitted on: the ratio of their median
    self-influence per scored token, I(z, z) / T with I(z, z) = gᵀ(F + λ)⁻¹g, to the build's rows'
    (≈ tr((F + λ)⁻¹F_added) / tr((F + λ)⁻¹F_fitted) per token: longer sequences alone do not move it).
    Near 1 when the added rows' gradient covariance matches the fitted one; above ``DRIFT_REFIT``
    the factors are stale for them and a refit (a new build) is advised."""
    rng = np.random.default_rng(0)

    def typical(rows: np.ndarray) -> float:
        rows = rows[~reader.is_removed(rows)]
        sample = np.sort(rng.choice(rows, min(len(rows), _DRIFT_SAMPLE), replace=False)) if len(rows) else rows
        if not len(sample):
            return float("nan")
        tokens = np.maximum(np.asarray(reader.rows(sample, ("n_tokens",))["n_tokens"], dtype=np.float64) - 1, 1)
        return float(np.median(reader.self_influence(sample) / tokens))

    base = typical(np.arange(min(fitted_rows, reader.n_rows)))
    return typical(np.arange(*addition.rows)) / base if base > 0 else float("nan")


def remove(index: str | Path, *, rows=None, where: str | None = None) -> tuple[Manifest, int]:
    """Tombstone rows (by id, or every row matching ``where``, e.g. ``"source = 'a.jsonl'"``): they never
    appear in any answer, self-influence or outlier list again. Returns the new manifest and how many rows
    were newly removed."""
    root = Path(index)
    if (rows is None) == (where is None):
        raise GradIndexError("say which rows to remove: --rows 3,17 or --where \"source = 'file.jsonl'\" (one of them)")
    with writer_lock(root, "remove"):
        manifest = store.load_manifest(root)
        reader = ShardReader(root, manifest.shards, manifest.compression.stage1_dim, removed=store.read_removed(root, manifest))
        chosen = reader.check_rows(np.asarray(list(rows), dtype=np.int64)) if rows is not None else _matching(reader, where)
        removed = np.union1d(reader.removed, chosen)
        if len(removed) == len(reader.removed):
            return manifest, 0
        if len(removed) == reader.n_rows:
            raise GradIndexError(f"that would remove all {reader.n_rows} rows of {root}; delete the folder instead")
        generation = manifest.generation + 1
        entry = store.write_removed(root, removed, generation)
        new = manifest.updated(removed=entry, n_removed=len(removed))
        kept = ShardReader(root, manifest.shards, manifest.compression.stage1_dim, removed=removed)
        store.write_lexical(root, Lexical.fit(kept.texts(), removed), new.content_fingerprint, generation)
        store.save_manifest(root, new)
        store.drop_old_generations(root, new, manifest)
        return new, len(removed) - len(reader.removed)


_WHERE = re.compile(r"^\s*(\w+)\s*(=|==|!=|<=|>=|<|>|contains)\s*(.+?)\s*$")
_OPS = {"=": pc.equal, "==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater,
        ">=": pc.greater_equal, "contains": lambda column, value: pc.match_substring(column, value)}
WHERE_COLUMNS = ("row_id", "source", "offset", "text", "n_tokens")


def _matching(reader: ShardReader, where: str) -> np.ndarray:
    """Rows whose metadata satisfy ``COLUMN OP VALUE`` (OP one of = != < <= > >= contains; VALUE a number or a quoted string)."""
    match = _WHERE.match(where)
    if not match or match.group(1) not in WHERE_COLUMNS:
        raise GradIndexError(f"cannot read --where {where!r}: write COLUMN OP VALUE with COLUMN one of {', '.join(WHERE_COLUMNS)} and OP one "
                             "of = != < <= > >= contains, e.g. \"source = 'a.jsonl'\" or 'offset < 100'")
    column, op, text = match.groups()
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    numeric = column in ("row_id", "offset", "n_tokens")
    if numeric == quoted or (op == "contains" and numeric):
        raise GradIndexError(f"--where {where!r}: {column} compares with {'a number' if numeric else 'a quoted string'}")
    try:
        value = int(text) if numeric else text[1:-1]
    except ValueError:
        raise GradIndexError(f"--where {where!r}: {text!r} is not a whole number") from None
    found = [reader.meta(j).column("row_id").filter(_OPS[op](reader.meta(j).column(column), value)).to_numpy()
             for j in range(reader.n_shards)]
    return np.concatenate(found).astype(np.int64)


def compact(index: str | Path, *, progress: bool = True) -> Manifest:
    """Rewrite the index without its removed rows (numbered anew, in order; each keeps its source and offset),
    as a build of the remaining rows would be: FAISS retrained, TF-IDF refitted."""
    root = Path(index)
    with writer_lock(root, "compact"):
        manifest = store.load_manifest(root)
        if manifest.n_removed == 0:
            return manifest
        old = ShardReader(root, manifest.shards, manifest.compression.stage1_dim, removed=store.read_removed(root, manifest))
        live, generation = old.live_rows(), manifest.generation + 1
        directory, size = store.shards_dir(generation), manifest.build.shard_size
        config = replace(manifest.build, data=f"{manifest.build.data} (compacted)", data_rows=len(live),
                         data_fingerprint=f"compacted:{manifest.content_fingerprint}")
        records = []
        for j, begin in enumerate(tqdm(range(0, len(live), size), desc="compacting", unit="shard", disable=not progress)):
            rows = range(begin, min(begin + size, len(live)))
            record = store.read_record(root, j, directory)  # a killed compaction of this generation left it
            if record is None or record.rows != (rows.start, rows.stop):
                source = live[rows.start : rows.stop]
                meta = old.rows(source, ("text", "source", "offset", "start", "input_ids", "truncated", "self_influence"))
                tokens = TokenizedSet.training_text(meta["input_ids"], truncated=meta["truncated"])
                record = store.write_shard(root, j, rows, texts=meta["text"], tokens=tokens, codes=old.codes(source),
                                           self_influence=np.asarray(meta["self_influence"]), source=meta["source"],
                                           started=time.perf_counter(), offsets=np.asarray(meta["offset"]), starts=np.asarray(meta["start"]),
                                           directory=directory)
            records.append(record)
        reader = ShardReader(root, records, config.compression.stage1_dim, check=False)
        faiss_index = ann.build_index(manifest.index.key, reader.stage1_dim, len(live), reader.vector_blocks,
                                      lambda r: reader.vectors(r).astype("float32"), seed=config.compression.seed)
        store.save_build_config(root, config)  # before the manifest: a kill between the two leaves a re-run to finish, not skip, it
        return publish(root, config, reader, manifest.index.key, faiss_index, generation=generation)
