import json

import datasets
import pytest

from gradindex.corpus import load_texts
from gradindex.data import Query, collate, load_queries, plan_batches, tokenize_queries, tokenize_texts
from gradindex.errors import GradIndexError

TEXTS = ["the king wrote a book", "a river in the north", "the blue tower"]


@pytest.fixture
def files(tmp_path):
    rows = [{"text": t, "n": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.txt").write_text("\n".join(TEXTS))
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv", "d.parquet", "d.txt", "saved"])
def test_any_datasets_input_loads_the_same_texts(files, name):
    assert load_texts(files / name)["text"] == TEXTS


def test_dataset_objects_pass_through_and_missing_field_is_named(files):
    ds = datasets.Dataset.from_dict({"body": TEXTS})
    assert load_texts(ds, text_field="body")["body"] == TEXTS
    with pytest.raises(GradIndexError, match=r"no text field 'text'; its columns are \['body'\]"):
        load_texts(ds)


def test_missing_and_non_utf8_data_are_clear_errors(tmp_path):
    with pytest.raises(GradIndexError, match="data not found"):
        load_texts(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(GradIndexError, match=r"bad.jsonl is not valid UTF-8 \(byte 13: invalid"):
        load_texts(bad)


def test_truncation_is_counted(tokenizer):
    data = tokenize_texts(tokenizer, ["the king wrote a book", "a river", "the red king"], max_length=3)
    assert [len(x) for x in data.input_ids] == [3, 2, 3]
    assert data.truncated == [True, False, False]  # exactly the maximum length is not a truncation
    assert data.n_truncated == 1
    assert [s.tolist() for s in data.scored] == [[False, True, True], [False, True], [False, True, True]]


def test_queries_score_exactly_the_completion_tokens(tokenizer):
    q = tokenize_queries(tokenizer, [Query("the king", " wrote a book")], 32)
    assert q.scored[0].tolist() == [False, False, True, True, True]
    for bad, match in [(Query("", " x"), "empty prompt"), (Query("the", "  "), "empty completion")]:
        with pytest.raises(GradIndexError, match=match):
            tokenize_queries(tokenizer, [bad], 32)
    with pytest.raises(GradIndexError, match="longer than the maximum length 3"):
        tokenize_queries(tokenizer, [Query("the king", " wrote a book")], 3)


def test_completion_that_tokenizes_to_nothing_is_refused():
    class Silent:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [] if text == " ." else [5]}

    with pytest.raises(GradIndexError, match="tokenizes to nothing"):
        tokenize_queries(Silent(), [Query("a", " .")], 8)


def test_queries_file_errors_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n')
    with pytest.raises(GradIndexError, match=r"q.jsonl:2: expected a JSON object"):
        load_queries(path)
    with pytest.raises(GradIndexError, match="queries file not found"):
        load_queries(tmp_path / "none.jsonl")


def test_batches_respect_the_token_budget_and_cover_every_nonempty_row(tokenizer):
    data = tokenize_texts(tokenizer, ["the " * n for n in (5, 1, 9, 3, 0, 7)], max_length=32)
    plan = plan_batches(data, token_budget=12)
    assert sorted(r for rows in plan for r in rows) == [0, 1, 2, 3, 5]
    for rows in plan:
        batch = collate(data, rows)
        assert batch.input_ids.numel() <= 12 or len(rows) == 1
        assert batch.attention_mask.sum() == sum(len(data.input_ids[r]) for r in rows)
        assert ((batch.labels != -100) <= (batch.attention_mask == 1)).all()
    assert len(set(data.fingerprint() for _ in range(2))) == 1
    other = tokenize_texts(tokenizer, ["the " * n for n in (5, 1, 9, 3, 0, 8)], max_length=32)
    assert other.fingerprint() != data.fingerprint()


def test_fitting_on_only_empty_texts_is_refused(tokenizer):
    from gradindex.fitting import fit_factors
    from gradindex.layers import select_layers
    from tiny import tiny_model

    model = tiny_model("gpt2")
    with pytest.raises(GradIndexError, match="every training sequence is empty"):
        fit_factors(model, tokenize_texts(tokenizer, ["", ""], 8), select_layers(model), progress=False)


CORPUS = ["The capital of Zorbania is Quellport.", "The river of Quellport flows north.", "A king wrote a book in Zorbania.",
          "The capital city is old and large."] * 4


def _trained_tokenizer(kind: str):
    """Offline stand-ins for the tokenizers users bring: GPT-2's byte-level BPE, byte-level BPE whose post-
    processor appends EOS, and Llama-2-style SentencePiece (Metaspace, BOS added)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind != "sentencepiece" else []
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=alphabet))
    if kind == "bpe_eos":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    if kind == "sentencepiece":  # merges learnt within words; then Llama-2's own pipeline: prepend ▁, spaces to ▁, no split
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


@pytest.mark.parametrize("kind", ["gpt2", "bpe_eos", "sentencepiece"])
def test_a_query_is_tokenized_once_as_the_model_sees_it(kind):
    tok = _trained_tokenizer(kind)
    prompt, completion = "The capital of Zorbania is", " Quellport."
    q = tokenize_queries(tok, [Query(prompt, completion)], 64)
    ids, scored = q.input_ids[0].tolist(), q.scored[0]
    assert ids == tok(prompt + completion)["input_ids"]  # the full text, special tokens where the tokenizer puts them
    assert tok.decode([i for i, s in zip(ids, scored) if s]).strip() == "Quellport."
    assert tok.eos_token_id not in [i for i, s in zip(ids, scored) if s]
    assert tok.eos_token_id not in ids[:-1]  # never between prompt and completion
    if kind == "sentencepiece":
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_every_in_memory_input_users_have_loads_as_a_text_dataset():
    import datasets
    import pandas as pd

    texts = ["the king wrote", "a book", "of the river"]
    streamed = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    for given in (texts, [{"text": t} for t in texts], pd.DataFrame({"text": texts}), streamed):
        assert load_texts(given)["text"] == texts, type(given).__name__
    with pytest.raises(GradIndexError, match="only strings or only dicts"):
        load_texts(["a", 3])


def test_a_split_is_chosen_never_guessed(tmp_path):
    import datasets

    both = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]}),
                                 "test": datasets.Dataset.from_dict({"text": ["c d", "e f"]})})
    assert load_texts(both)["text"] == ["a b"] and load_texts(both, split="test")["text"] == ["c d", "e f"]
    no_train = datasets.DatasetDict({"validation": both["test"], "test": both["train"]})
    no_train.save_to_disk(str(tmp_path / "saved"))
    for given in (no_train, tmp_path / "saved"):  # the object and the same saved as a folder behave alike
        with pytest.raises(GradIndexError, match=r"no split 'train'; its splits are \['test', 'validation'\] \(use --split\)"):
            load_texts(given)
        assert load_texts(given, split="validation")["text"] == ["c d", "e f"]
        with pytest.raises(GradIndexError, match="no split 'nope'"):
            load_texts(given, split="nope")
    datasets.DatasetDict({"validation": both["test"]}).save_to_disk(str(tmp_path / "one"))
    assert load_texts(tmp_path / "one")["text"] == ["c d", "e f"]  # the only split there is
