"""The search page ``gradindex serve`` shows at ``/``: a form, and the results drawn by the report's own card
rendering (``report.cards``, fetched from ``/cards``) under its CSS and legend. No external resources: it
works offline and behind a firewall. With a token, the page asks for it once and sends it as a bearer header."""

from __future__ import annotations

from html import escape

from .report import CSS, LEGEND

PAGE_CSS = """
form.ask{display:grid;grid-template-columns:1fr 1fr;gap:8px 12px;align-items:end}
form.ask label{display:flex;flex-direction:column;font-size:12.5px;color:#656d76;gap:3px}
form.ask textarea{font:13px ui-monospace,monospace;min-height:54px;padding:6px;border:1px solid #d8dee4;border-radius:6px;resize:vertical}
.controls{grid-column:1/3;display:flex;gap:14px;align-items:center;flex-wrap:wrap}
.controls input[type=number]{width:60px}
button{font:inherit;padding:5px 14px;border-radius:6px;border:1px solid #1f2328;background:#1f2328;color:#fff;cursor:pointer}
button.plain{background:#fff;color:#1f2328}
#status{color:#656d76;font-size:12.5px;min-height:18px;margin:8px 0}
#status.error{color:#b91c1c}.warn{background:#fff7e6;border-color:#f5c26b}
li.hit{cursor:pointer}li.hit:hover{border-color:#8c959f}
dialog{max-width:900px;width:90%;border:1px solid #d8dee4;border-radius:8px}dialog pre{white-space:pre-wrap;font:12.5px/1.6 ui-monospace,monospace}
"""

SCRIPT = r"""
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem("gradindex-token") || "";
async function call(path, body) {
  for (;;) {
    const headers = {"Content-Type": "application/json"};
    if (token) headers["Authorization"] = "Bearer " + token;
    const r = await fetch(path, body === undefined ? {headers} : {method: "POST", headers, body: JSON.stringify(body)});
    if (r.status === 401) {
      const given = prompt("This server needs its access token:");
      if (!given) throw new Error("no access token given");
      token = given; sessionStorage.setItem("gradindex-token", token); continue;
    }
    if (!r.ok) { let m = r.statusText; try { m = (await r.json()).error || m; } catch (e) {} throw new Error(m); }
    return r;
  }
}
function request() {
  return {prompt: $("prompt").value, completion: $("completion").value, k: parseInt($("k").value, 10),
          opponents: $("opponents").checked, per_token: true, distinct: true};
}
function status(text, error) { $("status").textContent = text; $("status").className = error ? "error" : ""; }
$("ask").addEventListener("submit", async (event) => {
  event.preventDefault();
  status("asking…"); $("results").innerHTML = ""; $("note").hidden = true;
  try {
    const started = performance.now();
    const answer = await (await call("/cards", request())).json();
    $("results").innerHTML = answer.html;
    if (answer.result.uncertain) { $("note").textContent = "Note: " + answer.result.note; $("note").hidden = false; }
    status(`${answer.result.hits.length} results in ${Math.round(performance.now() - started)} ms. Click one to read it whole.`);
    $("download").hidden = false;
  } catch (e) { status(e.message, true); }
});
$("results").addEventListener("click", async (event) => {
  const card = event.target.closest("li.hit");
  if (!card) return;
  try {
    const row = await (await call("/rows/" + card.dataset.row)).json();
    $("row-title").textContent = `row ${row.row} · ${row.source} @ ${row.offset}` + (row.start ? ` token ${row.start}` : "");
    $("row-text").textContent = row.text;
    $("row-copies").textContent = row.copies.length ? `${row.copies.length} other rows hold this text: ${row.copies.join(", ")}` : "No other row holds this text.";
    $("row").showModal();
  } catch (e) { status(e.message, true); }
});
$("download").addEventListener("click", async () => {
  status("writing the report (both sides and the sparsity estimate)…");
  try {
    const blob = await (await call("/report", {prompt: $("prompt").value, completion: $("completion").value, k: request().k})).blob();
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = "gradindex-report.html"; a.click();
    status("report downloaded");
  } catch (e) { status(e.message, true); }
});
"""


def search_page(name: str, rows: int, k: int) -> str:
    """The page, for an index called ``name`` holding ``rows`` sequences, with ``k`` results by default."""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>gradindex · {escape(name)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}{PAGE_CSS}</style></head><body><main>'
            f'<h1>gradindex · {escape(name)} <small class="note">{rows:,} training sequences</small></h1>'
            '<div class="card"><form class="ask" id="ask">'
            '<label>prompt<textarea id="prompt" required placeholder="The capital of Zorbania is"></textarea></label>'
            '<label>completion (whose log-probability is explained)<textarea id="completion" required placeholder=" Quellport."></textarea></label>'
            f'<div class="controls"><label><span><input type="checkbox" id="opponents"> opponents (sequences that lower it)</span></label>'
            f'<label><span>k <input type="number" id="k" min="1" value="{k}"></span></label>'
            '<button type="submit" id="submit">Search</button><button type="button" class="plain" id="download" hidden>Download report</button>'
            f'</div></form><p class="legend">Score: how much up-weighting that training sequence would change log p(completion | prompt) '
            f'(EK-FAC influence). {LEGEND}</p></div>'
            '<div id="status" role="status"></div><div class="card warn" id="note" hidden></div><div id="results"></div>'
            '<dialog id="row"><h2 id="row-title"></h2><pre id="row-text"></pre><p class="note" id="row-copies"></p>'
            '<form method="dialog"><button>Close</button></form></dialog>'
            f'</main><script>{SCRIPT}</script></body></html>\n')
