"""Stage 1's share of the factored index's misses on the embedded example: the same ``--factor-share 0.75``
index evaluated on the planted facts at k1 = 1,000, 2,000 and every row (stage 2 then sees the whole corpus).

    python -m benchmarks.bench_factor_k1    # writes benchmarks/results/example_factors_k1.json
"""

import json

import torch

from benchmarks.index_common import ROOT, example, fact_and_text_queries
from gradindex import CompressionConfig, GradIndex, build, evaluate, load_model


def main() -> None:
    torch.set_num_threads(2)
    art = example()
    lm = load_model(str(art.model_dir))
    out = ROOT / "indexes" / "example_factors"
    build(lm, art.train_path, out, factors=art.model_dir / "factors", max_length=art.max_length,
          compression=CompressionConfig(factor_share=0.75), chunk=False)
    index = GradIndex.open(out, model=lm)
    queries, result = fact_and_text_queries(art)["fact"], {}
    for k1 in (1000, 2000, index.n):
        r = evaluate(index, queries, k=10, k1=k1, progress=False).to_dict()
        result[k1] = {s: {k: r[s][k] for k in ("recall_at_k", "worst_recall", "stage1_recall")} for s in ("proponents", "opponents")}
        result[k1]["p50"] = r["latency_p50"]
        print(k1, json.dumps(result[k1]), flush=True)
    (ROOT / "benchmarks" / "results" / "example_factors_k1.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
