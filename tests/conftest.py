import pytest
import torch

from gradindex.data import Query, tokenize_queries, tokenize_texts
from tiny import N, build_args, random_texts, tiny_model, tiny_workspace, word_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="session")
def tiny_sets(tokenizer):
    """A few padded-length-varying training texts and queries for float64 checks."""
    train = tokenize_texts(tokenizer, random_texts(24, seed=1), max_length=32)
    queries = tokenize_queries(
        tokenizer, [Query("the capital of the north", " is red"), Query("a king wrote", " the first book"), Query("music", " by the composer")], 32
    )
    return train, queries


@pytest.fixture(params=["gpt2", "llama", "neox", "opt"])
def model64(request):
    return tiny_model(request.param, width=8, dtype=torch.float64)


@pytest.fixture(scope="session")
def ws(tmp_path_factory):
    """A tiny saved model (and a differently seeded twin), N training texts, two queries, factors and a built index."""
    from typer.testing import CliRunner

    from cli.main import app
    from gradindex import pipeline

    queries = [{"prompt": "the king of the north", "completion": " wrote a book"}, {"prompt": "music by", "completion": " the old composer"}]
    root = tiny_workspace(tmp_path_factory.mktemp("index"), random_texts(N, seed=3), queries)
    pipeline.fit(str(root / "model"), str(root / "train.jsonl"), out=root / "factors", progress=False)
    result = CliRunner().invoke(app, build_args(root, root / "idx"))
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="session")
def index(ws):
    from gradindex.search import GradIndex

    return GradIndex.open(ws / "idx")


@pytest.fixture(scope="session")
def exact(ws):
    """Brute-force exact scores of the tiny index's training texts on its two queries, (2, N)."""
    from gradindex import pipeline

    return pipeline.score(ws / "model", ws / "factors", ws / "train.jsonl", ws / "queries.jsonl", progress=False).scores
