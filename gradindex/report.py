"""One self-contained HTML page of a query's influence, after the figures of Grosse et al. 2023: the top
proponents and opponents with token-wise heat maps and per-layer bars, and how concentrated the
influence is over the whole training set. Inline CSS and SVG only, so the file can be mailed or archived."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from html import escape
from pathlib import Path

import numpy as np

from . import analysis
from .analysis import Sparsity
from .data import Query
from .errors import GradIndexError
from .files import write_text
from .options import QueryOptions
from .search import GradIndex, Hit, QueryResult

RED, GREEN = (220, 38, 38), (22, 163, 74)  # supports / opposes the completion
MAX_OPACITY = 0.85  # the strongest token stays readable under its colour
MIN_SPARSITY_ROWS = 100  # analysis.sparsity refuses fewer
# How byte-level BPE (GPT-2: Ġ Ċ ĉ) and SentencePiece (▁, byte fallback <0x0A>) tokenizers spell whitespace.
WHITESPACE = {"Ġ": " ", "Ċ": "\n", "ĉ": "\t", "▁": " ", "<0x0A>": "\n", "<0x09>": "\t"}
LEGEND = (f'<span class="sw" style="background:rgba{(*RED, MAX_OPACITY)}"></span> supports the completion (positive influence) '
          f'&nbsp; <span class="sw" style="background:rgba{(*GREEN, MAX_OPACITY)}"></span> opposes it (negative). '
          "Token opacity ∝ |token score| / max |token score| within that sequence; layer bars ∝ |layer score| / max within it. "
          "Token scores sum to the sequence's score; hover a token for its value.")

MEANING = {"proponents": "raise the completion's log-probability", "opponents": "lower it"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:26px 0 8px}h2 small{font-weight:400;color:#656d76}
.card{background:#fff;border:1px solid #d8dee4;border-radius:8px;padding:10px 14px;margin:0 0 8px}
.query{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;font-size:14px}
.query mark{background:#fde68a;border-radius:3px;padding:1px 0}
.legend{color:#656d76;font-size:12.5px;margin:8px 0 0}.sw{display:inline-block;width:11px;height:11px;border-radius:2px;vertical-align:-1px}
ol.hits{list-style:none;padding:0;margin:0}
.head{display:flex;gap:12px;align-items:baseline;margin-bottom:6px}.rank{font-weight:700;color:#656d76}
.score{font-weight:700;font-variant-numeric:tabular-nums}.pos{color:#b91c1c}.neg{color:#15803d}
.meta{color:#656d76;font-size:12.5px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.body{display:flex;gap:18px}.tokens{flex:1;min-width:0;font:12.5px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px}
.layers{width:310px;flex:none;font-size:10.5px;line-height:13px}.layer{display:grid;grid-template-columns:105px 1fr 64px;gap:6px;align-items:center}
.layer .name{font-family:ui-monospace,monospace;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;color:#656d76}
.track{background:#eef0f3;height:7px;border-radius:2px}.bar{display:block;height:7px;border-radius:2px}
.layer .value{text-align:right;font-variant-numeric:tabular-nums}
.sparsity{display:flex;gap:24px;align-items:flex-start}.shares td,.shares th{padding:2px 10px 2px 0;text-align:left;font-weight:400}
.shares td{font-weight:700;font-variant-numeric:tabular-nums}.note{color:#656d76;font-size:12.5px}
"""


def render(proponents: QueryResult, opponents: QueryResult | None, sparsity: Sparsity | None,
           curve: tuple[np.ndarray, np.ndarray] | None, *, title: str = "gradindex report", note: str = "") -> str:
    """The page as one string. ``curve``: (fraction of sequences, share of Σ|I|) from
    :func:`analysis.share_curve`; ``note`` is shown with the sparsity section (say where its scores came from)."""
    hits = proponents.hits + (opponents.hits if opponents else [])
    marked = any(m in t for h in hits for t in h.tokens or () for m in WHITESPACE)
    body = [f'<h1>{escape(title)}</h1><div class="card"><div class="query">{escape(proponents.prompt)}'
            f'<mark>{escape(proponents.completion)}</mark></div><p class="legend">{LEGEND}</p></div>',
            _hits_section("proponents", proponents, marked)]
    if opponents is not None:
        body.append(_hits_section("opponents", opponents, marked))
    body.append(_sparsity_section(sparsity, curve, note))
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body><main>{"".join(body)}</main></body></html>\n')


def write_report(index: GradIndex, prompt: str, completion: str, out: Path, *, options: QueryOptions | None = None,
                 exact_sparsity: bool = False, sparsity_sample: int = analysis.DEFAULT_SAMPLE, **overrides) -> Path:
    """:func:`report_page` written to ``out``."""
    out = Path(out)
    if out.is_dir():
        raise GradIndexError(f"--out {out} is a folder; give a file name such as {out / 'report.html'}")
    page = report_page(index, prompt, completion, options=options, exact_sparsity=exact_sparsity, sparsity_sample=sparsity_sample, **overrides)
    write_text(out, page)
    return out


def report_page(index: GradIndex, prompt: str, completion: str, *, options: QueryOptions | None = None, exact_sparsity: bool = False,
                sparsity_sample: int = analysis.DEFAULT_SAMPLE, **overrides) -> str:
    """Query the index for proponents and opponents (``options`` and/or its fields as keywords; the page
    always shows distinct texts with token scores), measure the sparsity of the influence, render the page."""
    options = replace(QueryOptions.of(options, **overrides), per_token=True, distinct=True)
    proponents, opponents = (index.query(prompt, completion, options=replace(options, opponents=side), trace=True) for side in (False, True))
    sparsity = curve = None
    damping = {"damping": options.damping, "damping_scale": options.damping_scale}
    if index.n < MIN_SPARSITY_ROWS:
        note = f"Sparsity skipped: the index holds {index.n} sequences, the analysis needs at least {MIN_SPARSITY_ROWS}."
    else:
        if exact_sparsity:
            scores, weights = index.all_scores([Query(prompt, completion)], **damping)[0], None
            scores = scores[~np.isnan(scores)]  # removed rows
            note = f"Exact: EK-FAC influence of all {index.n} sequences."
        else:
            scores, weights = analysis.estimated_influence(index, [proponents, opponents], sparsity_sample, **damping)
            note = (f"Estimated from exact scores of {len(scores)} sequences: the {int(np.sum(weights == 1))} the two queries "
                    "rescored stand for themselves, a uniform sample of the others for the rest (--exact-sparsity scores every sequence).")
        sparsity, curve = analysis.sparsity(scores, weights=weights), analysis.share_curve(scores, weights)[1:]
    return render(proponents, opponents, sparsity, curve, title=f"gradindex report · {index.root.name}", note=note)


def cards(result: QueryResult) -> str:
    """One result's cards as the report draws them (heat-mapped tokens, layer bars): the search page shows these."""
    marked = any(m in t for h in result.hits for t in h.tokens or () for m in WHITESPACE)
    return _hits_section("opponents" if result.opponents else "proponents", result, marked)


def display_tokens(tokens: list[str], marked: bool = True) -> list[str]:
    """Tokens as the text they stand for. A tokenizer that marks no whitespace (word-level) gets a space
    before every token but the first; newlines show as ↵ so that their colour stays visible."""
    out = []
    for i, token in enumerate(tokens):
        for marker, text in WHITESPACE.items():
            token = token.replace(marker, text)
        out.append((token if marked or i == 0 else " " + token).replace("\n", "↵\n"))
    return out


def _hits_section(kind: str, result: QueryResult, marked: bool) -> str:
    drawn = "".join(_card(position, hit, marked) for position, hit in enumerate(result.hits, 1))
    return f'<section id="{kind}"><h2>Top {kind} <small>· {MEANING[kind]}</small></h2><ol class="hits">{drawn}</ol></section>'


def _card(position: int, hit: Hit, marked: bool) -> str:
    sign = "pos" if hit.score >= 0 else "neg"
    meta = f'row {hit.row} · {escape(Path(hit.source).name)} @ {hit.offset}{f" token {hit.start}" if hit.start else ""} · stage-2 estimate {hit.approx_score:+.4g}'
    if hit.copies:  # copies of one sentence share a card
        shown = ", ".join(map(str, hit.copies[:5])) + (", …" if len(hit.copies) > 5 else "")
        meta = f'<b>×{len(hit.copies) + 1} copies</b> (also rows {shown}) · ' + meta
    return (f'<li class="card hit" data-row="{hit.row}"><div class="head"><span class="rank">#{position}</span>'
            f'<span class="score {sign}">{hit.score:+.4g}</span><span class="meta" title="{escape(hit.source)}">{meta}</span></div>'
            f'<div class="body"><div class="tokens">{_tokens(hit, marked)}</div>{_layer_bars(hit.per_layer)}</div></li>')


def _tokens(hit: Hit, marked: bool) -> str:
    if hit.tokens is None or hit.token_scores is None:
        return escape(hit.text)
    scale = max((abs(s) for s in hit.token_scores), default=0.0) or 1.0
    return "".join(f'<span class="tok" style="background:{_rgba(RED if s > 0 else GREEN, MAX_OPACITY * abs(s) / scale)}" '
                   f'title="{s:+.6g}">{escape(text)}</span>'
                   for text, s in zip(display_tokens(hit.tokens, marked), hit.token_scores))


def _layer_bars(per_layer: dict[str, float]) -> str:
    if not per_layer:
        return ""
    common = os.path.commonprefix([name.split(".")[:-1] for name in per_layer])  # drop the shared "transformer.h." etc.
    scale = max(abs(v) for v in per_layer.values()) or 1.0
    rows = "".join(f'<div class="layer" title="{escape(name)}: {v:+.6g}"><span class="name">{escape(".".join(name.split(".")[len(common):]))}</span>'
                   f'<span class="track"><span class="bar" style="width:{100 * abs(v) / scale:.1f}%;background:{_rgba(RED if v > 0 else GREEN, MAX_OPACITY)}">'
                   f'</span></span><span class="value">{v:+.4g}</span></div>' for name, v in per_layer.items())
    return f'<div class="layers">{rows}</div>'


def _sparsity_section(sparsity: Sparsity | None, curve: np.ndarray | None, note: str) -> str:
    parts = [f'<p class="note">{escape(note)}</p>' if note else ""]
    if sparsity is not None:
        rows = "".join(f'<tr><th>top {100 * f:g} % of sequences ({_count(f, sparsity.n)} of {sparsity.n})</th>'
                       f'<td class="share" data-fraction="{f!r}">{100 * s:.1f} %</td></tr>' for f, s in sparsity.top_share.items())
        parts.append(f'<div class="sparsity">{_curve_svg(curve, sparsity) if curve is not None else ""}<div><p>Share of the total |influence| '
                     f'carried by the most influential sequences:</p><table class="shares">{rows}</table><p>Power-law tail: |influence| ∝ '
                     f'rank<sup>−α</sup> with <b>α = {sparsity.tail_exponent:.2f}</b> (fitted over ranks 10 … N/10).</p></div></div>')
    return f'<section id="sparsity"><h2>How concentrated is the influence?</h2><div class="card">{"".join(parts)}</div></section>'


def _curve_svg(curve: tuple[np.ndarray, np.ndarray], sparsity: Sparsity, width: int = 560, height: int = 280) -> str:
    """Cumulative share (y) against the fraction of sequences taken, most influential first (x, log scale)."""
    n, (left, right, top, bottom) = sparsity.n, (44, 24, 12, 40)
    taken, share = (np.r_[0.0, c] for c in curve)
    lo = min(-1.0, math.log10(1 / n))

    def x(f: float) -> float:
        return left + (math.log10(f) - lo) / -lo * (width - left - right)

    def y(s: float) -> float:
        return top + (1 - s) * (height - top - bottom)

    counts = np.unique(np.geomspace(1, n, 400).round().astype(int))  # a few hundred points whatever N is
    line = " ".join(f"{x(c / n):.1f},{y(v):.1f}" for c, v in zip(counts, np.interp(counts / n, taken, share)))
    uniform = " ".join(f"{x(c / n):.1f},{y(c / n):.1f}" for c in counts)
    grid = [f'<line x1="{left}" x2="{width - right}" y1="{y(s):.1f}" y2="{y(s):.1f}" stroke="#eef0f3"/>'
            f'<text x="{left - 6}" y="{y(s) + 4:.1f}" text-anchor="end">{100 * s:g} %</text>' for s in (0, 0.25, 0.5, 0.75, 1)]
    grid += [f'<line x1="{x(10.0 ** e):.1f}" x2="{x(10.0 ** e):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eef0f3"/>'
             f'<text x="{x(10.0 ** e):.1f}" y="{height - bottom + 16}" text-anchor="middle">{100 * 10.0 ** e:g} %</text>'
             for e in range(math.ceil(lo), 1)]
    at_count: dict[int, list[float]] = {}  # on a small set several fractions round to the same count
    for f in sparsity.top_share:
        at_count.setdefault(_count(f, n), []).append(f)
    marks = []
    for count, fractions in at_count.items():
        share = sparsity.top_share[fractions[0]]
        cx, cy = x(count / n), y(share)
        # Above-left of a point stays clear of a rising curve (markers are a decade apart: labels stay short
        # so they never meet); at the y axis there is no room on the left.
        tx, ty, anchor = (cx - 6, cy - 6, "end") if cx - left > 45 else (cx + 6, max(cy - 12, top + 10), "start")
        marks.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="4" fill="#b91c1c"><title>top {", ".join(f"{100 * f:g} %" for f in fractions)} '
                     f'of sequences</title></circle><text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" fill="#b91c1c" stroke="#fff" '
                     f'stroke-width="3" paint-order="stroke" font-weight="600">{100 * share:.1f} %</text>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-size="11" fill="#656d76" role="img">'
            f'{"".join(grid)}<polyline points="{uniform}" fill="none" stroke="#9aa4b0" stroke-dasharray="4 3"/>'
            f'<polyline class="curve" points="{line}" fill="none" stroke="#1f2328" stroke-width="2"/>{"".join(marks)}'
            f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">fraction of training sequences, '
            f'most influential first (log scale; dashed: equal influence)</text></svg>')


def _count(fraction: float, n: int) -> int:
    """How many sequences the top ``fraction`` is: where analysis.sparsity reads the share."""
    return max(1, int(round(fraction * n)))


def _rgba(rgb: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({rgb[0]}, {rgb[1]}, {rgb[2]}, {alpha:.3f})"
