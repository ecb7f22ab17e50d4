import pytest
import torch

from gradindex.data import Query, tokenize_queries, tokenize_texts
from tiny import random_texts, tiny_model, word_tokenizer


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
