"""Load test of `gradindex serve` on the embedded example's index (loopback only, bounded in count and time).

    python -m benchmarks.bench_serve [--clients 8] [--queries 50] [--out benchmarks/results/serve.json] [--screenshot docs/images/serve.png]

Starts real server subprocesses on free loopback ports: one answers every distinct query alone (the
sequential reference); then `--clients` threads × `--queries` queries each hit a server with request
batching (the default) and one without (`--max-batch 1`). Reports errors, whether every answer equals the
sequential one (same rows in the same order; largest relative score difference), p50/p99 latency and
queries per second, and the start-up a warm server saves per lookup against a cold `gradindex query`.
With `--screenshot`, a headless Chromium searches from the page and saves what it shows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.index_common import ROOT, fact_and_text_queries, example

sys.path.insert(0, str(ROOT / "tests"))
from served import Server  # noqa: E402

K = 10


def body(q) -> dict:
    return {"prompt": q.prompt, "completion": q.completion, "k": K}


def compare(answer: dict, reference: dict) -> float | None:
    """The largest relative score difference when the rows agree in order; None when they do not."""
    if [h["row"] for h in answer["hits"]] != [h["row"] for h in reference["hits"]]:
        return None
    a, r = (np.array([h["score"] for h in x["hits"]]) for x in (answer, reference))
    return float(np.max(np.abs(a - r) / np.maximum(np.abs(r), 1e-30)))


def load(server: Server, pool: list, references: list, clients: int, per_client: int) -> dict:
    latencies: list[float] = []
    errors, mismatched, worst = [], 0, 0.0
    lock = threading.Lock()

    def client(c: int) -> None:
        nonlocal mismatched, worst
        for i in range(per_client):
            j = (c * 7 + i) % len(pool)  # each client its own order through the pool
            t = time.perf_counter()
            status, answer = server.call("/query", body(pool[j]))
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if status != 200:
                    errors.append(answer)
                    continue
                d = compare(answer, references[j])
                if d is None:
                    mismatched += 1
                else:
                    worst = max(worst, d)

    before = server.call("/info")[1]["batching"]
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    after = server.call("/info")[1]["batching"]
    passes = after["passes"] - before["passes"]
    return {"requests": len(latencies), "errors": len(errors), "rows_differ": mismatched, "max_rel_score_diff": worst,
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "qps": len(latencies) / wall, "wall_s": wall, "passes": passes, "queries_per_pass": len(latencies) / max(passes, 1)}


def cold_query(index: Path, q, runs: int = 3) -> float:
    """Median wall time of a whole `gradindex query` process: interpreter, model load and hash, index open, answer."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cli.main", "query", str(index), "--prompt", q.prompt, "--completion", q.completion,
                        "-k", str(K)], cwd=ROOT, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def screenshot(server: Server, q, path: Path) -> None:
    from browser import Browser

    browser = Browser(Path("/tmp/gradindex-bench-profile"), height=1100)
    try:
        browser.open(server.url + "/")
        browser.search(q.prompt, q.completion, k=4)
        path.parent.mkdir(parents=True, exist_ok=True)
        browser.screenshot(path)
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default=str(ROOT / "indexes" / "example"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queries", type=int, default=50, help="queries per client")
    parser.add_argument("--out", default="benchmarks/results/serve.json")
    parser.add_argument("--screenshot", default=None)
    args = parser.parse_args()
    index = Path(args.index)
    if not (index / "manifest.json").is_file():
        raise SystemExit(f"{index} is not built: run `python examples/demo.py` first")
    kinds = fact_and_text_queries(example(), n_text=20)
    pool = kinds["fact"][:20] + kinds["text"][:20]
    report: dict = {"index": str(index), "clients": args.clients, "queries_per_client": args.queries, "distinct_queries": len(pool), "k": K}

    reference = Server(index, "--max-batch", "1")
    report["server_ready_s"] = reference.ready_seconds
    references = []
    latencies = []
    for q in pool:  # one at a time, nothing else in flight: the sequential answers
        t = time.perf_counter()
        status, answer = reference.call("/query", body(q))
        latencies.append(time.perf_counter() - t)
        assert status == 200, answer
        references.append(answer)
    report["sequential_single_client"] = {"p50_ms": 1000 * float(np.median(latencies)), "qps": len(latencies) / sum(latencies)}
    report["without_batching"] = load(reference, pool, references, args.clients, args.queries)
    reference.stop()

    batching = Server(index)
    report["with_batching"] = load(batching, pool, references, args.clients, args.queries)
    if args.screenshot:
        screenshot(batching, kinds["fact"][0], Path(args.screenshot))
    batching.stop()

    report["cold_cli_query_s"] = cold_query(index, pool[0])
    report["startup_saved_per_lookup_s"] = report["cold_cli_query_s"] - report["sequential_single_client"]["p50_ms"] / 1000
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
