"""The offline builder, orchestration only: factors → every shard's compressed gradients → FAISS index,
TF-IDF and manifest. What is computed lives in ``fitting`` and ``compress``, what is written in ``store``.

A build is a grid of fixed row ranges (shards). Each shard is computed and written atomically with a
record marking it complete, so a killed build re-run with the same arguments skips what is done and
ends with exactly the rows of an uninterrupted build. A :class:`~gradindex.parallel.Part` builds the
shards j ≡ i (mod n); ``merge`` joins parts and writes the index.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import ann, store
from .compress import Compressor
from .corpus import describe_data, load_texts, texts_fingerprint
from .data import tokenize_texts
from .documents import Rows, split_documents
from .errors import GradIndexError
from .factors import FACTORS_FILE, Factors, copy_factors, has_factors
from .files import sha256, writer_lock
from .fitting import fit
from .layers import resolve_modules
from .lexical import Lexical
from .manifest import BuildConfig, Manifest
from .model import LanguageModel
from .options import BuildOptions
from .parallel import Part
from .reader import ShardReader


def build(lm: LanguageModel, data, out: str | Path, *, factors: Factors | str | Path | None = None,
          options: BuildOptions | None = None, part: Part | None = None, progress: bool = True) -> Path:
    """Build (or resume) the index of ``data`` under ``out``, or this process's ``part`` of it.

    Without ``factors`` they are fitted on ``data`` first (and reused when resuming).
    """
    out, options, part = Path(out), options or BuildOptions(), part or Part()
    # Rank 0 of a torchrun launch holds the lock for every rank; any other writer is refused.
    with writer_lock(out, "build") if part.leader else contextlib.nullcontext():
        return _build(lm, data, out, factors, options, part, progress)


def _build(lm: LanguageModel, data, out: Path, factors, options: BuildOptions, part: Part, progress: bool) -> Path:
    dataset = load_texts(data, text_field=options.text_field, split=options.split, chat=lm.tokenizer if options.chat else None)
    if len(dataset) == 0:
        raise GradIndexError(f"data {data} has no rows")
    existing = store.load_build_config(out)
    if factors is None and part.distributed and not has_factors(out / store.FACTORS_DIR):
        factors = _fit(lm, data, dataset, options, progress, part)  # every rank fits its share; rank 0 places the sums
    if part.leader:
        fitted, factors_hash = _place_factors(lm, data, dataset, out, factors, existing, options, progress)
    part.barrier()
    if not part.leader:
        fitted = Factors.load(out / store.FACTORS_DIR)
        factors_hash = sha256(out / store.FACTORS_DIR / FACTORS_FILE)
    fitted.check_model(lm.model_hash, lm.tokenizer_hash)
    if part.leader and lm.adapter is not None and existing is None:
        store.save_adapter(out, lm)
    max_length = lm.max_length(options.max_length or fitted.config.max_length or None)
    rows = split_documents(lm.tokenizer, dataset[options.text_field], max_length, chunk=options.chunk, stride=options.stride)
    config = BuildConfig(
        model=str((out / store.ADAPTER_DIR).resolve()) if lm.adapter is not None else lm.name,
        model_hash=fitted.config.model_hash, tokenizer_hash=fitted.config.tokenizer_hash,
        factors_hash=factors_hash, data=describe_data(data), data_rows=len(rows),
        data_fingerprint=texts_fingerprint(dataset, options.text_field), text_field=options.text_field,
        max_length=max_length, shard_size=options.shard_size, compression=options.compression, layers=fitted.config.layers,
        stride=rows.stride, documents=len(dataset), empty_documents=rows.empty, chat=options.chat, tokenizer=lm.tokenizer_name,
    )
    if existing is not None and (diff := existing.differences(config)):
        raise GradIndexError(f"{out} holds a build with different {', '.join(diff)}; use another --out or delete that folder")
    if part.leader and existing is None:
        store.save_build_config(out, config)
    if part.whole and store.is_complete(out, options.index_key):
        return out  # already built with these settings: nothing to redo

    compressor = Compressor(fitted, options.compression)
    if options.index_key is not None:
        ann.make_index(options.index_key, compressor.stage1_dim)  # an unusable key is refused before any shard is computed
    todo = [j for j in range(config.n_shards) if part.owns(j) and store.read_record(out, j) is None]
    bar = tqdm(total=sum(len(config.shard_rows(j)) for j in todo), desc="building shards", unit="seq", disable=not progress)
    for j in todo:
        _build_shard(lm, compressor, rows, dataset[config.text_field], config, out, j, options.token_budget)
        bar.update(len(config.shard_rows(j)))
    bar.close()
    part.barrier()
    if part.writes_index:
        finalize(out, max_memory=options.max_memory, index_key=options.index_key, progress=progress)
    part.finish()
    return out


def _place_factors(lm, data, dataset, out: Path, source, existing: BuildConfig | None, options: BuildOptions,
                   progress: bool) -> tuple[Factors, str]:
    """The factors the index is built with, in memory and in ``out/factors``: given, fitted here, or left
    there by an earlier run of this build. Other factors than a resumed build's are refused before
    anything in ``out`` is overwritten."""
    target = out / store.FACTORS_DIR
    expected = existing.factors_hash if existing is not None else None
    if source is None and has_factors(target):
        factors = Factors.load(target)
        if factors.config.modules != (wanted := resolve_modules(lm.model, options.modules)):
            raise GradIndexError(f"{out} holds factors fitted on modules {factors.config.modules!r}, not {wanted!r}; "
                                 "re-run with the same --modules, or use another --out")
        return factors, sha256(target / FACTORS_FILE)
    if isinstance(source, (str, Path)):
        source = Path(source)
        factors = Factors.load(source)  # a clear error when it is not a factors folder
        digest = sha256(source / FACTORS_FILE)
        if expected is not None and digest != expected:
            raise GradIndexError(f"{out} holds a build with different factors_hash; use another --out or delete that folder")
        # A resumed build keeps the factors files it started with: its manifest vouches for their bytes, and
        # a refit with equal tensors still differs in factors.json (fit time, settings).
        if source.resolve() != target.resolve() and not (expected is not None and has_factors(target)):
            copy_factors(source, target)
        return factors, digest
    factors = source if source is not None else _fit(lm, data, dataset, options, progress, Part())
    return factors, factors.save(target, expect_sha256=expected)


def _fit(lm, data, dataset, options: BuildOptions, progress: bool, part: Part) -> Factors:
    return fit(lm, dataset, text_field=options.text_field, max_length=options.max_length, modules=options.modules,
               token_budget=options.token_budget, progress=progress, data_name=describe_data(data), part=part)


def _build_shard(lm: LanguageModel, compressor: Compressor, rows: Rows, documents, config: BuildConfig, out: Path, j: int,
                 token_budget: int) -> None:
    started = time.perf_counter()
    span = config.shard_rows(j)
    texts = rows.texts(documents, span)
    tokens = tokenize_texts(lm.tokenizer, texts, config.max_length)
    codes, self_influence = compressor.encode(lm.model, tokens, token_budget)
    store.write_shard(out, j, span, texts=texts, tokens=tokens, codes=codes, self_influence=self_influence, source=config.data,
                      started=started, offsets=rows.documents[span.start : span.stop], starts=rows.starts[span.start : span.stop])


def finalize(out: str | Path, *, max_memory: int = ann.DEFAULT_MAX_MEMORY, index_key: str | None = None, progress: bool = True) -> Manifest:
    """Index every shard's stage-1 vectors with FAISS, fit the TF-IDF, and write the manifest (the last file of a build)."""
    out = Path(out)
    config = store.load_build_config(out)
    if config is None:
        raise GradIndexError(f"no build at {out} (no {store.BUILD_CONFIG})")
    records = [store.read_record(out, j) for j in range(config.n_shards)]
    missing = [j for j, r in enumerate(records) if r is None]
    if missing:
        raise GradIndexError(
            f"{out}: {len(missing)} of {config.n_shards} shards not built yet (first: {missing[0]}); "
            "build the remaining parts or merge them in first"
        )
    reader = ShardReader(out, records, config.compression.stage1_dim, check=False)
    dim = reader.stage1_dim
    key = index_key or ann.choose_key(config.data_rows, dim, max_memory)
    bar = tqdm(total=config.data_rows, desc=f"indexing ({key})", unit="seq", disable=not progress)
    faiss_index = ann.build_index(key, dim, config.data_rows, reader.vector_blocks, lambda rows: reader.vectors(rows).astype("float32"),
                                  seed=config.compression.seed, use_gpu=ann.gpu_available(), progress=bar.update)
    bar.close()
    return publish(out, config, reader, key, faiss_index)


def publish(out: Path, config: BuildConfig, reader: ShardReader, key: str, faiss_index, *, generation: int = 1,
            additions=(), removed_file=None) -> Manifest:
    """Write a generation's FAISS index and TF-IDF, then its manifest (last: the generation is complete), and drop
    what generations before the previous one wrote."""
    previous = store.load_manifest(out) if generation > 1 else None
    path = store.write_faiss(out, faiss_index, generation)
    manifest = store.describe(out, config, reader.records, key, faiss_index, path, generation=generation, additions=list(additions),
                              removed=removed_file, n_removed=len(reader.removed))
    store.write_lexical(out, Lexical.fit(reader.texts(), reader.removed), manifest.content_fingerprint, generation)
    store.save_manifest(out, manifest)
    store.drop_old_generations(out, manifest, previous)
    return manifest


def merge(parts: list[str | Path], out: str | Path, *, max_memory: int = ann.DEFAULT_MAX_MEMORY,
          index_key: str | None = None, progress: bool = True) -> Manifest:
    """Join the shards of parts built with ``shard=(i, n)`` into ``out`` and index them."""
    out = Path(out)
    if not parts:
        raise GradIndexError("nothing to merge: give the part folders")
    with writer_lock(out, "merge"):
        return _merge(list(map(Path, parts)), out, max_memory, index_key, progress)


def _merge(parts: list[Path], out: Path, max_memory: int, index_key: str | None, progress: bool) -> Manifest:
    configs = []
    for folder in map(Path, parts):
        config = store.load_build_config(folder)
        if config is None:
            raise GradIndexError(f"{folder} is not a gradindex build (no {store.BUILD_CONFIG})")
        if configs and (diff := configs[0][1].differences(config)):
            raise GradIndexError(f"{folder} was built with different {', '.join(diff)} from {configs[0][0]}")
        configs.append((folder, config))
    first, config = configs[0]
    target = store.load_build_config(out)
    if target is not None and (diff := target.differences(config)):
        raise GradIndexError(f"{out} holds a build with different {', '.join(diff)}")
    if first.resolve() != out.resolve():
        copy_factors(first / store.FACTORS_DIR, out / store.FACTORS_DIR)
        store.save_build_config(out, config)
    for folder, _ in configs:
        if folder.resolve() == out.resolve():
            continue
        for j in range(config.n_shards):
            if (record := store.read_record(folder, j)) is not None and store.read_record(out, j) is None:
                store.check_hashes(folder, list(record.files.values()))  # a damaged part is refused, not merged
                store.copy_shard(folder, out, j)
    return finalize(out, max_memory=max_memory, index_key=index_key, progress=progress)
