"""`gradindex serve` as users run it: a real server subprocess on a free loopback port, every endpoint, every bad
request, auth on and off, answers equal to the in-process API, concurrent clients batched, and SIGTERM."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from gradindex import pipeline
from gradindex.data import Query
from gradindex.search import GradIndex
from served import ROOT, Server
from tiny import build_args, random_texts, tiny_workspace

runner = CliRunner()
TEXTS = random_texts(46, seed=21)
TEXTS += [TEXTS[3], TEXTS[3]]  # three rows hold one text: /rows lists the copies
QUERIES = [Query("the king of the north", " wrote a book"), Query("music by", " the old composer"), Query("a small", " bridge")]
TOKEN = "correct-horse-battery"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tiny_workspace(tmp_path_factory.mktemp("serve"), TEXTS, twin=False)
    pipeline.fit(str(root / "model"), str(root / "train.jsonl"), out=root / "factors", progress=False)
    result = runner.invoke(app, build_args(root, root / "idx"))
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def server(ws):
    s = Server(ws / "idx")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def locked(ws):
    s = Server(ws / "idx", env={"GRADINDEX_TOKEN": TOKEN})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def index(ws):
    return GradIndex.open(ws / "idx")


def same_answer(served: dict, local) -> None:
    """Equal answers: the same rows in the same order with the same copies; scores equal to float32 rounding
    (a batch's padding changes the arithmetic's rounding, never the answer)."""
    assert [h["row"] for h in served["hits"]] == [h.row for h in local.hits]
    assert [h["copies"] for h in served["hits"]] == [h.copies for h in local.hits]
    np.testing.assert_allclose([h["score"] for h in served["hits"]], [h.score for h in local.hits], rtol=1e-5, atol=1e-6)
    assert [h["text"] for h in served["hits"]] == [h.text for h in local.hits]


@pytest.mark.parametrize("options", [{"k": 4, "per_token": True, "distinct": True, "k2": 15}, {"k": 3, "opponents": True, "candidates": "hybrid"}])
def test_one_pass_for_many_queries_answers_each_as_alone(index, options):
    """The server's batching in Python: one capture, one FAISS search, one rescoring of the union of shortlists."""
    together = index.query_many(QUERIES + QUERIES[:1], **options)  # a repeated query too
    for q, r in zip(QUERIES + QUERIES[:1], together):
        alone = index.query(q.prompt, q.completion, **options)
        same_answer(r.to_dict(), alone)
        for a, b in zip(r.hits, alone.hits):
            assert a.per_layer.keys() == b.per_layer.keys()
            np.testing.assert_allclose(list(a.per_layer.values()), list(b.per_layer.values()), rtol=1e-4, atol=1e-4)
            if options.get("per_token"):
                assert a.tokens == b.tokens
                np.testing.assert_allclose(a.token_scores, b.token_scores, rtol=1e-4, atol=1e-4)


def test_health_info_and_page(server, index):
    assert server.call("/health") == (200, {"status": "ok", "rows": len(TEXTS)})
    status, info = server.call("/info")
    assert status == 200 and info["rows"] == len(TEXTS) and info["generation"] == index.manifest.generation
    assert info["summary"] == index.manifest.summary(index.root) and info["limits"]["max_k"] == 100
    status, page = server.call("/")
    assert status == 200 and '<form class="ask" id="ask">' in page and "http://" not in page.replace(server.url, "")  # offline: no external resource
    status, spec = server.call("/openapi.json")
    assert status == 200 and {"/query", "/query_many", "/rows/{row}", "/info", "/health", "/cards", "/report"} <= set(spec["paths"])
    assert "completion" in spec["paths"]["/query"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert server.call("/docs")[0] == 200


@pytest.mark.parametrize("options", [{"k": 4}, {"k": 3, "opponents": True, "cosine": True}, {"k": 3, "per_token": True, "distinct": True, "k2": 20}])
def test_query_equals_the_python_api_and_the_cli_json(server, index, ws, options):
    q = QUERIES[0]
    status, served = server.call("/query", {"prompt": q.prompt, "completion": q.completion, **options})
    assert status == 200, served
    same_answer(served, index.query(q.prompt, q.completion, **options))
    flags = [f"--{name.replace('_', '-')}" if value is True else f"--{name} {value}" for name, value in options.items()]
    cli = runner.invoke(app, ["query", str(ws / "idx"), "--prompt", q.prompt, "--completion", q.completion, "--json", *" ".join(flags).split()])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout.strip().splitlines()[-1])
    assert set(printed) == set(served) and printed["hits"][0].keys() == served["hits"][0].keys()
    same_answer(printed, index.query(q.prompt, q.completion, **options))


def test_query_many_and_concurrent_clients_equal_sequential_answers(server, index):
    body = {"queries": [{"prompt": q.prompt, "completion": q.completion} for q in QUERIES], "k": 5}
    status, many = server.call("/query_many", body)
    assert status == 200 and len(many["results"]) == len(QUERIES)
    alone = [index.query(q.prompt, q.completion, k=5) for q in QUERIES]
    for served, local in zip(many["results"], alone):
        same_answer(served, local)
    before = server.call("/info")[1]["batching"]
    answers: dict[int, dict] = {}

    def client(i: int) -> None:
        q = QUERIES[i % len(QUERIES)]
        answers[i] = server.call("/query", {"prompt": q.prompt, "completion": q.completion, "k": 5})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (status, served) in answers.items():
        assert status == 200, served
        same_answer(served, alone[i % len(QUERIES)])
    after = server.call("/info")[1]["batching"]
    assert after["answered"] - before["answered"] == 12
    assert after["passes"] - before["passes"] < 12, "concurrent requests were never batched into one pass"


def test_rows_give_the_whole_text_and_its_copies(server):
    status, row = server.call("/rows/3")
    assert status == 200 and row["text"] == TEXTS[3] and row["offset"] == 3 and row["copies"] == [46, 47]
    assert server.call("/rows/46")[1]["copies"] == [3, 47]
    assert server.call("/rows/5")[1]["copies"] == []
    for bad in ("/rows/48", "/rows/-1"):
        status, answer = server.call(bad)
        assert status == 404 and "no row" in answer["error"]
    status, answer = server.call("/rows/abc")
    assert status == 400 and "integer" in answer["error"]


def test_cards_and_report_share_the_report_rendering(server):
    q = QUERIES[0]
    status, drawn = server.call("/cards", {"prompt": q.prompt, "completion": q.completion, "k": 3, "per_token": True})
    assert status == 200 and drawn["html"].count('<li class="card hit"') == 3 and 'class="tok"' in drawn["html"]
    assert [f'data-row="{h["row"]}"' in drawn["html"] for h in drawn["result"]["hits"]] == [True] * 3
    status, page = server.call("/report", {"prompt": q.prompt, "completion": q.completion, "k": 2})
    assert status == 200 and page.startswith("<!doctype html>") and page.count('<li class="card hit"') == 4


BAD = {
    "malformed JSON": (b'{"prompt": ', 400, "not valid JSON"),
    "not an object": ([1, 2], 400, "must be a JSON object"),
    "unknown field": ({"prompt": "a", "completion": " b", "topk": 3}, 400, "unknown field 'topk'"),
    "missing completion": ({"prompt": "a"}, 400, "missing field 'completion'"),
    "empty completion": ({"prompt": "a", "completion": ""}, 400, "empty completion"),
    "text not a string": ({"prompt": 3, "completion": " b"}, 400, "must be text"),
    "k zero": ({"prompt": "a", "completion": " b", "k": 0}, 400, "k must be a positive"),
    "k over the limit": ({"prompt": "a", "completion": " b", "k": 101}, 400, "at most 100"),
    "k over the rows": ({"prompt": "a", "completion": " b", "k": 60}, 400, "exceeds the 48 sequences"),
    "k2 over the limit": ({"prompt": "a", "completion": " b", "k2": 10**6}, 400, "at most 10000"),
    "bool as text": ({"prompt": "a", "completion": " b", "opponents": "yes"}, 400, "opponents must be true or false"),
    "bad candidates": ({"prompt": "a", "completion": " b", "candidates": "all"}, 400, "candidates must be one of"),
    "per-token k": ({"prompt": "a", "completion": " b", "per_token": True, "k": 30}, 400, "at most 20 results with token scores"),
    "old rank": ({"prompt": "a", "completion": " b", "rank": 4}, 400, "rank= is gone"),
    "too long": ({"prompt": "a" * 20_001, "completion": " b"}, 400, "at most 20000"),
    "too big": (b"{" + b" " * (1 << 20) + b"}", 413, "over 1048576 bytes"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_a_4xx_and_one_line(server, case):
    body, code, message = BAD[case]
    status, answer = server.call("/query", raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert status == code and isinstance(answer, dict) and set(answer) == {"error"}, answer
    assert message in answer["error"] and "\n" not in answer["error"] and "Traceback" not in answer["error"]
    assert server.call("/health")[0] == 200  # and the server goes on


@pytest.mark.bad_input
@pytest.mark.parametrize("body, message", [({"queries": []}, "non-empty list"), ({"queries": [{"prompt": "a"}]}, "exactly 'prompt' and 'completion'"),
                                           ({"queries": [{"prompt": "a", "completion": " b"}] * 65}, "at most 64"), ({}, "non-empty list")])
def test_bad_query_many_requests(server, body, message):
    status, answer = server.call("/query_many", body)
    assert status == 400 and message in answer["error"]


def test_a_bad_query_fails_alone_in_a_shared_pass(server, index):
    answers = {}

    def client(i, body):
        answers[i] = server.call("/query", body)

    good = {"prompt": QUERIES[1].prompt, "completion": QUERIES[1].completion, "k": 4}
    bodies = [good, {"prompt": "a", "completion": " b", "k": 60}, good, {"prompt": "x " * 200, "completion": " y"}]
    threads = [threading.Thread(target=client, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers[1][0] == 400 and answers[3][0] == 400 and "longer than the maximum length" in answers[3][1]["error"]
    for i in (0, 2):
        assert answers[i][0] == 200
        same_answer(answers[i][1], index.query(good["prompt"], good["completion"], k=4))


def test_auth_on(locked):
    q = {"prompt": QUERIES[0].prompt, "completion": QUERIES[0].completion, "k": 2}
    for path, body in (("/query", q), ("/info", None), ("/rows/1", None), ("/query_many", {"queries": [q]})):
        for token in (None, "wrong"):
            status, answer = locked.call(path, body, token=token)
            assert status == 401 and "bearer token" in answer["error"], (path, token)
        assert locked.call(path, body, token=TOKEN)[0] in (200, 400), path
    assert locked.call("/query", q, token=TOKEN)[0] == 200
    assert locked.call("/health")[0] == 200 and locked.call("/")[0] == 200  # no index content: the page asks for the token


def test_cli_query_through_the_server(locked, ws):
    args = ["query", "--server", locked.url, "--prompt", QUERIES[0].prompt, "--completion", QUERIES[0].completion, "-k", "3"]
    local = runner.invoke(app, ["query", str(ws / "idx"), *args[3:]])
    served = runner.invoke(app, [*args, "--token", TOKEN])
    assert served.exit_code == 0 and local.exit_code == 0
    strip = lambda out: [line.split(": top ")[0] if " → " in line else line for line in out.strip().splitlines()]  # noqa: E731 - ms differ
    assert strip(served.stdout) == strip(local.stdout)
    as_json = runner.invoke(app, [*args, "--json"], env={"GRADINDEX_TOKEN": TOKEN})
    assert as_json.exit_code == 0 and [h["row"] for h in json.loads(as_json.stdout)["hits"]] == [int(line.split("row ")[1].split()[0])
                                                                                                  for line in strip(local.stdout)[1:]]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and refused.stderr.strip().count("\n") == 0 and "bearer token" in refused.stderr
    both = runner.invoke(app, ["query", str(ws / "idx"), *args[1:]])
    assert both.exit_code == 2 and "give no INDEX" in both.stderr


@pytest.mark.bad_input
def test_cli_query_without_a_server_is_one_line(tmp_path):
    result = runner.invoke(app, ["query", "--server", "http://127.0.0.1:9", "--prompt", "a", "--completion", " b"])
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot reach the server at http://127.0.0.1:9")


@pytest.mark.bad_input
def test_a_public_host_needs_a_token(ws):
    result = subprocess.run([sys.executable, "-m", "cli.main", "serve", str(ws / "idx"), "--host", "0.0.0.0", "--port", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(ws)})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == ["error: --host 0.0.0.0 is reachable from other machines: give --token (or set "
                                                  "GRADINDEX_TOKEN) to require a bearer token"]


def test_sigterm_stops_it_cleanly(ws):
    s = Server(ws / "idx", "--max-batch", "1")
    assert s.call("/health")[0] == 200
    assert s.stop() == 0


def test_a_browser_searches_from_the_page(server, index, tmp_path):
    """Real headless Chromium: type a query, submit, wait for the cards; heat-mapped tokens, scores, a row's dialog."""
    import os

    from browser import CHROMIUM, Browser

    Image = pytest.importorskip("PIL.Image")
    if not CHROMIUM.exists():
        if os.environ.get("GRADINDEX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{CHROMIUM} not found and GRADINDEX_REQUIRE_BROWSER=1")
        pytest.skip(f"no browser at {CHROMIUM}")
    q = QUERIES[0]
    local = index.query(q.prompt, q.completion, k=4, per_token=True, distinct=True)
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/")
        assert browser.search(q.prompt, q.completion, k=4) == 4
        assert browser.evaluate("[...document.querySelectorAll('li.hit')].map(e => +e.dataset.row)") == [h.row for h in local.hits]
        assert browser.evaluate("[...document.querySelectorAll('li.hit .score')].map(e => e.textContent)") == [f"{h.score:+.4g}" for h in local.hits]
        coloured = browser.evaluate("[...document.querySelectorAll('li.hit span.tok')].filter(e => /rgba\\(.*, 0\\.[1-9]/.test(e.style.background)).length")
        assert coloured >= 4, "no heat-mapped tokens"
        assert browser.evaluate("document.getElementById('status').textContent").startswith("4 results in ")
        shot = browser.screenshot(tmp_path / "page.png")
        browser.evaluate("document.querySelector('li.hit').click()")
        assert browser.wait_for("document.getElementById('row').open && document.getElementById('row-text').textContent") == local.hits[0].text
    finally:
        browser.close()
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    r, g, b = pixels[:, :760].reshape(-1, 3).T
    red, green = np.sum((r > 200) & (r - g > 60) & (r - b > 60)), np.sum((g > 150) & (g - r > 40) & (g - b > 20))
    assert red + green > 1500, (red, green)  # translucent token fills drawn, not only text
