"""Settings validated in one place: QueryOptions and BuildOptions, as every entry point takes them."""

import pytest

from gradindex.compress import CompressionConfig
from gradindex.errors import GradIndexError
from gradindex.options import DEFAULT_K1, DEFAULT_K2, BuildOptions, QueryOptions, parse_part, parse_size


def test_query_defaults_are_filled_in_and_bounded_by_the_index():
    full = QueryOptions().for_index(n_rows=50_000, built_rank=8)
    assert (full.k, full.k1, full.k2, full.stage2_rank) == (10, DEFAULT_K1, DEFAULT_K2, 8)
    small = QueryOptions(k=5, k1=3000, k2=400, stage2_rank=2).for_index(n_rows=70, built_rank=4)
    assert (small.k1, small.k2, small.stage2_rank) == (70, 70, 2)
    assert QueryOptions(k=20, k1=5, k2=5).for_index(100, 4).k2 == 20  # never fewer candidates than results
    assert QueryOptions.of(QueryOptions(k=3), opponents=True) == QueryOptions(k=3, opponents=True)
    assert QueryOptions.of(k=3) == QueryOptions(k=3)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be a positive number of results, got 0"),
    ({"k": 2.5}, "k must be a positive number"),
    ({"k": True}, "k must be a positive number"),
    ({"candidates": "bm25"}, "candidates must be one of index, tfidf, hybrid"),
])
def test_bad_query_options_are_refused_when_made(kwargs, message):
    with pytest.raises(GradIndexError, match=message):
        QueryOptions(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 71}, "k = 71 exceeds the 70 sequences in the index"),
    ({"stage2_rank": 5}, "stage-2 rank must be between 1 and the index's stage-2 rank 4, got 5"),
    ({"stage2_rank": 0}, "stage-2 rank must be between 1"),
])
def test_query_options_beyond_the_index_are_refused(kwargs, message):
    with pytest.raises(GradIndexError, match=message):
        QueryOptions(**kwargs).for_index(n_rows=70, built_rank=4)


def test_build_options_parse_sizes_and_refuse_bad_shards():
    assert BuildOptions(max_memory="512M").max_memory == 512 * 2**20
    assert BuildOptions(max_memory="4GiB").max_memory == BuildOptions().max_memory == 4 * 2**30
    assert BuildOptions.of(BuildOptions(shard_size=16), compression=CompressionConfig(stage2_rank=2)).shard_size == 16
    assert parse_size(1000) == 1000 and parse_part("1/4") == (1, 4) and parse_part(None) is None
    with pytest.raises(GradIndexError, match="cannot read memory size 'lots'"):
        BuildOptions(max_memory="lots")
    with pytest.raises(GradIndexError, match="shard size must be positive, got 0"):
        BuildOptions(shard_size=0)
    with pytest.raises(GradIndexError, match="--shard takes i/n"):
        parse_part("half")


def test_k_goes_positionally_and_the_old_rank_name_still_works_with_a_warning():
    assert QueryOptions.of(None, 5) == QueryOptions(k=5) and QueryOptions.of(QueryOptions(k=3), None).k == 3
    with pytest.warns(DeprecationWarning, match="stage2_rank"):
        assert QueryOptions.of(rank=2) == QueryOptions(stage2_rank=2)
