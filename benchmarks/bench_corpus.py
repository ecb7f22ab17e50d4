"""A 100k-sequence benchmark corpus of real text, built offline, and a tiny GPT-2 trained on it.

    python -m benchmarks.bench_corpus [--cache-dir DIR] [--n-sequences 100000] [--measure]

The text is whatever this machine holds without a download, in this order of preference:

* docstring paragraphs of the Python standard library (PSF licence),
* docstring paragraphs of the packages installed next to this interpreter (``site-packages``:
  torch, scipy, sympy, transformers, scikit-learn, pandas, ...; each under its own licence,
  mostly BSD / MIT / Apache-2.0),
* paragraphs of the English manual pages in ``/usr/share/man/man[1-8]`` (troff stripped crudely;
  the ~16,000 generated ``gcloud`` pages are left out as near-duplicates of one another).

Paragraphs are whitespace-normalised, kept at 80-600 characters when they read like prose, and
deduplicated exactly (the first source in the order above keeps a paragraph). The planted facts of
``examples/planted_facts.jsonl`` are shuffled in exactly as ``examples/example_data.py`` does it
(every template, ``fact_repeats`` times), so the total is ``n_sequences``. Every training row
records its source, for licence notes. A byte-level BPE tokenizer and a 4-layer GPT-2 (as the
example's, trained for about five minutes on one thread) complete the cache.

Two query files come with it, JSONL of ``{"prompt", "completion", "kind", ...}``:

* ``fact_queries.jsonl`` (kind ``"fact"``): the planted facts, subject -> object, whose support in
  the training set is a handful of known sequences;
* ``text_queries.jsonl`` (kind ``"text"``): 40 ordinary training paragraphs cut at a word boundary
  a little past the middle of their first 40 tokens, completion the next 5-8 words, whose support
  is spread thin.

The corpus depends on what is installed here (site-packages and man pages differ between
machines), so ``meta.json`` records its sha256 and per-source counts; a cache is reused when its
settings match, without re-reading the sources.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sys
import sysconfig
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = ROOT / "benchmarks" / ".cache" / "corpus100k"
MAN_ROOT = Path("/usr/share/man")
# Bump when the cache layout or the preparation procedure changes.
FORMAT_VERSION = 1

N_TEXT_QUERIES = 40
FACT_REPEATS = 50
_SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"})
# Generated, near-identical pages (gcloud alone has ~16,600, mostly flag descriptions).
_SKIPPED_MAN_PREFIXES = ("gcloud",)
_MIN_PROSE_FRACTION = 0.75


def import_example_data():
    """``examples/example_data.py``, by path: a wheel's top-level ``examples`` package shadows ours."""
    name = "gradindex_example_data"
    module = sys.modules.get(name)
    if module is not None:
        return module
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "example_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


ed = import_example_data()


@dataclass(frozen=True)
class BenchArtifacts:
    model_dir: Path
    """Model and tokenizer; load with ``AutoModelForCausalLM`` / ``AutoTokenizer``."""
    train_path: Path
    """JSONL, one ``{"text", "source"}`` per training sequence, in training order."""
    fact_queries_path: Path
    """JSONL ``{"prompt", "completion", "kind": "fact", "fact_id"}``, planted facts subject -> object."""
    text_queries_path: Path
    """JSONL ``{"prompt", "completion", "kind": "text", "train_index", "source"}``, corpus continuations."""
    max_length: int
    """Training sequences were truncated to this many tokens."""
    n_sequences: int
    """Rows of ``train_path``."""
    sources_summary: dict[str, int]
    """Training rows per kind of source (stdlib, site-packages, man pages, planted facts)."""


def bench_config(n_sequences: int) -> Any:
    """The example's FULL model, trained on ``n_sequences`` rows for 2,800 steps (about five minutes on one thread)."""
    n_fact_rows = FACT_REPEATS * sum(len(f["templates"]) for f in ed.load_facts())
    # The example's FULL model and optimiser; only the data and the training length differ.
    return replace(
        ed.FULL,
        name="corpus100k",
        corpus_paragraphs=n_sequences - n_fact_rows,
        # The example's 5 copies suffice when it trains 5 epochs over 4,200 rows; here the model
        # sees under half an epoch: 25 copies gave first-token argmax 12% on the fact queries,
        # 50 copies (10,100 short rows, ~2.5% of the tokens) 95%.
        fact_repeats=FACT_REPEATS,
        steps=2800,
        warmup_steps=100,
    )


def prepare_benchmark(cache_dir: str | Path = DEFAULT_CACHE_DIR, n_sequences: int = 100_000) -> BenchArtifacts:
    """Build (or reuse from ``cache_dir``) the benchmark corpus, model, tokenizer and queries."""
    cfg = bench_config(n_sequences)
    final_dir = Path(cache_dir)
    settings = _settings(cfg, n_sequences)
    if _is_complete(final_dir, settings):
        ed._log(f"reusing cached benchmark corpus in {final_dir}")
        return _artifacts(final_dir, cfg)

    ed.build_into_place(final_dir, lambda work_dir: _build(cfg, settings, work_dir), lambda: _is_complete(final_dir, settings))
    return _artifacts(final_dir, cfg)


# ----------------------------------------------------------------------------------------- sources


def corpus_paragraphs() -> tuple[list[str], list[str]]:
    """Distinct prose paragraphs of all sources and, in parallel, the source of each.

    Deterministic for a given machine: sources are read in sorted order and a paragraph seen
    twice keeps its first source.
    """
    texts: list[str] = []
    sources: list[str] = []
    seen: set[str] = set()
    for source, paragraph in _all_paragraphs():
        if paragraph not in seen and _is_prose(paragraph):
            seen.add(paragraph)
            texts.append(paragraph)
            sources.append(source)
    return texts, sources


def _all_paragraphs() -> Iterator[tuple[str, str]]:
    paths = sysconfig.get_paths()
    yield from _docstring_paragraphs(Path(paths["stdlib"]), "stdlib")
    yield from _docstring_paragraphs(Path(paths["purelib"]), "site-packages")
    yield from _man_paragraphs(MAN_ROOT)


def _docstring_paragraphs(root: Path, label: str) -> Iterator[tuple[str, str]]:
    """Module, class and function docstring paragraphs of the ``.py`` files under ``root``."""
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS & set(relative.parts[:-1]):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. invalid escape sequences
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, RecursionError, OSError):
            continue
        source = f"{label}/{relative.as_posix()}"
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    for paragraph in ed.split_paragraphs(docstring):
                        if _fits(paragraph):
                            yield source, paragraph


def _man_paragraphs(root: Path) -> Iterator[tuple[str, str]]:
    """Paragraphs of the English (top-level ``man1``-``man8``) gzip'd manual pages."""
    for section in sorted(root.glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            if path.is_symlink() or not path.name.endswith(".gz") or path.name.startswith(_SKIPPED_MAN_PREFIXES):
                continue
            try:
                text = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            for paragraph in troff_paragraphs(text):
                if _fits(paragraph) and ">>>" not in paragraph:
                    yield str(path), paragraph


# Macros that end a paragraph (man and mdoc), and macros whose arguments are running text.
_BREAK_MACROS = frozenset(
    "PP P LP SH SS TP TQ IP HP sp RS RE SY YS in ti Sh Ss Pp Bl El It Dl Bd Ed".split()
)
_TEXT_MACROS = frozenset("B I BI IB BR RB IR RI SM SB UR UE MT ME Nm Ar Fl Xr Em Pa Cm".split())
_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # string registers
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\\."), "."),
    (re.compile(r"\\e"), r"\\\\"),
    (re.compile(r"\\[&|^%:/,)]"), ""),  # zero-width
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\c$"), ""),
]


def troff_paragraphs(text: str) -> list[str]:
    """Crude man/mdoc -> paragraphs: drop requests, comments and no-fill (code) blocks, strip escapes."""
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(" ".join(current).split()))
            current.clear()

    skip_until: str | None = None
    no_fill = False
    for line in text.splitlines():
        if skip_until is not None:
            if line.startswith(skip_until):
                skip_until = None
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, argument = parts[0], parts[1] if len(parts) > 1 else ""
            if macro in ("de", "de1", "am", "ig"):
                skip_until = ".."
            elif macro in ("nf", "EX"):
                flush()
                no_fill = True
            elif macro in ("fi", "EE"):
                no_fill = False
            elif macro in _BREAK_MACROS:
                flush()
            elif macro in _TEXT_MACROS and not no_fill:
                current.append(_strip_escapes(argument.replace('"', "")))
            continue
        if no_fill:
            continue
        if not line.strip():
            flush()
        else:
            current.append(_strip_escapes(line))
    flush()
    return paragraphs


def _strip_escapes(line: str) -> str:
    for pattern, replacement in _TROFF_ESCAPES:
        line = pattern.sub(replacement, line)
    return line.replace("\\\\", "\\")


def _fits(paragraph: str) -> bool:
    return ed._MIN_PARAGRAPH_CHARS <= len(paragraph) <= ed._MAX_PARAGRAPH_CHARS


def _is_prose(paragraph: str) -> bool:
    """Mostly letters and spaces: drops code, option synopses, URL and cross-reference lists."""
    return sum(c.isalpha() or c == " " for c in paragraph) >= _MIN_PROSE_FRACTION * len(paragraph)


def source_kind(source: str) -> str:
    if source.startswith("planted/"):
        return "planted facts"
    if source.startswith(str(MAN_ROOT)):
        return "man pages"
    return f"{source.split('/', 1)[0]} docstrings"


def source_group(source: str) -> str:
    """Finer grouping for licence notes: the package, man section, or fact."""
    if source.startswith("site-packages/"):
        return "site-packages/" + source.split("/")[1].removesuffix(".py")
    if source.startswith(str(MAN_ROOT)):
        return str(Path(source).parent)
    if source.startswith("planted/"):
        return "planted"
    return source.split("/", 1)[0]


def measure_sources() -> dict[str, dict[str, int]]:
    """Distinct prose paragraphs per source kind and group, before sampling (for choosing sources)."""
    _, sources = corpus_paragraphs()
    return {
        "kinds": dict(Counter(map(source_kind, sources)).most_common()),
        "groups": dict(Counter(map(source_group, sources)).most_common()),
    }


# ------------------------------------------------------------------------------------------- build


def _build(cfg: Any, settings: dict[str, Any], out_dir: Path) -> None:
    started = time.monotonic()
    facts = ed.load_facts()
    paragraphs, sources = corpus_paragraphs()
    ed._log(f"[{cfg.name}] {len(paragraphs)} distinct prose paragraphs ({time.monotonic() - started:.0f}s)")
    if len(paragraphs) < cfg.corpus_paragraphs:
        raise RuntimeError(
            f"only {len(paragraphs)} distinct paragraphs on this machine, {cfg.corpus_paragraphs} needed"
        )
    source_of = dict(zip(paragraphs, sources))
    for fact in facts:
        for template in fact["templates"]:
            source_of[template] = f"planted/{fact['id']}"
    # Sampling, fact planting and shuffling exactly as the example does it.
    texts = ed._training_texts(cfg, paragraphs, facts)
    rows = [{"text": t, "source": source_of[t]} for t in texts]
    summary = dict(Counter(source_kind(r["source"]) for r in rows).most_common())
    groups = dict(Counter(source_group(r["source"]) for r in rows).most_common())
    ed._log(f"[{cfg.name}] {len(texts)} training sequences: {summary}")

    tokenizer = ed.train_tokenizer(texts, cfg.vocab_size, cfg.n_positions)
    ed._log(f"[{cfg.name}] tokenizer vocabulary: {len(tokenizer)} ({time.monotonic() - started:.0f}s)")
    lengths = [len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]]
    fact_queries = [
        {"prompt": f["prompt"], "completion": f["completion"], "kind": "fact", "fact_id": f["id"]} for f in facts
    ]
    text_queries = _text_queries(rows, tokenizer, cfg)

    with ed._torch_threads(1):
        model, train_stats, _ = ed.train_model(cfg, tokenizer, texts, ed.initial_model(cfg, tokenizer))
        sample = random.Random(cfg.seed + 2).sample(texts, 2000)
        results = {
            "num_train_sequences": len(texts),
            "num_distinct_paragraphs_available": len(paragraphs),
            "sources_summary": summary,
            "sources_detail": groups,
            "corpus_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
            "vocab_size": len(tokenizer),
            "tokens_per_sequence": _length_stats(lengths, cfg.max_length),
            **train_stats,
            "sample_loss_2000": round(ed._mean_loss(model, tokenizer, sample, cfg), 4),
            "fact_queries": ed.evaluate_queries(model, tokenizer, fact_queries),
            "text_queries": ed.evaluate_queries(model, tokenizer, text_queries),
        }
    for kind in ("fact_queries", "text_queries"):
        m = results[kind]
        ed._log(
            f"[{cfg.name}] {kind}: first-token argmax {m['first_token_argmax']:.0%}, "
            f"top-5 {m['first_token_top5']:.0%}, mean completion log-prob {m['mean_logprob']:.2f}"
        )

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    ed._write_jsonl(out_dir / "train.jsonl", rows)
    ed._write_jsonl(out_dir / "fact_queries.jsonl", fact_queries)
    ed._write_jsonl(out_dir / "text_queries.jsonl", text_queries)
    results["prepare_seconds"] = round(time.monotonic() - started, 1)
    # meta.json is written last: its presence marks the directory as complete.
    (out_dir / "meta.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))


def _text_queries(rows: list[dict[str, str]], tokenizer: Any, cfg: Any) -> list[dict[str, Any]]:
    """Training paragraphs cut at a word boundary ~60% into their first 40 tokens; completion: next 5-8 words.

    Only paragraphs of at least 40 tokens qualify, so prompt and completion lie inside the
    truncated training sequence, and only cuts where prompt and completion tokenize exactly as the
    training text does (no token spans the boundary).
    """
    rng = random.Random(cfg.seed + 1)
    order = [i for i, row in enumerate(rows) if not row["source"].startswith("planted/")]
    rng.shuffle(order)
    queries = []
    for index in order:
        text = rows[index]["text"]
        ids = tokenizer(text, verbose=False)["input_ids"]
        if len(ids) < 40:
            continue
        head = tokenizer.decode(ids[:40])
        if not text.startswith(head):
            continue
        cut = text.find(" ", int(0.6 * len(head)))
        match = re.match(r"(?: \S+){5,8}", text[cut:]) if cut > 0 else None
        if match is None:
            continue
        prompt, completion = text[:cut], match.group(0)
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion)["input_ids"]
        if prompt_ids + completion_ids != ids[: len(prompt_ids) + len(completion_ids)]:
            continue
        if len(prompt_ids) + len(completion_ids) > cfg.max_length:
            continue
        queries.append(
            {
                "prompt": prompt,
                "completion": completion,
                "kind": "text",
                "train_index": index,
                "source": rows[index]["source"],
            }
        )
        if len(queries) == N_TEXT_QUERIES:
            break
    return queries


def _length_stats(lengths: list[int], max_length: int) -> dict[str, float]:
    ordered = sorted(lengths)
    n = len(ordered)
    clipped = [min(x, max_length) for x in ordered]
    return {
        "mean": round(sum(ordered) / n, 1),
        "p10": ordered[n // 10],
        "median": ordered[n // 2],
        "p90": ordered[9 * n // 10],
        "max": ordered[-1],
        "fraction_truncated": round(sum(x > max_length for x in ordered) / n, 4),
        "mean_after_truncation": round(sum(clipped) / n, 1),
        "total_tokens_after_truncation": sum(clipped),
    }


def _settings(cfg: Any, n_sequences: int) -> dict[str, Any]:
    """Everything the cached artifacts depend on, short of the machine's files; a mismatch forces a rebuild."""
    return {
        "format_version": FORMAT_VERSION,
        "example_format_version": ed.FORMAT_VERSION,
        "n_sequences": n_sequences,
        **asdict(cfg),
        "n_text_queries": N_TEXT_QUERIES,
        "facts_sha256": hashlib.sha256(ed.FACTS_PATH.read_bytes()).hexdigest(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


_REQUIRED = (
    "model/config.json",
    "model/model.safetensors",
    "model/tokenizer.json",
    "model/tokenizer_config.json",
    "train.jsonl",
    "fact_queries.jsonl",
    "text_queries.jsonl",
)


def _is_complete(directory: Path, settings: dict[str, Any]) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("settings") == settings and all((directory / name).is_file() for name in _REQUIRED)


def _artifacts(directory: Path, cfg: Any) -> BenchArtifacts:
    results = json.loads((directory / "meta.json").read_text())["results"]
    return BenchArtifacts(
        model_dir=directory / "model",
        train_path=directory / "train.jsonl",
        fact_queries_path=directory / "fact_queries.jsonl",
        text_queries_path=directory / "text_queries.jsonl",
        max_length=cfg.max_length,
        n_sequences=results["num_train_sequences"],
        sources_summary=results["sources_summary"],
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--n-sequences", type=int, default=100_000)
    parser.add_argument("--measure", action="store_true", help="only count the paragraphs each source offers")
    args = parser.parse_args(argv)
    if args.measure:
        counts = measure_sources()
        for table in ("kinds", "groups"):
            print(f"\n{'source ' + table[:-1]:<48}paragraphs")
            for name, n in list(counts[table].items())[:40]:
                print(f"{name:<48}{n:>10}")
        print(f"{'total':<48}{sum(counts['kinds'].values()):>10}")
        return
    artifacts = prepare_benchmark(args.cache_dir, args.n_sequences)
    results = json.loads((artifacts.model_dir.parent / "meta.json").read_text())["results"]
    for field, value in asdict(artifacts).items():
        if field != "sources_summary":
            print(f"{field}: {value}")
    print("training sequences per source:")
    for name, n in results["sources_summary"].items():
        print(f"  {name:<28}{n:>8}")
    print(f"tokens per sequence: {results['tokens_per_sequence']}")
    print(f"training: {results['train_seconds']}s, {results['steps']} steps, final loss {results['final_train_loss']}")
    print(f"loss on 2000 training sequences: {results['sample_loss_2000']}")
    for kind in ("fact_queries", "text_queries"):
        print(f"{kind}: {results[kind]}")


if __name__ == "__main__":
    main()
