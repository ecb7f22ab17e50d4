"""Training data as a ``datasets.Dataset`` with a text column, from every input users have: files, saved
folders, hub names, ``datasets`` objects, lists and DataFrames; how an index names it and hashes it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import GradIndexError, first_line

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def load_texts(data, text_field: str = "text", split: str | None = None, chat=None):
    """Load training data with ``datasets`` and return it as a ``Dataset`` with a string ``text_field``.

    ``data`` may be a ``datasets`` Dataset, DatasetDict or IterableDataset (read once, into memory), a list
    of strings or of dicts, a pandas DataFrame, a json/jsonl/parquet/csv/txt file, a folder saved with
    ``save_to_disk``, a folder of data files, or a hub dataset name. ``split`` picks a DatasetDict's split
    (default: ``train``, or the only one there is). With ``chat``, a tokenizer, ``text_field`` holds chat
    messages (lists of ``{"role", "content"}``), rendered to text with its chat template.
    """
    import datasets

    if isinstance(data, datasets.IterableDataset):
        data = datasets.Dataset.from_generator(lambda: (yield from data), features=data.features)
    elif isinstance(data, (list, tuple)):
        data = datasets.Dataset.from_dict({text_field: list(data)}) if all(isinstance(x, str) for x in data) else _from_rows(data)
    elif type(data).__name__ == "DataFrame":
        data = datasets.Dataset.from_pandas(data, preserve_index=False)
    if not isinstance(data, (datasets.Dataset, datasets.DatasetDict)):
        data = _load_dataset(str(data), split)
    if isinstance(data, datasets.DatasetDict):
        data = _pick_split(data, split)
    if text_field not in data.column_names:
        raise GradIndexError(f"data has no text field {text_field!r}; its columns are {data.column_names} (use --text-field)")
    return data if chat is None else _render_chat(data, text_field, chat)


def _render_chat(data, field: str, tokenizer):
    """Each row's messages as the model was trained on them: the tokenizer's chat template, as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise GradIndexError(f"--chat: the tokenizer ({type(tokenizer).__name__}) has no chat template")

    def render(row, i):
        messages = row[field]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages):
            raise GradIndexError(f"--chat: row {i} of {field!r} is not a list of {{role, content}} messages")
        return {field: tokenizer.apply_chat_template(messages, tokenize=False)}

    return data.map(render, with_indices=True, remove_columns=[field], load_from_cache_file=False)


def _from_rows(rows):
    import datasets

    if not all(isinstance(x, dict) for x in rows):
        raise GradIndexError("a data list must hold only strings or only dicts (one row each)")
    return datasets.Dataset.from_list(list(rows))


def _pick_split(splits, split: str | None):
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    if (split or "train") not in splits:
        raise GradIndexError(f"data has no split {split or 'train'!r}; its splits are {sorted(splits)} (use --split)")
    return splits[split or "train"]


def _load_dataset(source: str, split: str):
    import datasets

    path = Path(source)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise GradIndexError(f"cannot read {path}: expected one of {sorted(_FILE_BUILDERS)}")
            if builder != "parquet":
                _check_utf8(path)
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return datasets.load_from_disk(str(path))
        if not path.exists() and (source.startswith((".", "/")) or path.suffix):
            raise GradIndexError(f"data not found: {source}")
        return datasets.load_dataset(source, split=split or "train")
    except GradIndexError:
        raise
    except UnicodeDecodeError as e:
        raise GradIndexError(f"data {source} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except Exception as e:  # datasets raises many types; the user needs the message, not the stack
        raise GradIndexError(f"cannot load data {source}: {first_line(e)}") from None


def _check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Refuse text files that are not UTF-8: some ``datasets`` readers would silently replace the bytes."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while block := f.read(chunk):
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                raise GradIndexError(f"data {path} is not valid UTF-8 (byte {offset + e.start}: {e.reason})") from None
            offset += len(block)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise GradIndexError(f"data {path} is not valid UTF-8 (truncated character at the end)") from None


def describe_data(data) -> str:
    """How an index and its factors name their data: a local path made absolute, a hub name, or the object's type."""
    if isinstance(data, (str, Path)):
        return str(Path(data).resolve()) if Path(data).exists() else str(data)
    return type(data).__name__


def texts_fingerprint(dataset, text_field: str, batch: int = 10_000) -> str:
    """A hash of the texts themselves, in order: the same data under another name, path or modification time
    is the same data; one changed character is not."""
    h = hashlib.blake2b(digest_size=16)
    for rows in dataset.select_columns([text_field]).iter(batch_size=batch):
        for encoded in (str(text).encode("utf-8", "surrogatepass") for text in rows[text_field]):
            h.update(len(encoded).to_bytes(8, "little") + encoded)
    return h.hexdigest()
