"""Settings validated in one place: QueryOptions and BuildOptions, as every entry point takes them."""

import pytest

from gradindex.codeplan import CompressionConfig
from gradindex.errors import GradIndexError
from gradindex.options import DEFAULT_K1, DEFAULT_K2, BuildOptions, QueryOptions, parse_part, parse_size


def test_query_defaults_are_filled_in_and_bounded_by_the_index():
    full = QueryOptions().for_index(n_rows=50_000)
    assert (full.k, full.k1, full.k2) == (10, DEFAULT_K1, DEFAULT_K2)
    small = QueryOptions(k=5, k1=3000, k2=400).for_index(n_rows=70)
    assert (small.k1, small.k2) == (70, 70)
    assert QueryOptions(k=20, k1=5, k2=5).for_index(100).k2 == 20  # never fewer candidates than results
    assert QueryOptions.of(QueryOptions(k=3), opponents=True) == QueryOptions(k=3, opponents=True)
    assert QueryOptions.of(k=3) == QueryOptions(k=3)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be a positive number of results, got 0"),
    ({"k": 2.5}, "k must be a positive number"),
    ({"k": True}, "k must be a positive number"),
    ({"candidates": "bm25"}, "candidates must be one of index, tfidf, hybrid"),
    ({"k1": 0}, "k1 must be a positive number of candidates, got 0"),
    ({"k2": -5}, "k2 must be a positive number of candidates, got -5"),
])
def test_bad_query_options_are_refused_when_made(kwargs, message):
    with pytest.raises(GradIndexError, match=message):
        QueryOptions(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 71}, "k = 71 exceeds the 70 sequences in the index"),
])
def test_query_options_beyond_the_index_are_refused(kwargs, message):
    with pytest.raises(GradIndexError, match=message):
        QueryOptions(**kwargs).for_index(n_rows=70)


def test_build_options_parse_sizes_and_refuse_bad_shards():
    assert BuildOptions(max_memory="512M").max_memory == 512 * 2**20
    assert BuildOptions(max_memory="4GiB").max_memory == BuildOptions().max_memory == 4 * 2**30
    assert BuildOptions.of(BuildOptions(shard_size=16), compression=CompressionConfig(budget=4096)).shard_size == 16
    assert parse_size(1000) == 1000 and parse_part("1/4") == (1, 4) and parse_part(None) is None
    with pytest.raises(GradIndexError, match="cannot read memory size 'lots'"):
        BuildOptions(max_memory="lots")
    with pytest.raises(GradIndexError, match="shard size must be positive, got 0"):
        BuildOptions(shard_size=0)
    with pytest.raises(GradIndexError, match="--shard takes i/n"):
        parse_part("half")


def test_k_goes_positionally_and_the_old_rank_names_are_refused_clearly():
    assert QueryOptions.of(None, 5) == QueryOptions(k=5) and QueryOptions.of(QueryOptions(k=3), None).k == 3
    for name in ("rank", "stage2_rank"):
        with pytest.raises(GradIndexError, match=f"{name}= is gone: indexes now hold one fixed-size code per sequence"):
            QueryOptions.of(**{name: 2})
