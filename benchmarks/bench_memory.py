"""Memory bounds: a build whose stored codes exceed the memory its process may use, and peak RSS of build
and query at N and at 6·N rows.

    python -m benchmarks.bench_memory [--rows 36000] [--limit 1536M] [--budget 64K]

A tiny random GPT-2 (width 128, 4 blocks: 64 KiB codes fit its MLP) indexes random word sequences. Each
command runs in its own process and reports its peak RSS; the large build runs in a cgroup (v1 memory
controller) limited to ``--limit``, less than its codes take on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gradindex.options import parse_size

ROOT = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup/memory/gradindex-bench")
_MEASURE = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(code)")


def peak_rss(args: list[str], cwd: Path, cgroup: bool = False) -> tuple[int, float]:
    """Peak RSS in bytes and seconds of ``gradindex ARGS`` in a fresh process (inside the cgroup if asked)."""
    command = [sys.executable, "-c", _MEASURE, sys.executable, "-c", "from cli.main import app; app()", *args]

    def enter():
        (CGROUP / "cgroup.procs").write_text(str(os.getpid()))

    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=enter if cgroup else None)
    if done.returncode != 0:
        raise RuntimeError(f"gradindex {' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
    return int(done.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=36_000)
    parser.add_argument("--limit", default="1536M")
    parser.add_argument("--budget", default="64K")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    limit = parse_size(args.limit)
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)

    with tempfile.TemporaryDirectory(prefix="gradindex-memory-") as tmp:
        ws = Path(tmp)
        model = tiny.tiny_model("gpt2", width=128, layers=4)
        model.config.n_positions = 64
        model.save_pretrained(ws / "model")
        tiny.word_tokenizer().save_pretrained(ws / "model")
        small = args.rows // 6
        texts = tiny.random_texts(args.rows, seed=5)
        for name, n in (("small", small), ("big", args.rows)):
            (ws / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:n]))
        subprocess.run([sys.executable, "-c", "from cli.main import app; app()", "fit", "model", "--data", "small.jsonl", "--out", "factors"],
                       cwd=ws, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        report = {"rows": {"small": small, "big": args.rows}, "budget": args.budget, "limit_bytes": limit}
        query = ["--prompt", "the king of the north", "--completion", " wrote a book", "-k", "10"]
        for name in ("small", "big"):
            build = ["build", "model", "--data", f"{name}.jsonl", "--out", name, "--factors", "factors", "--budget", args.budget,
                     "--shard-size", "1024"]
            in_cgroup = name == "big"
            if in_cgroup:
                CGROUP.mkdir(exist_ok=True)
                (CGROUP / "memory.limit_in_bytes").write_text(str(limit))
            rss, seconds = peak_rss(build, ws, cgroup=in_cgroup)
            codes = sum(p.stat().st_size for p in (ws / name / "shards").glob("*.codes.npy"))
            entry = {"build_peak_rss": rss, "build_seconds": round(seconds, 1), "codes_bytes": codes}
            if in_cgroup:
                entry["cgroup_max_usage"] = int((CGROUP / "memory.max_usage_in_bytes").read_text())
                entry["cgroup_limit_hits"] = int((CGROUP / "memory.failcnt").read_text())
            entry["query_peak_rss"], entry["query_seconds"] = peak_rss(["query", name, *query], ws)
            report[name] = entry
            print(name, json.dumps(entry), flush=True)
        try:
            CGROUP.rmdir()
        except OSError:
            pass
    report["build_rss_ratio_big_vs_small"] = report["big"]["build_peak_rss"] / report["small"]["build_peak_rss"]
    report["query_rss_ratio_big_vs_small"] = report["big"]["query_peak_rss"] / report["small"]["query_peak_rss"]
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if "ratio" in k}), "->", args.out)


if __name__ == "__main__":
    main()
