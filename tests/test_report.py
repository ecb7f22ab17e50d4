"""`gradindex report` on a tiny index: what the page says, that it is self-contained, and what a browser draws."""

from __future__ import annotations

import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from gradindex import analysis, pipeline
from gradindex.data import Query
from gradindex.report import display_tokens, render, write_report
from gradindex.search import GradIndex
from tiny import random_texts, tiny_workspace

runner = CliRunner()
N = 120  # ≥ 100: enough for the sparsity analysis
K = 4
PROMPT = 'the king <script>alert("x")</script> of the north'
COMPLETION = " wrote a book & more"
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("report"), random_texts(N, seed=5), twin=False)
    pipeline.fit(str(root / "model"), str(root / "train.jsonl"), out=root / "factors", progress=False)
    result = runner.invoke(app, ["build", str(root / "model"), "--data", str(root / "train.jsonl"), "--out", str(root / "idx"),
                                 "--factors", str(root / "factors"), "--budget", "8K", "--stage1-dim", "64", "--shard-size", "16"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def rendered(ws):
    """The page of an exhaustive query (k1 = k2 = N) with exact whole-set scores, and what went into it."""
    index = GradIndex.open(ws / "idx")
    pro = index.query(PROMPT, COMPLETION, k=K, k1=N, k2=N, per_token=True)
    con = index.query(PROMPT, COMPLETION, k=K, k1=N, k2=N, per_token=True, opponents=True)
    scores = index.all_scores([Query(PROMPT, COMPLETION)])[0]
    sparsity = analysis.sparsity(scores)
    return render(pro, con, sparsity, analysis.share_curve(scores)[1:], note="exact scores"), pro, con, sparsity


@pytest.fixture(scope="module")
def report_file(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "report.html"
    result = runner.invoke(app, ["report", str(ws / "idx"), "--prompt", PROMPT, "--completion", COMPLETION, "--out", str(out), "-k", "6"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    return out


class Node:
    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def find(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        """Descendants of the given tag and/or class, in document order."""
        out = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.attrs.get("class", "").split()):
                out.append(c)
            out += c.find(tag, cls)
        return out

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    VOID = {"meta", "br", "img", "link", "input", "hr", "circle", "line", "polyline"}

    def __init__(self):
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        node = self.stack[-1]
        node.children.append(Node("#text", {}))
        node.children[-1].text = data


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    return builder.root


def rgba(style: str) -> tuple[float, float, float, float]:
    return tuple(float(v) for v in re.search(r"rgba\(([^)]*)\)", style).group(1).split(","))


def test_prompt_and_completion_are_escaped(rendered):
    page, *_ = rendered
    assert "<script" not in page and '&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;' in page
    query = parse(page).find(cls="query")[0]
    assert query.all_text() == PROMPT + COMPLETION
    assert query.find("mark")[0].all_text() == COMPLETION


def test_page_is_self_contained(rendered):
    page, *_ = rendered
    for external in ("http://", "https://", "src=", "<link", "@import", "url("):
        assert external not in page


@pytest.mark.parametrize("side", ["proponents", "opponents"])
def test_each_sequence_has_a_token_heat_map_and_layer_bars_that_add_up(rendered, side):
    page, pro, con, _ = rendered
    result = pro if side == "proponents" else con
    section = [s for s in parse(page).find("section") if s.attrs["id"] == side][0]
    cards = section.find("li", "hit")
    assert [int(c.attrs["data-row"]) for c in cards] == [h.row for h in result.hits] and len(cards) == K
    tolerance = dict(rel=1e-3)
    seen_signs = set()
    for card, hit in zip(cards, result.hits):
        scale = max(abs(s) for s in hit.token_scores)
        spans = card.find("span", "tok")
        assert len(spans) == len(hit.tokens) and "".join(s.all_text() for s in spans).strip() == hit.text
        titles = [float(s.attrs["title"]) for s in spans]
        assert sum(titles) == pytest.approx(hit.score, abs=1e-4 * scale * len(titles), **tolerance)
        for span, score in zip(spans, titles):
            r, g, _, alpha = rgba(span.attrs["style"])
            assert alpha == pytest.approx(0.85 * abs(score) / scale, abs=2e-3)
            if abs(score) > 0.05 * scale:
                assert (r > g) == (score > 0), (span.attrs, score)
                seen_signs.add(score > 0)
        values = [float(layer.attrs["title"].rsplit(": ", 1)[1]) for layer in card.find("div", "layer")]
        assert len(values) == len(hit.per_layer) and sum(values) == pytest.approx(hit.score, **tolerance)
        assert card.find(cls="score")[0].all_text() == f"{hit.score:+.4g}"
    assert seen_signs == {True, False}, "the tiny model's sequences mix supporting and opposing tokens"


def test_sparsity_shares_and_curve_match_the_analysis(rendered):
    page, _, _, sparsity = rendered
    section = [s for s in parse(page).find("section") if s.attrs["id"] == "sparsity"][0]
    shares = {float(td.attrs["data-fraction"]): td.all_text() for td in section.find("td", "share")}
    assert shares == {f: f"{100 * s:.1f} %" for f, s in sparsity.top_share.items()}
    assert f"α = {sparsity.tail_exponent:.2f}" in section.all_text() and "exact scores" in section.all_text()
    points = [tuple(map(float, p.split(","))) for p in section.find("polyline", "curve")[0].attrs["points"].split()]
    ys = [p[1] for p in points]
    assert ys == sorted(ys, reverse=True), "a cumulative share only rises (y grows downwards)"
    assert points[0][0] < points[-1][0] and ys[-1] == min(ys), "ends at 100 % of the sequences carrying 100 %"


def test_curve_of_a_large_set_stays_small(rendered):
    _, pro, _, _ = rendered
    scores = np.random.default_rng(0).standard_cauchy(1_000_000)
    page = render(pro, None, analysis.sparsity(scores), analysis.share_curve(scores)[1:])
    points = parse(page).find("polyline", "curve")[0].attrs["points"].split()
    assert len(points) <= 400 and len(page) < 200_000
    assert "0.0001 %" in page, "the log axis reaches down to 1/N"


def test_render_without_opponents_or_sparsity():
    from gradindex.search import Hit, QueryResult

    hit = Hit(row=3, score=-2.0, approx_score=-1.5, stage1_score=0.1, text="a b", source="/data/x.jsonl", offset=3,
              per_layer={"h.0.mlp": -2.0}, tokens=None, token_scores=None)
    page = render(QueryResult("p", " c", False, [hit]), None, None, None, note="Sparsity skipped: too few")
    tree = parse(page)
    assert [s.attrs["id"] for s in tree.find("section")] == ["proponents", "sparsity"]
    assert "Sparsity skipped: too few" in page and not tree.find("svg") and tree.find(cls="tokens")[0].all_text() == "a b"


def test_whitespace_markers_become_whitespace():
    assert display_tokens(["Hello", "Ġworld", "Ċ", "ĠĠx"]) == ["Hello", " world", "↵\n", "  x"]
    assert display_tokens(["▁Hello", "▁wor", "ld", "<0x0A>"]) == [" Hello", " wor", "ld", "↵\n"]
    assert display_tokens(["the", "king"], marked=False) == ["the", " king"]


def test_report_without_enough_rows_for_sparsity_says_so(ws, tmp_path, monkeypatch):
    index = GradIndex.open(ws / "idx")
    monkeypatch.setattr(index, "n", 99)
    path = write_report(index, "the king", " wrote a book", tmp_path / "r.html", k=2, k1=20, k2=10)
    page = path.read_text()
    assert "Sparsity skipped" in page and "<svg" not in page and len(parse(page).find("li", "hit")) == 4


def test_cli_writes_a_complete_report(report_file):
    page = report_file.read_text()
    assert page.endswith("</html>\n") and len(parse(page).find("li", "hit")) == 12
    assert "estimated from exact scores of" in page.lower()
    assert os.listdir(report_file.parent) == ["report.html"]


@pytest.mark.parametrize("case", ["missing index", "empty prompt"])
def test_cli_bad_input_gets_one_line_and_writes_nothing(ws, tmp_path, case):
    index, prompt = (tmp_path / "nope", "the king") if case == "missing index" else (ws / "idx", "  ")
    out = tmp_path / "r.html"
    result = runner.invoke(app, ["report", str(index), "--prompt", prompt, "--completion", " wrote", "--out", str(out)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not out.exists()


def test_browser_draws_the_heat_map(report_file, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    if not CHROMIUM.exists():
        if os.environ.get("GRADINDEX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} not found and GRADINDEX_REQUIRE_BROWSER=1")
        pytest.skip(f"no browser at {CHROMIUM} to screenshot the report with")
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1600",
                    f"--screenshot={shot}", report_file.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    pixels = np.asarray(image).astype(int)
    assert len(np.unique(pixels.reshape(-1, 3) @ [65536, 256, 1])) > 200, "a nearly blank page"
    r, g, b = pixels[:, :760].reshape(-1, 3).T  # left of the layer bars: the token text
    # Light enough to be a translucent fill on white, not the darker red/green of the scores' text.
    red = np.sum((r > 200) & (r - g > 60) & (r - b > 60))
    green = np.sum((g > 150) & (g - r > 40) & (g - b > 20))
    # Without token colours this page has ~550 of each (legend swatches, text edges); with them, thousands.
    assert red > 3000 and green > 3000, (red, green)


def test_copies_of_a_sentence_share_one_card():
    from gradindex.search import Hit, QueryResult

    hit = Hit(row=3, score=2.0, approx_score=1.5, stage1_score=0.1, text="a b", source="x.jsonl", offset=3,
              per_layer={"h.0.mlp": 2.0}, copies=[8, 11])
    cards = parse(render(QueryResult("p", " c", False, [hit]), None, None, None)).find("li", "hit")
    assert len(cards) == 1 and "×3 copies (also rows 8, 11)" in cards[0].all_text()
