"""Time gradindex against kronfluence on the same model, data, layers, threads and batch sizes.

    python -m benchmarks.bench_kronfluence --n-train 2000 --n-queries 16 --token-budget 8192,2048

Times (best of ``--repeat``) gradindex ``fit_factors`` vs kronfluence ``fit_all_factors`` (EK-FAC, true
Fisher) and gradindex ``compute_scores`` vs kronfluence ``compute_pairwise_scores`` (damping
0.1 × mean Λ), then reports the ratios and how well the two tools' scores agree, as a markdown table.

The model is the example GPT-2 (``examples.example_data.prepare_example``) when it can be prepared,
else (or with ``--model tiny``) a tiny GPT-2 trained here for a few seconds on a bigram chain.
Both tools get the same torch thread count and the same batch size in tokens: gradindex a token budget,
kronfluence ``budget // max_length`` sequences per batch. kronfluence runs in one or both of two data
modes: ``trimmed`` (rows sorted longest first and every batch cut to its longest row, which is what
gradindex's batch planner does) and ``fixed`` (every row padded to the maximum length, the plain Dataset).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from benchmarks.kronfluence_ref import (  # noqa: E402
    factors_from_kronfluence,
    kronfluence_fit,
    kronfluence_scores,
    make_analyzer,
    markov_texts,
    train_briefly,
)
from gradindex.data import Query, load_queries, tokenize_queries, tokenize_texts  # noqa: E402
from gradindex.fitting import fit_factors  # noqa: E402
from gradindex.layers import select_layers  # noqa: E402
from gradindex.scores import compute_scores  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_example_data():
    """The project's ``examples/example_data.py``.

    Loaded by file path when ``import examples`` resolves elsewhere: kronfluence's wheel installs a
    top-level ``examples`` package into site-packages, and a regular package there wins over the
    project's ``examples/`` folder while that folder has no ``__init__.py``.
    """
    import importlib
    import importlib.util

    path = ROOT / "examples" / "example_data.py"
    try:
        module = importlib.import_module("examples.example_data")
        if Path(module.__file__).resolve() == path:
            return module
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("gradindex_example_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def load_example(args):
    """(model, tokenizer, train texts, queries, max_length, description) of the example, or None."""
    try:
        prepare_example = import_example_data().prepare_example
    except Exception as e:  # noqa: BLE001
        log(f"example data unavailable ({type(e).__name__}: {e}); using a tiny model")
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        art = prepare_example(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    except Exception as e:  # noqa: BLE001
        log(f"prepare_example failed ({type(e).__name__}: {e}); using a tiny model")
        return None
    tokenizer = AutoTokenizer.from_pretrained(art.model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(art.model_dir, dtype=torch.float32).eval()
    texts = [json.loads(line)["text"] for line in Path(art.train_path).read_text().splitlines() if line.strip()]
    queries = load_queries(art.queries_path)
    n_params = sum(p.numel() for p in model.parameters())
    desc = f"example GPT-2 ({model.config.n_layer} blocks, d={model.config.n_embd}, {n_params / 1e6:.1f} M params)"
    return model, tokenizer, texts, queries, art.max_length, desc


def load_tiny(args):
    from tiny import WORDS, tiny_model, word_tokenizer

    tokenizer = word_tokenizer()
    model = tiny_model("gpt2", width=args.tiny_width, layers=args.tiny_layers, vocab=len(tokenizer), seed=0)
    train_briefly(model, tokenize_texts(tokenizer, markov_texts(WORDS, 2000, seed=0), 64), steps=200, lr=1e-2)
    texts = markov_texts(WORDS, args.n_train, seed=1, lo=8, hi=64)
    qs = markov_texts(WORDS, args.n_queries, seed=2, lo=6, hi=12)
    queries = [Query(" ".join(t.split()[:3]), " " + " ".join(t.split()[3:])) for t in qs]
    desc = f"tiny GPT-2 trained here ({args.tiny_layers} blocks, d={args.tiny_width})"
    return model.eval(), tokenizer, texts, queries, 64, desc


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy.stats import spearmanr

    rho = [spearmanr(x, y)[0] for x, y in zip(a, b)]
    return float(np.median(rho)), float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["example", "tiny"], default="example")
    ap.add_argument("--cache-dir", default=None, help="prepare_example cache (default: its own)")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-queries", type=int, default=16)
    ap.add_argument("--token-budget", default="8192",
                    help="tokens per batch for both tools; a comma list measures each (e.g. 8192,2048)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=1, help="report the best of this many runs of each timing")
    ap.add_argument("--modules", default="mlp", help="gradindex select_layers argument")
    ap.add_argument("--kron-modes", default="trimmed,fixed", help="comma list of trimmed,fixed")
    ap.add_argument("--tiny-width", type=int, default=64)
    ap.add_argument("--tiny-layers", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args(argv)
    modes = [m for m in args.kron_modes.split(",") if m]
    assert set(modes) <= {"trimmed", "fixed"} and modes, "--kron-modes takes trimmed and/or fixed"
    budgets = [int(b) for b in str(args.token_budget).split(",") if b]

    torch.set_num_threads(args.threads)
    loaded = load_example(args) if args.model == "example" else None
    model, tokenizer, texts, queries, max_length, desc = loaded or load_tiny(args)
    pad = tokenizer.pad_token_id
    if len(texts) < args.n_train:
        log(f"only {len(texts)} training texts available")
    train = tokenize_texts(tokenizer, texts[: args.n_train], max_length)
    query_set = tokenize_queries(tokenizer, list(queries)[: args.n_queries], max_length)
    layers = select_layers(model, args.modules)
    names = [s.name for s in layers]
    log(f"{desc}; {len(train)} train sequences ({train.n_tokens} tokens), {len(query_set)} queries, "
        f"{len(layers)} layers, {args.threads} threads, budgets {budgets} tokens")

    # Runs are interleaved (per repeat: every budget, gradindex then each kronfluence mode) so that a
    # machine whose load changes over time slows both tools alike; each timing is the best of the repeats.
    times: dict[str, list[float]] = {}
    refs, ours = {}, {}
    kws = {m: dict(trim=m == "trimmed", sort_by_length=m == "trimmed", length=None if m == "trimmed" else max_length) for m in modes}

    def timed(key, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - t0)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        analyzers = {(b, m): make_analyzer(model, names, Path(tmp) / f"{b}-{m}") for b in budgets for m in modes}
        for rep in range(args.repeat):
            for b in budgets:
                kf_batch = max(1, b // max_length)
                factors = timed(f"{b}/gradindex/fit", lambda: fit_factors(
                    model, train, layers, token_budget=b, seed=0, progress=False))
                ours[b] = timed(f"{b}/gradindex/score", lambda: compute_scores(
                    model, factors, train, query_set, token_budget=b, progress=False)).scores.astype(np.float64)
                log(f"[{rep + 1}/{args.repeat}] budget {b}: gradindex fit {times[f'{b}/gradindex/fit'][-1]:.2f}s, "
                    f"scores {times[f'{b}/gradindex/score'][-1]:.2f}s")
                for m in modes:
                    an = analyzers[(b, m)]
                    timed(f"{b}/{m}/fit", lambda: kronfluence_fit(model, names, train, pad, tmp, kf_batch, seed=1, analyzer=an, **kws[m]))
                    refs[(b, m)] = timed(f"{b}/{m}/score", lambda: kronfluence_scores(
                        an, train, query_set, pad, train_batch_size=kf_batch, query_batch_size=len(query_set), **kws[m]))
                    log(f"[{rep + 1}/{args.repeat}] budget {b}: kronfluence[{m}, {kf_batch} seqs] fit "
                        f"{times[f'{b}/{m}/fit'][-1]:.2f}s, scores {times[f'{b}/{m}/score'][-1]:.2f}s")

        rows, raw = [], {"times": times}
        for b in budgets:
            for m in modes:
                ref = refs[(b, m)]
                spearman, pearson = agreement(ours[b], ref)
                same = compute_scores(model, factors_from_kronfluence(analyzers[(b, m)], "ekfac", layers), train, query_set,
                                      token_budget=b, progress=False).scores.astype(np.float64)
                large = np.abs(ref) > 0.01 * np.abs(ref).max(axis=1, keepdims=True)
                rel = float((np.abs(same - ref) / np.abs(ref))[large].max())
                best = {k: min(times[f"{b}/{k}"]) for k in ("gradindex/fit", "gradindex/score", f"{m}/fit", f"{m}/score")}
                raw[f"{b}/{m}"] = {"spearman": spearman, "pearson": pearson, "same_factors_rel_err": rel, **best}
                rows.append((b, m, best["gradindex/fit"], best[f"{m}/fit"], best["gradindex/score"], best[f"{m}/score"], spearman, pearson, rel))

    print(f"\n{desc}: {len(train)} training sequences ({train.n_tokens} tokens, ≤ {max_length}), {len(query_set)} queries, "
          f"{len(layers)} tracked layers ({args.modules}), float32, {args.threads} torch threads, best of {args.repeat}. "
          f"Batch: gradindex a token budget, kronfluence budget // {max_length} sequences.\n")
    print("| batch (tokens) | kronfluence data | gradindex fit | kronfluence fit | fit ratio | gradindex scores | kronfluence scores "
          "| score ratio | median Spearman | Pearson | same-factor max rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b, m, g_fit, k_fit, g_score, k_score, spearman, pearson, rel in rows:
        print(f"| {b} | {m} | {g_fit:.2f} s | {k_fit:.2f} s | {g_fit / k_fit:.2f}× | {g_score:.2f} s | {k_score:.2f} s | "
              f"{g_score / k_score:.2f}× | {spearman:.4f} | {pearson:.5f} | {rel:.1e} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"description": desc, "args": vars(args), **raw}, indent=2))


if __name__ == "__main__":
    main()
