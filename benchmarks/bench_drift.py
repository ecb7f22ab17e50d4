"""Does ``add``'s factor drift say when the factors are stale? Added sets of known kinds, each scored exactly
with the built rows' factors and with factors refitted on all rows.

    python -m benchmarks.bench_drift [--out benchmarks/results/drift.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from gradindex import CompressionConfig, Query, pipeline

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [Query("the king of the north", " wrote a book"), Query("music by", " the old composer"), Query("a red river", " of blue"),
           Query("zebra", " zebra")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "drift.json")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("tiny", ROOT / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    root = tiny.tiny_workspace(Path(tempfile.mkdtemp(prefix="gradindex-drift-")), tiny.random_texts(400, seed=3), [], twin=False)
    texts = [json.loads(line)["text"] for line in (root / "train.jsonl").read_text().splitlines()]

    def jsonl(name: str, rows: list[str]) -> Path:
        (root / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
        return root / name

    base = texts[:300]
    stale = pipeline.fit(str(root / "model"), jsonl("base.jsonl", base), progress=False)
    alternating = [" ".join(["king", "queen"] * 5) + f" {i}" for i in range(100)]
    sets = {"same distribution": texts[300:], "same words, 2-3x longer": tiny.random_texts(100, seed=9, lo=20, hi=40),
            "half same, half two words alternating": texts[300:350] + alternating[:50], "two words alternating": alternating,
            "one unknown word repeated": ["zebra " * 30 + str(i) for i in range(100)]}
    report = {}
    for i, (name, added) in enumerate(sets.items()):
        index = root / f"idx{i}"
        pipeline.build(str(root / "model"), root / "base.jsonl", index, factors=stale, compression=CompressionConfig(budget=8192), progress=False)
        drift = pipeline.add(index, jsonl(f"added{i}.jsonl", added), progress=False).additions[-1].drift
        refit = pipeline.fit(str(root / "model"), jsonl(f"all{i}.jsonl", base + added), progress=False)
        old, new = (pipeline.score(str(root / "model"), f, root / f"all{i}.jsonl", QUERIES, progress=False).scores for f in (stale, refit))
        overlap = float(np.mean([len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])) / 10 for a, b in zip(old, new)]))
        rho = float(np.mean([spearmanr(a, b)[0] for a, b in zip(old, new)]))
        report[name] = {"drift": drift, "top10_overlap_stale_vs_refit": overlap, "spearman_stale_vs_refit": rho}
        print(f"{name}: drift {drift:.2f}, top-10 overlap {overlap:.2f}, Spearman {rho:.3f}", flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
