"""Which weights gradindex tracks, and how exactly, on every family it is tested on (the README's family table).

For each family: a random tiny config (``tests/tiny.py``'s ``tiny_family``) in float64, the share of the blocks'
≥ 2-D weights tracked by the default selection and by ``all`` (``layers.coverage``), and the largest relative
error of gradindex's per-sequence gradients of the default layers against autograd through the model's own
forward (each layer's gradient, every sequence: ‖ours − autograd‖ / ‖autograd‖). PEFT-LoRA Llama is a tiny
Llama with random LoRA matrices on q/v/down_proj.

    python benchmarks/bench_families.py [--out benchmarks/results/families.json] [--families llama,mixtral]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gradindex.data import TokenizedSet  # noqa: E402
from gradindex.layers import coverage, select_layers  # noqa: E402
from gradindex.scores import sequence_gradients  # noqa: E402
from tiny import autograd_gradients as autograd, tiny_family  # noqa: E402

DENSE = ["gpt2", "gpt_neox", "llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "falcon", "bloom"]
MOE = ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe", "olmoe", "granitemoe", "phimoe", "deepseek_v2", "ernie4_5_moe"]
FAMILIES = DENSE + MOE + ["peft_lora_llama"]
VOCAB = 50


def make(family: str):
    if family != "peft_lora_llama":
        return tiny_family(family, dtype=torch.float64)
    import peft

    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(tiny_family("llama", dtype=torch.float64), config).get_base_model()


def data(n: int = 4, seed: int = 1) -> TokenizedSet:
    g = torch.Generator().manual_seed(seed)
    return TokenizedSet.training_text([torch.randint(0, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
                                       for _ in range(n)])


def survey(family: str) -> dict:
    started = time.perf_counter()
    model = make(family)
    if hasattr(model.config, "_experts_implementation"):
        model.config._experts_implementation = "eager"  # the grouped kernel has no float64
    default = select_layers(model)
    train = data()
    reference = autograd(model, train, default)

    def error(token_budget: int) -> float:
        ours = sequence_gradients(model, default, train, token_budget=token_budget)
        return max(float((ours[s.name] - reference[s.name]).norm() / reference[s.name].norm())
                   for s in default if reference[s.name].abs().sum() > 0)

    return {
        "family": family,
        "default_share": round(coverage(model, default)["tracked_fraction"], 4),
        "all_share": round(coverage(model, select_layers(model, "all"))["tracked_fraction"], 4),
        "default_layers": len(default),
        "kinds": sorted({d["kind"] for d in coverage(model, default)["layers"]}),
        "max_relative_error": error(8),  # one sequence per batch, as the reference
        "batched_relative_error": error(64),  # padded batches (a float32 router rounds differently by batch shape)
        "seconds": round(time.perf_counter() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "families.json")
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    rows = []
    for family in args.families.split(","):
        try:
            row = survey(family)
        except Exception as e:  # a family this transformers cannot build is reported, not fatal to the survey
            row = {"family": family, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"families": rows, "torch": torch.__version__}, indent=1))
    print("| family | default | all | max rel. error vs autograd (padded batches) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['default_share']:.3f} | {r['all_share']:.3f} | {r['max_relative_error']:.1e} "
              f"({r['batched_relative_error']:.1e}) |" if "error" not in r else f"| {r['family']} | — | — | {r['error']} |")


if __name__ == "__main__":
    main()
