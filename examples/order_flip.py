"""The paper's order-flip check on the example (Grosse et al. 2023 §5.3): every planted fact is stated only
subject-first in training ("The capital of Zorbania is Quellport."). How much do those sentences influence
the model completing the fact the other way round ("Quellport is the capital of" → " Zorbania.")?

For each fact, exact EK-FAC influence of every training sequence on the forward query (A → B) and on the
reverse one (B → A). Reported per direction: the mean influence of the fact's own sentences, as a multiple
of the typical |influence| of the rest of the training set on that query (so queries of different scale
compare), and the share of the query's top 10 that are the fact's own sentences.

    python examples/order_flip.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import ROOT, example_index  # noqa: E402
from example_data import load_facts  # noqa: E402
from gradindex import Query  # noqa: E402
from gradindex.evaluation import top_rows  # noqa: E402


def order_flip(index, facts: list[dict], k: int = 10) -> dict:
    """Influence of each fact's subject-first sentences on its forward and its reverse query."""
    forward = index.all_scores([Query(f["prompt"], f["completion"]) for f in facts])
    reverse = index.all_scores([Query(f["reverse_prompt"], f["reverse_completion"]) for f in facts])
    texts = np.array(index.reader.rows(np.arange(index.n), ("text",))["text"], dtype=object)
    per_fact = []
    for i, fact in enumerate(facts):
        own = np.isin(texts, fact["templates"])
        row = {"fact": fact["id"], "sentences": int(own.sum())}
        for name, scores in (("forward", forward[i]), ("reverse", reverse[i])):
            typical = np.median(np.abs(scores[~own]))
            row[f"{name}_mean"] = float(scores[own].mean())
            row[f"{name}_relative"] = float(scores[own].mean() / typical)
            row[f"{name}_top{k}_own"] = float(own[top_rows(scores, k)].mean())
        per_fact.append(row)

    def summary(key):
        return float(np.median([r[key] for r in per_fact]))

    return {
        "facts": len(facts),
        "k": k,
        "median_forward_relative": summary("forward_relative"),
        "median_reverse_relative": summary("reverse_relative"),
        "median_reverse_over_forward": float(np.median([r["reverse_mean"] / r["forward_mean"] for r in per_fact])),
        f"mean_forward_top{k}_own": float(np.mean([r[f"forward_top{k}_own"] for r in per_fact])),
        f"mean_reverse_top{k}_own": float(np.mean([r[f"reverse_top{k}_own"] for r in per_fact])),
        "per_fact": per_fact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller variant used by the tests")
    parser.add_argument("--cache", default=str(ROOT / "examples" / ".cache"))
    parser.add_argument("--index", default=None, help="index folder (default: indexes/example[-quick])")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the numbers here")
    args = parser.parse_args()
    example, index = example_index(args.quick, args.cache, args.index)
    facts = load_facts()
    present = {json.loads(line)["fact_id"] for line in example.queries_path.read_text().splitlines()}
    result = order_flip(index, [f for f in facts if f["id"] in present])
    k = result["k"]
    print(f"{result['facts']} planted facts, each stated only subject-first in training\n")
    print(f"{'':34s}{'forward (A→B)':>15s}{'reverse (B→A)':>15s}")
    print(f"{'own sentences / typical |I|':34s}{result['median_forward_relative']:15.1f}{result['median_reverse_relative']:15.1f}   (median over facts)")
    print(f"{f'own sentences in the top {k}':34s}{result[f'mean_forward_top{k}_own']:15.0%}{result[f'mean_reverse_top{k}_own']:15.0%}   (mean over facts)")
    print(f"\nreverse / forward mean influence of the own sentences: {result['median_reverse_over_forward']:.3f} (median)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
