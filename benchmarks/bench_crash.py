"""Crash anywhere, resume exactly: SIGKILL ``build``, ``merge``, ``add``, ``remove`` and ``compact`` at chosen
writes and at random instants, re-run the same command, and compare with an uninterrupted run.

    python -m benchmarks.bench_crash [--kills 10] [--out benchmarks/results/crash.json]

Half the kills land at a write (``files.atomic_write``'s hook ``GRADINDEX_CRASH_AT_WRITE``: new bytes complete,
not yet renamed), drawn so every kind of file is hit; the other half at a uniformly random instant of the
command's run time (mid-computation, mid-write, mid-fit). Each killed command is re-run without faults and its
folder compared with the uninterrupted one: the same files, every array and table byte-identical, JSON equal up
to timestamps and timings, every row id once, and identical query answers.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = {"created", "seconds", "fit_seconds"}  # what two equal runs may write differently
OPS = ("build", "merge", "add", "remove", "compact")


def _tiny():
    spec = importlib.util.spec_from_file_location("gradindex_tiny", ROOT / "tests" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def workspace(root: Path, rows: int = 240, extra: int = 80) -> Path:
    """A tiny saved GPT-2 with a word tokenizer, ``train.jsonl`` and ``extra.jsonl`` (rows for ``add``)."""
    tiny = _tiny()
    tiny.tiny_model("gpt2", width=16).save_pretrained(root / "model")
    tiny.word_tokenizer().save_pretrained(root / "model")
    for name, n, seed in (("train", rows, 3), ("extra", extra, 4)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny.random_texts(n, seed=seed)))
    return root


def commands(ws: Path) -> dict[str, tuple[str | None, list[str]]]:
    """Per operation: the state it starts from (another operation's result, or None) and its arguments, run in ``ws``."""
    build = ["build", "model", "--data", "train.jsonl", "--budget", "8K", "--stage1-dim", "64", "--shard-size", "24"]
    return {
        "build": (None, [*build, "--out", "X"]),  # fits its factors first: kills land in fitting too
        "merge": ("parts", ["merge", "P0", "P1", "--out", "X"]),
        "add": ("build", ["add", "X", "--data", "extra.jsonl"]),
        "remove": ("add", ["remove", "X", "--where", "offset < 30"]),
        "compact": ("remove", ["compact", "X"]),
    }


def gradindex(ws: Path, args: list[str], env: dict | None = None, kill_after: float | None = None) -> tuple[int, float]:
    """Run the CLI in ``ws`` (a fresh process, as a user would); SIGKILL it after ``kill_after`` seconds."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", "from cli.main import app; app()", *args], cwd=ws,
                               env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return -signal.SIGKILL, time.perf_counter() - started
    if process.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"gradindex {' '.join(args)} failed ({process.returncode}): {err.strip().splitlines()[-1:]}")
    return process.returncode, time.perf_counter() - started


def snapshot(folder: Path) -> dict:
    """What must equal between runs: every file's bytes (JSON up to timestamps and timings), every row id once."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ".lock"):
        name = path.relative_to(folder).as_posix()
        files[name] = _strip(json.loads(path.read_text())) if path.suffix == ".json" else hashlib.sha256(path.read_bytes()).hexdigest()
    rows = []
    if (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        for shard in manifest["shards"]:
            rows += pq.read_table(folder / shard["files"]["meta"]["name"], columns=["row_id"]).column("row_id").to_pylist()
    return {"files": files, "rows": rows}


def _strip(value):
    if isinstance(value, dict):
        if str(value.get("name", "")).endswith("factors.json"):  # its hash and size cover the fit time
            return {k: v for k, v in value.items() if k not in ("sha256", "bytes")}
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def answers(folder: Path) -> list:
    from gradindex.search import GradIndex

    index = GradIndex.open(folder)
    out = []
    for prompt, completion in (("the king of the north", " wrote a book"), ("music by", " the old composer"), ("a red", " river")):
        for opponents in (False, True):
            result = index.query(prompt, completion, k=5, opponents=opponents, candidates="hybrid")
            out.append([(h.row, round(h.score, 6), h.text) for h in result.hits])
    return out


def category(path: str) -> str:
    name = Path(path).name
    for prefix, kind in (("factors", "factors"), ("build.json", "build config"), ("add.json", "pending add"), ("manifest", "manifest"),
                         ("index", "FAISS index"), ("lexical", "TF-IDF"), ("removed", "removed rows")):
        if name.startswith(prefix) or name.startswith(f".{prefix}"):
            return kind
    return "shard record" if name.endswith(".json") else "shard file" if "shards" in path else name


def run(kills: int = 10, ops=OPS, seed: int = 0, log=print) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="gradindex-crash-") as tmp:
        ws = workspace(Path(tmp))
        states: dict[str, Path] = {}
        plan = commands(ws)

        def prepared(op: str, target: Path) -> Path:
            """A copy of the folder ``op`` starts from, at ``target`` (parts for merge)."""
            shutil.rmtree(target, ignore_errors=True)
            start = plan[op][0]
            if start == "parts":
                for part in ("P0", "P1"):
                    shutil.rmtree(ws / part, ignore_errors=True)
                    shutil.copytree(states["parts"] / part, ws / part)
            elif start is not None:
                shutil.copytree(states[start], target)
            return target

        # uninterrupted runs: each operation's expected result, its writes and its duration
        reference = {}
        for op in ("build", "parts", *[o for o in OPS if o != "build"]):
            if op == "parts":
                factors = ["--factors", str(states["build"] / "factors")]
                for i in range(2):
                    gradindex(ws, [*plan["build"][1][:-2], "--out", f"P{i}", "--shard", f"{i}/2", *factors])
                (ws / "parts").mkdir()
                for part in ("P0", "P1"):
                    shutil.copytree(ws / part, ws / "parts" / part)
                states["parts"] = ws / "parts"
                continue
            prepared(op, ws / "X")
            write_log = ws / "writes.log"
            write_log.unlink(missing_ok=True)
            _, seconds = gradindex(ws, plan[op][1], {"GRADINDEX_WRITE_LOG": str(write_log)})
            writes = write_log.read_text().splitlines()
            states[op] = ws / f"after-{op}"
            shutil.copytree(ws / "X", states[op])
            reference[op] = {"snapshot": snapshot(ws / "X"), "answers": answers(ws / "X"), "writes": writes, "seconds": seconds}
            log(f"{op}: {len(writes)} writes, {seconds:.1f} s uninterrupted")

        report = {"kills_per_op": kills, "ops": {}}
        for op in ops:
            ref = reference[op]
            writes = ref["writes"]
            # crash at writes of every kind first (the last write, the manifest, included), then at random ones
            by_kind: dict[str, list[int]] = {}
            for n, path in enumerate(writes, 1):
                by_kind.setdefault(category(path), []).append(n)
            at_writes = [rng.choice(v) for v in by_kind.values()]
            rng.shuffle(at_writes)
            n_writes = min(kills, max((kills + 1) // 2, len(by_kind)))  # every kind of file at least once
            at_writes = (at_writes + rng.sample(range(1, len(writes) + 1), len(writes)))[:n_writes]
            trials = [("write", n) for n in at_writes] + [("instant", rng.uniform(0.5, ref["seconds"])) for _ in range(kills - n_writes)]
            result = {"kills": 0, "resumed": 0, "killed_in": Counter(), "rows_compared": 0, "rows_lost": 0, "rows_duplicated": 0,
                      "files_identical": 0, "answers_identical": 0, "finished_before_kill": 0}
            for how, when in trials:
                for _ in range(4):  # an instant past the end of this run: count it and draw an earlier one
                    prepared(op, ws / "X")
                    write_log = ws / "writes.log"
                    write_log.unlink(missing_ok=True)
                    env = {"GRADINDEX_WRITE_LOG": str(write_log)}
                    if how == "write":
                        env["GRADINDEX_CRASH_AT_WRITE"] = str(when)
                    code, seconds = gradindex(ws, plan[op][1], env, kill_after=when if how == "instant" else None)
                    if code == -signal.SIGKILL or how == "write":
                        break
                    result["finished_before_kill"] += 1
                    when = rng.uniform(0.5, 0.9 * seconds)
                if code != -signal.SIGKILL:
                    continue
                done = write_log.read_text().splitlines() if write_log.exists() else []
                result["kills"] += 1
                result["killed_in"][f"{how}: " + (f"writing {category(done[-1])}" if how == "write" else
                                                  f"after {len(done)} of {len(writes)} writes")] += 1
                gradindex(ws, plan[op][1])  # the same command again, no faults
                result["resumed"] += 1
                got = snapshot(ws / "X")
                expected_rows, rows = Counter(ref["snapshot"]["rows"]), Counter(got["rows"])
                result["rows_compared"] += len(got["rows"])
                result["rows_lost"] += sum((expected_rows - rows).values())
                result["rows_duplicated"] += sum((rows - expected_rows).values())
                same_files = got["files"] == ref["snapshot"]["files"]
                result["files_identical"] += same_files
                if not same_files:
                    differ = sorted(k for k in set(got["files"]) | set(ref["snapshot"]["files"])
                                    if got["files"].get(k) != ref["snapshot"]["files"].get(k))
                    log(f"  {op} after {how} {when}: files differ: {differ[:5]}")
                result["answers_identical"] += answers(ws / "X") == ref["answers"]
            result["killed_in"] = dict(result["killed_in"])
            report["ops"][op] = result
            log(f"{op}: {result}")
        total = {k: sum(r[k] for r in report["ops"].values()) for k in ("kills", "resumed", "rows_compared", "rows_lost",
                                                                       "rows_duplicated", "files_identical", "answers_identical")}
        report["total"] = total
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills per operation")
    parser.add_argument("--ops", default=",".join(OPS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "crash.json")
    args = parser.parse_args()
    started = time.perf_counter()
    report = run(args.kills, args.ops.split(","), args.seed)
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["total"]), f"in {report['seconds']} s ->", args.out)
    bad = report["total"]
    if bad["rows_lost"] or bad["rows_duplicated"] or bad["files_identical"] < bad["kills"] or bad["answers_identical"] < bad["kills"]:
        sys.exit(1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
