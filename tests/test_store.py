"""The index format on its own (no model, no CLI): atomic writes, typed records and their JSON, shards
written and read back by row, completeness, hashes, and older schemas refused."""

import json
import os
import time

import numpy as np
import pytest

from gradindex import store
from gradindex.codeplan import CompressionConfig
from gradindex.data import TokenizedSet
from gradindex.errors import GradIndexError
from gradindex.files import atomic_write, from_dict, write_text
from gradindex.lexical import Lexical
from gradindex.manifest import SCHEMA_VERSION, BuildConfig, FaissEntry, FileEntry, Manifest
from gradindex.reader import ShardReader

SHARD = 3
TEXTS = [f"text number {i} about the {'red' if i % 2 else 'blue'} tower" for i in range(7)]


def config(**changes) -> BuildConfig:
    fields = dict(model="m", model_hash="a" * 32, tokenizer_hash="b" * 32, factors_hash="c" * 64, data="train.jsonl", data_rows=len(TEXTS),
                  data_fingerprint="f", text_field="text", max_length=16, shard_size=SHARD, compression=CompressionConfig(budget=4096, stage1_dim=2))
    return BuildConfig(**{**fields, **changes})


@pytest.fixture
def shards(tmp_path):
    """Seven rows in shards of three, with codes and self-influence that encode their row."""
    cfg = config()
    records = []
    for j in range(cfg.n_shards):
        rows = cfg.shard_rows(j)
        ids = [np.arange(r % 4 + 2) + r for r in rows]
        tokens = TokenizedSet.training_text(ids, pad_id=0, truncated=[False] * len(rows))
        codes = np.array([[r, r + 0.25, r + 0.5, r + 0.75] for r in rows], np.float16)
        records.append(store.write_shard(tmp_path, j, rows, texts=TEXTS[rows.start : rows.stop], tokens=tokens, codes=codes, self_influence=np.array(rows, np.float64) * 10, source="train.jsonl",
                                         started=time.perf_counter()))
    return tmp_path, cfg, records


def test_an_interrupted_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        write_text(path, "new \ud800")  # a lone surrogate fails half-way through encoding
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.html"]
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "folder") as tmp:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise RuntimeError
    assert os.listdir(tmp_path) == ["report.html"]


def test_a_folder_written_atomically_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "stale").write_text("old")
    with atomic_write(tmp_path / "folder") as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("new")
    assert os.listdir(tmp_path / "folder") == ["fresh"] and os.listdir(tmp_path) == ["folder"]


def test_shards_read_back_by_row_in_any_order(shards):
    root, cfg, records = shards
    reader = ShardReader(root, records, cfg.compression.stage1_dim, check=False)
    rows = [6, 0, 4, 3, 1]
    np.testing.assert_array_equal(reader.vectors(rows), np.array([[r, r + 0.25] for r in rows], np.float16))  # the stage-1 prefix
    np.testing.assert_array_equal(reader.codes(rows, 2), np.array([[r, r + 0.25] for r in rows], np.float16))
    assert reader.codes(rows).shape == (5, 4)
    assert reader.token_ids(rows) == [list(np.arange(r % 4 + 2) + r) for r in rows]
    assert reader.rows(rows, ("text", "offset", "source")) == {"text": [TEXTS[r] for r in rows], "offset": rows, "source": ["train.jsonl"] * 5}
    np.testing.assert_array_equal(reader.self_influence(rows), np.array(rows) * 10.0)
    np.testing.assert_array_equal(reader.self_influence(), np.arange(7) * 10.0)
    assert list(reader.texts()) == TEXTS
    np.testing.assert_array_equal(np.concatenate(list(reader.vector_blocks())), np.c_[np.arange(7), np.arange(7) + 0.25])


def test_a_shard_is_complete_only_with_its_record_and_files_of_the_recorded_size(shards):
    root, cfg, records = shards
    assert store.read_record(root, 1) == records[1] and records[1].rows == (3, 6)
    path = store.shard_path(root, 1, "codes")
    path.write_bytes(path.read_bytes()[:-1])
    assert store.read_record(root, 1) is None
    store.record_path(root, 2).write_text("{not json")
    assert store.read_record(root, 2) is None


def test_metadata_of_the_wrong_rows_is_refused(shards, tmp_path_factory):
    root, cfg, records = shards
    store.shard_path(root, 0, "meta").write_bytes(store.shard_path(root, 1, "meta").read_bytes())
    with pytest.raises(GradIndexError, match="does not hold rows 0–2"):
        ShardReader(root, records, cfg.compression.stage1_dim, check=False).rows([0])


def test_copied_shards_are_the_same_files(shards, tmp_path_factory):
    root, cfg, _ = shards
    other = tmp_path_factory.mktemp("copy")
    store.copy_shard(root, other, 1)
    for kind in ("codes", "meta"):
        assert store.shard_path(other, 1, kind).read_bytes() == store.shard_path(root, 1, kind).read_bytes()
    assert store.read_record(other, 1) == store.read_record(root, 1)


def manifest_of(root, cfg, records) -> Manifest:
    (root / store.INDEX_FILE).write_bytes(b"faiss")
    factors = [FileEntry("factors/factors.safetensors", 5, cfg.factors_hash), FileEntry("factors/factors.json", 2, "d" * 64)]
    index = FaissEntry("RaBitQ", 0, cfg.data_rows, FileEntry.of(root, root / store.INDEX_FILE))
    return Manifest.describe(cfg, records, index=index, vector_dim=3, code_dim=4, factors_files=factors)


def test_manifest_round_trips_and_older_schemas_are_refused(shards):
    root, cfg, records = shards
    manifest = manifest_of(root, cfg, records)
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest
    assert manifest.bytes_per_sequence["codes"] == sum(r.files["codes"].bytes for r in records) / 7
    for old in (1, 2):  # per-layer codes that grew with the model
        with pytest.raises(GradIndexError, match=f"schema version {old}: .* rebuild the index"):
            Manifest.from_dict({**manifest.to_dict(), "schema_version": old})
    with pytest.raises(GradIndexError, match="schema version 99, newer than this gradindex reads"):
        Manifest.from_dict({**manifest.to_dict(), "schema_version": 99})
    with pytest.raises(GradIndexError, match="unknown field"):
        Manifest.from_dict({**manifest.to_dict(), "surprise": 1})
    damaged = manifest.to_dict()
    del damaged["index"]
    with pytest.raises(GradIndexError, match="incomplete or damaged"):
        Manifest.from_dict(damaged)


def test_saved_manifest_vouches_for_every_file(shards):
    root, cfg, records = shards
    factors = root / store.FACTORS_DIR
    factors.mkdir()
    (factors / "factors.safetensors").write_bytes(b"tensors")
    (factors / "factors.json").write_text("{}")
    from gradindex.files import sha256

    cfg = config(factors_hash=sha256(factors / "factors.safetensors"))
    store.save_build_config(root, cfg)
    assert not store.is_complete(root)
    (root / store.INDEX_FILE).write_bytes(b"faiss")

    class Index:
        d, ntotal = 3, 7

    store.save_manifest(root, store.describe(root, cfg, records, "RaBitQ", Index()))
    assert store.is_complete(root) and store.is_complete(root, "RaBitQ") and not store.is_complete(root, "Flat")
    manifest = store.load_manifest(root)
    assert {f.name for f in manifest.files()} >= {"index.faiss", "factors/factors.safetensors", "shards/00002.meta.parquet"}
    assert store.verify(root) == []
    store.check_sizes(root, manifest)
    path = store.shard_path(root, 0, "codes")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert store.verify(root) == ["shards/00000.codes.npy: sha256 differs from the manifest"]
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(GradIndexError, match="truncated or corrupt"):
        store.check_sizes(root, manifest)


def test_build_config_round_trips_and_names_differences(tmp_path):
    cfg = config()
    store.save_build_config(tmp_path, cfg)
    assert store.load_build_config(tmp_path) == cfg
    assert cfg.differences(config(shard_size=4, data="other")) == ["shard_size"]  # names describe; hashes decide
    assert cfg.differences(config(data_fingerprint="changed", model="/elsewhere")) == ["data_fingerprint"]
    (tmp_path / store.BUILD_CONFIG).write_text("[]")
    with pytest.raises(GradIndexError, match="delete the folder to start over"):
        store.load_build_config(tmp_path)
    assert store.load_build_config(tmp_path / "nowhere") is None


def test_incomplete_and_missing_indexes_are_explained(shards, tmp_path_factory):
    root, cfg, _ = shards
    with pytest.raises(GradIndexError, match=r"no index at .* \(folder not found\)"):
        store.load_manifest(root / "nowhere")
    with pytest.raises(GradIndexError, match="no manifest.json; build one"):
        store.load_manifest(root)
    store.save_build_config(root, config())
    with pytest.raises(GradIndexError, match=r"incomplete \(3 of 3 shards built"):
        store.load_manifest(root)


def test_stored_tfidf_is_read_only_for_its_own_tokens(tmp_path):
    lexical = Lexical.fit(TEXTS)
    store.write_lexical(tmp_path, lexical, "tokens-1")
    again = store.read_lexical(tmp_path, "tokens-1")
    assert again.ranking("red tower").tolist() == lexical.ranking("red tower").tolist()
    assert store.read_lexical(tmp_path, "tokens-2") is None
    (tmp_path / store.LEXICAL_DIR / "matrix.npz").unlink()
    assert store.read_lexical(tmp_path, "tokens-1") is None


def test_typed_records_name_what_is_wrong():
    with pytest.raises(GradIndexError, match="unknown field.*colour"):
        from_dict(FileEntry, {"name": "x", "bytes": 1, "sha256": "y", "colour": "red"})
    with pytest.raises(GradIndexError, match="sha256"):
        from_dict(FileEntry, {"name": "x", "bytes": 1})
    assert SCHEMA_VERSION == 3


def test_written_files_follow_the_umask_whatever_the_library_chose(tmp_path):
    from safetensors.torch import save_file
    import torch

    with atomic_write(tmp_path / "t.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))  # safetensors itself creates 0600 files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
