"""Documents longer than the context become windows, each a row that knows its document and first token; empty
documents are skipped and counted; --truncate keeps the old cut."""

import json

import numpy as np
import pytest
from tokenizers import processors
from typer.testing import CliRunner

from cli.main import app
from gradindex import pipeline
from gradindex.documents import split_documents
from gradindex.errors import GradIndexError
from gradindex.search import GradIndex
from tiny import WORDS, build_args, random_texts, word_tokenizer

runner = CliRunner()
LONG = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(40))  # 40 tokens of the word tokenizer


def eos_tokenizer():
    """A tokenizer whose post-processor appends EOS, as many do: a window must leave room for it."""
    tok = word_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    return tok


@pytest.mark.parametrize("tokenizer, stride", [(word_tokenizer(), None), (word_tokenizer(), 5), (eos_tokenizer(), None)])
def test_a_long_document_becomes_windows_covering_every_token(tokenizer, stride):
    docs = ["the king", LONG, "", "  \n", "a red river"]
    rows = split_documents(tokenizer, docs, 12, stride=stride)
    texts = rows.texts(docs, range(len(rows)))
    assert rows.empty == 2 and rows.split == 1
    assert texts[0] == "the king" and texts[-1] == "a red river"
    assert rows.documents.tolist()[0] == 0 and rows.documents.tolist()[-1] == 4
    window = 12 - tokenizer.num_special_tokens_to_add()
    step = stride or window
    ours = [i for i, d in enumerate(rows.documents) if d == 1]
    expected = list(range(0, 40 - window + step, step))[: len(ours)]
    assert rows.starts[ours].tolist() == expected and expected[-1] + window >= 40
    words = LONG.split()
    for i, start in zip(ours, expected):
        assert texts[i].split() == words[start : start + window]  # the document's own text, cut at tokens
        assert len(tokenizer(texts[i])["input_ids"]) <= 12
    assert rows.texts(docs, range(2, 3)) == texts[2:3]  # a shard's rows cut from their documents alone


def test_truncation_keeps_one_row_per_document_and_bad_strides_are_refused():
    rows = split_documents(word_tokenizer(), ["the king", LONG, ""], 12, chunk=False)
    assert rows.texts(["the king", LONG, ""], range(2)) == ["the king", LONG] and rows.documents.tolist() == [0, 1] and rows.starts.tolist() == [0, 0]
    assert rows.empty == 1 and rows.stride == 0
    with pytest.raises(GradIndexError, match="all 2 rows of the data are empty"):
        split_documents(word_tokenizer(), ["", "  "], 12)
    for bad in (0, 13):
        with pytest.raises(GradIndexError, match="stride must be between 1 and the window of 12 tokens"):
            split_documents(word_tokenizer(), [LONG], 12, stride=bad)


def _build(ws, tmp_path, name, texts, *extra):
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = build_args(ws, tmp_path / name, "--max-length", "12", *extra)
    args[args.index("--data") + 1] = str(data)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return tmp_path / name


def test_an_index_of_documents_holds_every_window_and_names_its_document(ws, tmp_path):
    texts = random_texts(20, seed=4, hi=10) + [LONG, "", "   "] + random_texts(5, seed=6, hi=10)
    out = _build(ws, tmp_path, "docs", texts)
    index = GradIndex.open(out)
    build = index.manifest.build
    windows = len(range(0, 40 - 12 + 12, 12))
    assert (build.documents, build.empty_documents, build.data_rows, build.stride) == (28, 2, 25 + windows, 12)
    meta = index.reader.rows(range(build.data_rows), ("text", "offset", "start", "truncated"))
    assert meta["offset"] == list(range(21)) + [20] * (windows - 1) + list(range(23, 28))  # empty rows 21, 22 skipped
    long_rows = [i for i, d in enumerate(meta["offset"]) if d == 20]
    assert [meta["start"][i] for i in long_rows] == [0, 12, 24, 36] and not any(meta["truncated"])
    assert " ".join(meta["text"][i] for i in long_rows).split() == LONG.split()  # the whole document is in the index
    result = index.query(" ".join(LONG.split()[24:30]), " " + " ".join(LONG.split()[30:34]), k=index.n, k1=index.n, k2=index.n)
    hit = next(h for h in result.hits if h.row == long_rows[2])
    assert (hit.offset, hit.start) == (20, 24) and "(document 20, token 24)" in result.summary()
    assert "from 28 documents (2 empty, skipped), split into windows of 12 tokens every 12" in pipeline.info(out).summary(out)

    added = tmp_path / "more.jsonl"
    added.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": LONG}) + "\n")
    manifest = pipeline.add(out, added, progress=False)
    new = GradIndex.open(out).reader.rows(range(build.data_rows, manifest.n_rows), ("offset", "start"))
    assert new == {"offset": [1] * windows, "start": [0, 12, 24, 36]}  # split as the build split, offsets in that file


def test_truncate_indexes_each_document_once_as_before(ws, tmp_path):
    out = _build(ws, tmp_path, "cut", random_texts(20, seed=4, hi=10) + [LONG, ""], "--truncate")
    index = GradIndex.open(out)
    assert (index.manifest.build.data_rows, index.manifest.build.stride, index.manifest.build.empty_documents) == (21, 0, 1)
    meta = index.reader.rows([20], ("text", "offset", "start", "truncated"))
    assert meta == {"text": [LONG], "offset": [20], "start": [0], "truncated": [True]}
    assert np.isfinite(index.query("the king", " wrote a book", k=3).hits[0].score)
