"""A self-contained HTML dashboard of feature results: one file holding plotly.js, the data and
the page script, so it opens offline from anywhere.

The index (`#`) lists every feature that fired, with its density, largest activation, the tokens it
fires most on and its logit-lens top tokens; `#f123` is feature 123's page: its top contexts and
samples by activation quantile (tokens shaded by activation, hover for the value), its activation
histogram and its logit lens. After rendering, the page sets `data-rendered` on <body> (to
"index" or "feature-123"); a script error sets `data-error` instead, which is what tests check.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from pathlib import Path

from plotly.offline import get_plotlyjs

from interp.atomic import write_text
from interp.features import FeatureResults
from interp.hooks import written_hook

DASHBOARD_FILE = "dashboard.html"


def dashboard_data(results: FeatureResults, top_contexts: int = 10, per_quantile: int = 3) -> dict:
    """What the page script renders: per live feature its numbers, contexts and logit lens, with
    token ids into a shared table of the token texts used."""
    used: set[int] = set()
    density, max_n = results.density_n, results.max_n
    mean_n = results.tensors["act_sum_n"] / results.tensors["fires_n"].clamp_min(1)
    edges = results.histogram(0)[0]

    def pack(contexts):
        for c in contexts:
            used.update(c.token_ids)
        return [[c.token_ids, [round(a, 3) for a in c.acts], c.center, round(c.value, 3)] for c in contexts]

    features = []
    for f in (density > 0).nonzero().squeeze(1).tolist():
        top = results.top_contexts(f, top_contexts)
        lens = results.logit_lens(f)
        counts = results.tensors["hist_nb"][f]
        nz = counts.nonzero().squeeze(1)
        centers = Counter(results.vocab[c.token_ids[c.center]] for c in top)
        features.append({
            "id": f, "density": float(density[f]), "max": round(float(max_n[f]), 3), "mean": round(float(mean_n[f]), 3),
            "top_tokens": [t for t, _ in centers.most_common(3)],
            "top": pack(top),
            "quantiles": [[label, pack(cs)] for label, cs in results.quantile_contexts(f, per_quantile)],
            "lens_top": [[t, round(v, 2)] for t, v in lens[0]] if lens else None,
            "lens_bottom": [[t, round(v, 2)] for t, v in lens[1]] if lens else None,
            "hist": [int(nz[0]), counts[nz[0] : nz[-1] + 1].tolist()],
        })
    return {
        "coder": results.coder_info, "n_tokens": results.n_tokens, "n_latents": results.n_latents,
        "hist_edges": [float(e) for e in edges], "vocab": {i: results.vocab[i] for i in sorted(used)},
        "features": features,
    }


def write_dashboard(results: FeatureResults, path: str | Path, top_contexts: int = 10, per_quantile: int = 3) -> Path:
    path = Path(path)
    data = json.dumps(dashboard_data(results, top_contexts, per_quantile), separators=(",", ":"))
    # JSON inside <script> must not close the element early.
    data = data.replace("</", "<\\/")
    coder = results.coder_info
    title = html.escape(f"{coder['arch']} coder on {coder['model']} {written_hook(coder['hook'], coder['target_hook'])}")
    page = _PAGE.replace("{title}", title).replace("{plotly}", get_plotlyjs()).replace("{data}", data).replace("{script}", _SCRIPT)
    write_text(path, page)
    return path


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title>
<script>window.onerror = function (msg) { document.body.dataset.error = String(msg); };</script>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #eee; }
th { cursor: pointer; } a { color: #1f5fa8; text-decoration: none; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0; padding: 3px; border-left: 3px solid #ddd; }
.ctx span { border-radius: 2px; } .ctx .center { outline: 1px solid #b00; }
.val { color: #777; font-size: 80%; margin-right: 8px; } .lens span { margin-right: 10px; font-family: ui-monospace, monospace; }
.cols { display: flex; gap: 2em; flex-wrap: wrap; } .muted { color: #777; }
</style></head>
<body>
<h2>{title}</h2><div id="root">loading</div>
<script>{plotly}</script>
<script type="application/json" id="data">{data}</script>
<script>{script}</script>
</body></html>
"""

_SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const byId = new Map(D.features.map(f => [f.id, f]));
const root = document.getElementById('root');
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function tok(id) { return (D.vocab[id] ?? '?').replace(/\n/g, '\u21b5'); }
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
function index() {
  root.replaceChildren();
  root.appendChild(el('p', `${D.features.length} of ${D.n_latents} features fired on ${D.n_tokens.toLocaleString()} tokens. Click a feature for its page.`));
  const filter = el('input'); filter.placeholder = 'filter by token text'; root.appendChild(filter);
  const table = el('table'); const head = el('tr');
  ['feature', 'density', 'max act', 'fires most on', 'logit lens top'].forEach(h => head.appendChild(el('th', h)));
  table.appendChild(head);
  const rows = [...D.features].sort((a, b) => b.density - a.density).map(f => {
    const tr = el('tr'); const link = el('a', String(f.id)); link.href = '#f' + f.id;
    const td = el('td'); td.appendChild(link); tr.appendChild(td);
    tr.appendChild(el('td', f.density.toExponential(2))); tr.appendChild(el('td', f.max.toFixed(2)));
    tr.appendChild(el('td', f.top_tokens.map(t => JSON.stringify(t)).join(' ')));
    tr.appendChild(el('td', f.lens_top ? f.lens_top.slice(0, 5).map(p => JSON.stringify(p[0])).join(' ') : ''));
    tr.dataset.text = (f.top_tokens.join(' ') + ' ' + (f.lens_top || []).map(p => p[0]).join(' ')).toLowerCase();
    table.appendChild(tr); return tr;
  });
  filter.oninput = () => { const q = filter.value.toLowerCase(); rows.forEach(r => { r.style.display = r.dataset.text.includes(q) ? '' : 'none'; }); };
  root.appendChild(table);
  document.body.dataset.rendered = 'index';
}
function feature(id) {
  root.replaceChildren();
  const back = el('a', '\u2190 all features'); back.href = '#'; root.appendChild(back);
  const f = byId.get(id);
  root.appendChild(el('h3', `Feature ${id}`));
  if (!f) { root.appendChild(el('p', id >= 0 && id < D.n_latents ? 'This feature never fired on the text seen.' : 'No such feature.')); document.body.dataset.rendered = 'feature-' + id; return; }
  root.appendChild(el('p', `density ${f.density.toExponential(3)} (fires on 1 token in ${Math.round(1 / f.density).toLocaleString()}), max activation ${f.max}, mean when firing ${f.mean}`));
  const cols = el('div', undefined, 'cols'); const left = el('div'); const right = el('div');
  cols.appendChild(left); cols.appendChild(right); root.appendChild(cols);
  left.appendChild(el('h4', 'Top activations')); f.top.forEach(c => left.appendChild(context(c, f.max)));
  f.quantiles.forEach(([label, cs]) => { left.appendChild(el('h4', 'Sampled: ' + label)); cs.forEach(c => left.appendChild(context(c, f.max))); });
  right.appendChild(el('h4', 'Logit lens')); right.appendChild(lens('top', f.lens_top)); right.appendChild(lens('bottom', f.lens_bottom));
  const plot = el('div'); plot.style.width = '520px'; plot.style.height = '320px'; right.appendChild(plot);
  const [start, counts] = f.hist; const e = D.hist_edges;
  const x = counts.map((_, i) => Math.sqrt(e[start + i] * e[start + i + 1]));
  const w = counts.map((_, i) => e[start + i + 1] - e[start + i]);
  Plotly.newPlot(plot, [{type: 'bar', x, y: counts, width: w, marker: {color: '#e45756'}}],
    {title: {text: 'activation histogram'}, xaxis: {type: 'log', title: {text: 'activation'}}, yaxis: {title: {text: 'tokens'}}, margin: {t: 40}, bargap: 0},
    {staticPlot: false, displayModeBar: false});
  document.body.dataset.rendered = 'feature-' + id;
}
function route() {
  const m = location.hash.match(/^#f(\d+)$/);
  if (m) feature(Number(m[1])); else index();
  window.scrollTo(0, 0);
}
window.addEventListener('hashchange', route);
route();
"""
