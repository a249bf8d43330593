"""The feature dashboard: one page script that renders feature results either from data embedded
in a self-contained HTML file (`write_dashboard`, for sharing; plotly.js inlined, opens offline) or
from the local server of `interp.serve`, which answers the same data on demand and adds a prompt
box and a steering box.

The index (`#`, or `#r1` for the second of several coders) lists the features that fired, a page
of rows at a time, searchable by token text and sortable by density, largest activation and the
token they fire most on; `#f123` (`#r1/f123`) is feature 123's page: its top contexts and samples
by activation quantile (tokens shaded by activation, hover for the value), its activation
histogram and its logit lens. A transcoder's page says what the feature reads (the contexts its
encoder fires on, at the input hook) and what it writes (its decoder direction through the
unembedding, at the output hook). After rendering, the page sets `data-rendered` on <body>
("index", "feature-123", "prompt", "steer-123"); a script error sets `data-error` instead, which
is what the browser tests check.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from plotly.offline import get_plotlyjs

from interp.atomic import write_text
from interp.errors import BadInput
from interp.features import FeatureResults
from interp.hooks import written_hook

DASHBOARD_FILE = "dashboard.html"
PAGE_ROWS = 100


def _round(x: float) -> float:
    return float(f"{x:.4g}")


def dashboard_title(results: FeatureResults) -> str:
    coder = results.coder_info
    return f"{coder['arch']} coder on {coder['model']} {written_hook(coder['hook'], coder['target_hook'])}"


def index_data(results: FeatureResults, features: list[int] | None = None) -> dict:
    """What the index renders: per feature that fired (of `features`, default all) its density,
    largest activation, the tokens it fires most on and its logit-lens top tokens, as columns,
    with the texts of the tokens used."""
    density, max_n = results.density_n, results.max_n
    fired = (density > 0).nonzero().squeeze(1).tolist()
    ids = fired if features is None else sorted(set(fired) & set(features))
    centers = results.center_tokens_nk[ids].tolist() if ids else []
    tops = results.tensors["top_values_nk"][ids].tolist() if ids else []
    top_tokens = [[t for t, _ in Counter(c for c, v in zip(row, vals) if v > 0).most_common(3)] for row, vals in zip(centers, tops)]
    lens = results.tensors["lens_top_ids_nt"][ids, :5].tolist() if results.has_logit_lens and ids else None
    used = {t for row in top_tokens for t in row} | {t for row in lens or [] for t in row}
    coder = results.coder_info
    return {
        "title": dashboard_title(results), "coder": coder, "n_tokens": results.n_tokens, "n_latents": results.n_latents,
        "reads": coder["hook"], "writes": written_hook(coder["hook"], coder["target_hook"]),
        "transcoder": coder["target_hook"] is not None, "hist_edges": [float(e) for e in results.histogram(0)[0]],
        "ids": ids, "density": [_round(float(density[f])) for f in ids], "max": [round(float(max_n[f]), 3) for f in ids],
        "top_tokens": top_tokens, "lens": lens, "vocab": {t: results.vocab[t] for t in sorted(used)},
    }


def feature_data(results: FeatureResults, feature: int, top_contexts: int = 10, per_quantile: int = 3) -> dict:
    """What a feature's page renders: its numbers, top contexts, sampled contexts by quantile,
    logit lens and histogram, with the texts of the tokens used."""
    results.check(feature)
    used: set[int] = set()

    def pack(contexts):
        for c in contexts:
            used.update(c.token_ids)
        return [[c.token_ids, [round(a, 3) for a in c.acts], c.center, round(c.value, 3)] for c in contexts]

    fires = int(results.tensors["fires_n"][feature])
    lens = results.logit_lens(feature)
    counts = results.tensors["hist_nb"][feature]
    nz = counts.nonzero().squeeze(1)
    entry = {
        "id": feature, "density": float(results.density_n[feature]), "max": round(float(results.max_n[feature]), 3),
        "mean": round(float(results.tensors["act_sum_n"][feature]) / max(fires, 1), 3),
        "top": pack(results.top_contexts(feature, top_contexts)),
        "quantiles": [[label, pack(cs)] for label, cs in results.quantile_contexts(feature, per_quantile)],
        "lens_top": [[t, round(v, 2)] for t, v in lens[0]] if lens else None,
        "lens_bottom": [[t, round(v, 2)] for t, v in lens[1]] if lens else None,
        "hist": [int(nz[0]), counts[nz[0] : nz[-1] + 1].tolist()] if len(nz) else [0, []],
    }
    entry["vocab"] = {t: results.vocab[t] for t in sorted(used)}
    return entry


def parse_features(text: str, results: FeatureResults) -> list[int]:
    """Which features a subset names: ranges and ids ('0-99', '3,17,200-210') or the N densest
    ('top100')."""
    n = results.n_latents
    if text.startswith("top"):
        try:
            count = int(text[3:])
        except ValueError:
            count = 0
        if count < 1:
            raise BadInput(f"--features top<N> needs a positive N, like top100; got {text!r}")
        return results.density_n.argsort(descending=True, stable=True)[:count].tolist()
    chosen: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise BadInput(f"--features takes ids and ranges like 0-99,150 or top<N>; got {text!r}") from None
        if not 0 <= lo <= hi < n:
            raise BadInput(f"--features {part!r} is outside the coder's latents 0 to {n - 1}")
        chosen.extend(range(lo, hi + 1))
    return chosen


def write_dashboard(results: FeatureResults, path: str | Path, features: list[int] | None = None,
                    top_contexts: int = 10, per_quantile: int = 3) -> Path:
    """One self-contained HTML file of `features` (default every feature that fired)."""
    index = index_data(results, features)
    index["features"] = {str(f): feature_data(results, f, top_contexts, per_quantile) for f in index["ids"]}
    # One table of token texts for the whole file, not one per feature.
    for entry in index["features"].values():
        index["vocab"].update(entry.pop("vocab"))
    path = Path(path)
    write_text(path, page_html(index["title"], {"runs": [index]}))
    return path


def page_html(title: str, data: dict | None) -> str:
    """The page: with `data` self-contained (plotly.js and the data inlined); without, it asks
    the server that serves it (`/plotly.js`, `/api/...`)."""
    if data is None:
        scripts = '<script src="/plotly.js"></script>'
    else:
        # JSON inside <script> must not close the element early.
        payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
        scripts = f'<script>{get_plotlyjs()}</script>\n<script type="application/json" id="data">{payload}</script>'
    return _PAGE.replace("{title}", html.escape(title)).replace("{scripts}", scripts).replace("{script}", _SCRIPT)


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script>
window.onerror = function (msg) { document.body.dataset.error = String(msg); };
window.addEventListener('unhandledrejection', function (e) { document.body.dataset.error = String(e.reason); });
</script>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
a { color: #1f5fa8; text-decoration: none; } input, select, button { margin: 0 6px 6px 0; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0; padding: 3px; border-left: 3px solid #ddd; }
.ctx span { border-radius: 2px; } .ctx .center { outline: 1px solid #b00; }
.val { color: #777; font-size: 80%; margin-right: 8px; } .lens span { margin-right: 10px; font-family: ui-monospace, monospace; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; } .muted { color: #777; } .box { background: #f6f7f9; padding: 8px; margin: 8px 0; }
.gen { font-family: ui-monospace, monospace; white-space: pre-wrap; width: 45%; vertical-align: top; }
</style></head>
<body>
<h2 id="title">{title}</h2><div id="root">loading</div>
{scripts}
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
const EMBEDDED = document.getElementById('data') ? JSON.parse(document.getElementById('data').textContent) : null;
const root = document.getElementById('root');
const vocab = {};
const indexes = {};
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function tok(id) { return (vocab[id] ?? '?').replace(/\n/g, '\u21b5'); }
async function api(path, body) {
  const r = await fetch(path, body === undefined ? {} : {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
async function runs() { return EMBEDDED ? EMBEDDED.runs.map(r => r.title) : (await api('/api/runs')).map(r => r.title); }
async function index(r) {
  if (!indexes[r]) indexes[r] = EMBEDDED ? EMBEDDED.runs[r] : await api(`/api/runs/${r}/index`);
  Object.assign(vocab, indexes[r].vocab); return indexes[r];
}
async function featureData(r, id) {
  let f;
  if (EMBEDDED) f = EMBEDDED.runs[r].features[id] ?? null;
  else { const res = await fetch(`/api/runs/${r}/features/${id}`); f = res.status === 404 ? null : await res.json(); }
  if (f && f.vocab) Object.assign(vocab, f.vocab);
  return f;
}
function context(c, max) {
  const [ids, acts, center, value] = c; const div = el('div', undefined, 'ctx');
  div.appendChild(el('span', value.toFixed(2), 'val'));
  ids.forEach((id, i) => {
    const s = el('span', tok(id)); const a = max > 0 ? Math.min(acts[i] / max, 1) : 0;
    if (acts[i] > 0) { s.style.background = `rgba(220,40,40,${0.15 + 0.85 * a})`; s.title = acts[i].toFixed(3); }
    if (i === center) s.className = 'center';
    div.appendChild(s);
  });
  return div;
}
function lens(title, pairs) {
  const d = el('div', undefined, 'lens'); d.appendChild(el('b', title + ': '));
  (pairs || []).forEach(([t, v]) => d.appendChild(el('span', JSON.stringify(t) + ' ' + v)));
  if (!pairs) d.appendChild(el('span', 'not available for this hook', 'muted'));
  return d;
}
function link(r, id, text) { const a = el('a', text ?? String(id)); a.href = `#r${r}/f${id}`; return a; }
async function runList(current) {
  const titles = await runs();
  if (titles.length < 2) return;
  const p = el('p', 'Coders: ');
  titles.forEach((t, i) => { const a = el(i === current ? 'b' : 'a', t); if (i !== current) a.href = `#r${i}`; p.appendChild(a); p.appendChild(el('span', ' \u00b7 ')); });
  root.appendChild(p);
}
async function showIndex(r, prompt) {
  const D = await index(r);
  root.replaceChildren(); document.getElementById('title').textContent = D.title;
  await runList(r);
  if (!EMBEDDED) promptBox(r, prompt);
  root.appendChild(el('p', `${D.ids.length.toLocaleString()} of ${D.n_latents.toLocaleString()} features fired on ${D.n_tokens.toLocaleString()} tokens. Click a feature for its page.`));
  const filter = el('input'); filter.placeholder = 'search token text'; filter.id = 'search';
  const sort = el('select'); sort.id = 'sort';
  [['density', 'density'], ['max', 'max activation'], ['top', 'top token'], ['id', 'feature id']].forEach(([v, t]) => { const o = el('option', t); o.value = v; sort.appendChild(o); });
  const prev = el('button', '\u2190'); const next = el('button', '\u2192'); const where = el('span', '', 'muted');
  [filter, sort, prev, next, where].forEach(e => root.appendChild(e));
  const text = D.ids.map((_, i) => (D.top_tokens[i].map(tok).join(' ') + ' ' + (D.lens ? D.lens[i].map(tok).join(' ') : '')).toLowerCase());
  const table = el('table'); root.appendChild(table);
  let page = 0, rows = [];
  function order() {
    const q = filter.value.toLowerCase();
    rows = D.ids.map((_, i) => i).filter(i => !q || text[i].includes(q));
    const key = sort.value;
    const first = i => D.top_tokens[i].length ? tok(D.top_tokens[i][0]) : '\uffff';
    if (key === 'density') rows.sort((a, b) => D.density[b] - D.density[a]);
    else if (key === 'max') rows.sort((a, b) => D.max[b] - D.max[a]);
    else if (key === 'top') rows.sort((a, b) => first(a).localeCompare(first(b)));
    page = 0; draw();
  }
  function draw() {
    table.replaceChildren();
    const head = el('tr'); ['feature', 'density', 'max act', 'fires most on', 'logit lens top'].forEach(h => head.appendChild(el('th', h))); table.appendChild(head);
    rows.slice(page * ROWS, (page + 1) * ROWS).forEach(i => {
      const tr = el('tr'); const td = el('td'); td.appendChild(link(r, D.ids[i])); tr.appendChild(td);
      tr.appendChild(el('td', D.density[i].toExponential(2))); tr.appendChild(el('td', D.max[i].toFixed(2)));
      tr.appendChild(el('td', D.top_tokens[i].map(t => JSON.stringify(tok(t))).join(' ')));
      tr.appendChild(el('td', D.lens ? D.lens[i].map(t => JSON.stringify(tok(t))).join(' ') : ''));
      table.appendChild(tr);
    });
    const pages = Math.max(1, Math.ceil(rows.length / ROWS));
    where.textContent = `page ${page + 1} of ${pages} (${rows.length.toLocaleString()} features)`;
  }
  filter.oninput = order; sort.onchange = order;
  prev.onclick = () => { if (page > 0) { page--; draw(); } };
  next.onclick = () => { if ((page + 1) * ROWS < rows.length) { page++; draw(); } };
  order();
  if (!prompt) document.body.dataset.rendered = 'index';
}
const ROWS = __ROWS__;
function promptBox(r, initial) {
  const box = el('div', undefined, 'box'); box.appendChild(el('b', 'Which features fire on a text: '));
  const input = el('input'); input.id = 'prompt'; input.size = 60; input.value = initial || '';
  const go = el('button', 'run'); const out = el('div'); out.id = 'prompt-result';
  box.appendChild(input); box.appendChild(go); box.appendChild(out); root.appendChild(box);
  async function run() {
    out.replaceChildren(el('span', 'running the model\u2026', 'muted'));
    const res = await api(`/api/runs/${r}/prompt`, {text: input.value});
    const table = el('table'); const head = el('tr'); ['token', 'features (activation)'].forEach(h => head.appendChild(el('th', h))); table.appendChild(head);
    res.tokens.forEach(([t, feats]) => {
      const tr = el('tr'); tr.appendChild(el('td', JSON.stringify(t), 'ctx')); const td = el('td');
      feats.forEach(([f, v]) => { td.appendChild(link(r, f)); td.appendChild(el('span', ` (${v.toFixed(2)}) `, 'muted')); });
      tr.appendChild(td); table.appendChild(tr);
    });
    out.replaceChildren(table); document.body.dataset.rendered = 'prompt';
  }
  go.onclick = run;
  if (initial) run();
}
function steerBox(r, f, initial) {
  const box = el('div', undefined, 'box'); box.appendChild(el('h4', 'Steer with this feature'));
  const prompt = el('input'); prompt.id = 'steer-prompt'; prompt.size = 50; prompt.value = initial ? initial.prompt : 'The';
  const strength = el('input'); strength.id = 'steer-strength'; strength.size = 6;
  strength.value = initial ? initial.strength : String(Math.round(4 * Math.max(f.mean, 0.1) * 100) / 100);
  const go = el('button', 'generate'); const out = el('div'); out.id = 'steer-result';
  box.appendChild(el('span', 'prompt ')); box.appendChild(prompt); box.appendChild(el('span', 'strength (activation units) ')); box.appendChild(strength);
  box.appendChild(go); box.appendChild(out);
  async function run() {
    out.replaceChildren(el('span', 'generating\u2026', 'muted'));
    const res = await api(`/api/runs/${r}/steer`, {feature: f.id, prompt: prompt.value, strength: Number(strength.value)});
    const table = el('table'); const head = el('tr'); ['baseline', `steered (feature ${f.id} at ${strength.value})`].forEach(h => head.appendChild(el('th', h))); table.appendChild(head);
    res.baseline.forEach((b, i) => { const tr = el('tr'); tr.appendChild(el('td', b, 'gen')); tr.appendChild(el('td', res.steered[i], 'gen')); table.appendChild(tr); });
    out.replaceChildren(table); document.body.dataset.rendered = 'steer-' + f.id;
  }
  go.onclick = run;
  if (initial) run();
  return box;
}
async function showFeature(r, id, steer) {
  const D = await index(r);
  const f = await featureData(r, id);
  root.replaceChildren(); document.getElementById('title').textContent = D.title;
  const back = el('a', '\u2190 all features'); back.href = `#r${r}`; root.appendChild(back);
  root.appendChild(el('h3', `Feature ${id}`));
  if (!f) { root.appendChild(el('p', id >= 0 && id < D.n_latents ? 'This feature never fired on the text seen (or is not in this file).' : 'No such feature.')); document.body.dataset.rendered = 'feature-' + id; return; }
  root.appendChild(el('p', `density ${f.density.toExponential(3)} (fires on 1 token in ${Math.round(1 / f.density).toLocaleString()}), max activation ${f.max}, mean when firing ${f.mean}`));
  const cols = el('div', undefined, 'cols'); const left = el('div'); const right = el('div');
  cols.appendChild(left); cols.appendChild(right); root.appendChild(cols);
  if (D.transcoder) left.appendChild(el('h4', `Reads (at ${D.reads}): the input contexts its encoder fires on`));
  left.appendChild(el('h4', 'Top activations')); f.top.forEach(c => left.appendChild(context(c, f.max)));
  f.quantiles.forEach(([label, cs]) => { left.appendChild(el('h4', 'Sampled: ' + label)); cs.forEach(c => left.appendChild(context(c, f.max))); });
  right.appendChild(el('h4', D.transcoder ? `Writes (to ${D.writes}): its decoder direction through the unembedding` : 'Logit lens'));
  right.appendChild(lens('top', f.lens_top)); right.appendChild(lens('bottom', f.lens_bottom));
  if (!EMBEDDED) right.appendChild(steerBox(r, f, steer));
  const plot = el('div'); plot.style.width = '520px'; plot.style.height = '320px'; right.appendChild(plot);
  const [start, counts] = f.hist; const e = D.hist_edges;
  const x = counts.map((_, i) => Math.sqrt(e[start + i] * e[start + i + 1]));
  const w = counts.map((_, i) => e[start + i + 1] - e[start + i]);
  Plotly.newPlot(plot, [{type: 'bar', x, y: counts, width: w, marker: {color: '#e45756'}}],
    {title: {text: 'activation histogram'}, xaxis: {type: 'log', title: {text: 'activation'}}, yaxis: {title: {text: 'tokens'}}, margin: {t: 40}, bargap: 0},
    {staticPlot: false, displayModeBar: false});
  if (!steer) document.body.dataset.rendered = 'feature-' + id;
}
function route() {
  // #r<run>, #r<run>/prompt/<text>, #[r<run>/]f<id>, #r<run>/f<id>/steer/<strength>/<prompt>
  const h = location.hash;
  let m;
  delete document.body.dataset.rendered;
  if ((m = h.match(/^#(?:r(\d+)\/)?f(\d+)(?:\/steer\/([^/]+)\/(.*))?$/))) {
    const steer = m[3] === undefined ? null : {strength: decodeURIComponent(m[3]), prompt: decodeURIComponent(m[4])};
    showFeature(Number(m[1] || 0), Number(m[2]), steer);
  } else if ((m = h.match(/^#r(\d+)(?:\/prompt\/(.*))?$/))) showIndex(Number(m[1]), m[2] === undefined ? null : decodeURIComponent(m[2]));
  else showIndex(0, null);
  window.scrollTo(0, 0);
}
window.addEventListener('hashchange', route);
route();
""".replace("__ROWS__", str(PAGE_ROWS))
