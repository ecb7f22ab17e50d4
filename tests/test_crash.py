"""Crash anywhere, resume exactly: the fault-injection harness (``benchmarks/bench_crash.py``), one kill per
operation here (its full run, ten per operation, is in the README)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_operation_killed_and_re_run_ends_as_an_uninterrupted_run():
    spec = importlib.util.spec_from_file_location("bench_crash", ROOT / "benchmarks" / "bench_crash.py")
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    report = harness.run(kills=1, seed=1, log=lambda *_: None)
    assert set(report["ops"]) == set(harness.OPS)
    for op, result in report["ops"].items():
        assert result["kills"] == 1, (op, result)
    total = report["total"]
    assert total["kills"] == total["resumed"] == total["files_identical"] == total["answers_identical"] == len(harness.OPS), report
    assert total["rows_lost"] == total["rows_duplicated"] == 0 and total["rows_compared"] > 0
