"""A feature circuit as a self-contained HTML page: an interactive plotly graph (a row per coder,
in the order the model computes them, a column per group of positions; a node's size is its
effect's magnitude, its colour the sign, error and skip nodes drawn as squares; edges between
consecutive coders), and a table of the strongest nodes. Where a coder's feature results exist
(`interp features`), hovering over a feature, and its row of the table, show its top tokens and
its logit lens."""

from __future__ import annotations

import html
import json
from pathlib import Path

import plotly.graph_objects as go

from interp.atomic import write_text
from interp.features import FeatureResults

TOP_TOKENS = 6


def feature_notes(node: dict, features: dict[str, FeatureResults]) -> str:
    """What the feature results say of a feature node ("" for other nodes or without results)."""
    results = features.get(node["coder"])
    if node["kind"] != "feature" or results is None or node["latent"] >= results.n_latents:
        return ""
    tops = [results.vocab[c.token_ids[c.center]] for c in results.top_contexts(node["latent"], TOP_TOKENS)]
    parts = ["top tokens: " + " ".join(repr(t) for t in tops)] if tops else []
    lens = results.logit_lens(node["latent"])
    if lens:
        parts.append("logit lens: " + " ".join(repr(t) for t, _ in lens[0][:TOP_TOKENS]))
    return "; ".join(parts)


def circuit_figure(result: dict, features: dict[str, FeatureResults] | None = None, max_nodes: int = 60) -> go.Figure:
    features = features or {}
    coders = [c["writes"] for c in result["coders"]]
    groups = result["groups"]
    nodes = result["nodes"][:max_nodes]
    biggest = max((abs(n["effect"]) for n in nodes), default=1.0) or 1.0
    # place each node: row = coder, column = group, spread within the cell by rank
    cells: dict[tuple[int, int], list[str]] = {}
    for node in nodes:
        cells.setdefault((coders.index(node["coder"]), groups.index(node["group"])), []).append(node["id"])
    placed = {}
    for (row, column), ids in cells.items():
        for slot, node_id in enumerate(ids):  # strongest first, spread across the column's width
            placed[node_id] = (column - 0.35 + 0.7 * (slot + 0.5) / len(ids), row)
    fig = go.Figure()
    for sign, colour in ((1, "rgba(200,60,40,0.5)"), (-1, "rgba(40,90,200,0.5)")):
        xs, ys = [], []
        for edge in result["edges"]:
            if edge["source"] in placed and edge["target"] in placed and (edge["weight"] > 0) == (sign > 0):
                (x0, y0), (x1, y1) = placed[edge["source"]], placed[edge["target"]]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 1.5}, hoverinfo="skip",
                                 name="positive edges" if sign > 0 else "negative edges"))
    for kind, symbol in (("feature", "circle"), ("error", "square"), ("skip", "diamond")):
        chosen = [n for n in nodes if n["kind"] == kind]
        if not chosen:
            continue
        hover = [f"{html.escape(n['id'])}<br>effect {n['effect']:+.4f}" + (f"<br>{html.escape(notes)}" if (notes := feature_notes(n, features)) else "")
                 for n in chosen]
        fig.add_trace(go.Scatter(
            x=[placed[n["id"]][0] for n in chosen], y=[placed[n["id"]][1] for n in chosen], mode="markers", name=f"{kind} nodes",
            marker={"symbol": symbol, "size": [8 + 30 * (abs(n["effect"]) / biggest) ** 0.5 for n in chosen],
                    "color": [n["effect"] for n in chosen], "colorscale": "RdBu_r", "cmid": 0, "line": {"width": 1, "color": "#333"}},
            text=hover, hovertemplate="%{text}<extra></extra>",
        ))
    fig.update_layout(
        title=f"feature circuit: task {result['config']['task']}",
        xaxis={"tickvals": list(range(len(groups))), "ticktext": groups, "title": "position group"},
        yaxis={"tickvals": list(range(len(coders))), "ticktext": coders, "title": "coder (model order)"},
        height=200 + 120 * len(coders), template="plotly_white",
    )
    return fig


def write_circuit_page(result: dict, path: str | Path, features: dict[str, FeatureResults] | None = None) -> Path:
    features = features or {}
    path = Path(path)
    figure = circuit_figure(result, features).to_html(full_html=False, include_plotlyjs=True, div_id="circuit-graph")
    curve = result["faithfulness"]
    rows_curve = "".join(f"<tr><td>{s}</td><td>{f:.3f}</td><td>{r:.3f}</td><td>{e:.3f}</td><td>{c:.3f}</td></tr>"
                         for s, f, r, e, c in zip(curve["sizes"], curve["faithfulness"], curve["random"], curve["without_errors"],
                                                  curve["completeness"]))
    rows_nodes = "".join(f"<tr class='node' id='{html.escape(n['id'])}'><td>{html.escape(n['id'])}</td><td>{n['effect']:+.4f}</td>"
                         f"<td>{html.escape(feature_notes(n, features))}</td></tr>" for n in result["nodes"][:50])
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>interp circuit: {html.escape(result['config']['task'])}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:0.6em}}</style></head>
<body data-rendered="pending">
<h1>Feature circuit: {html.escape(result['config']['task'])}</h1>
<pre>{html.escape(result['summary'])}</pre>
{figure}
<h2>Faithfulness on held-out prompts</h2>
<table><tr><th>nodes</th><th>faithfulness</th><th>random circuits</th><th>without error nodes</th><th>completeness</th></tr>{rows_curve}</table>
<h2>Strongest nodes</h2>
<table><tr><th>node</th><th>effect</th><th>what its feature results say</th></tr>{rows_nodes}</table>
<script>
window.addEventListener("load", () => {{
  const graph = document.getElementById("circuit-graph");
  const drawn = graph && graph.querySelector(".main-svg");
  document.body.dataset.rendered = drawn ? "circuit" : "failed";
  document.body.dataset.nodes = String({json.dumps(len(result['nodes'][:60]))});
}});
</script>
</body></html>
"""
    write_text(path, page)
    return path
