"""Circuits as self-contained HTML pages.

A feature circuit: an interactive plotly graph (a row per coder, in the order the model computes
them, a column per group of positions; a node's size is its effect's magnitude, its colour the
sign, error and skip nodes drawn as squares; edges between consecutive coders), and a table of the
strongest nodes. An attribution graph: a row per layer (tokens below, the target on top), a column
per position; a node's size is its influence on the target, edges coloured by sign; tables of the
strongest nodes and of the edges split by attention head. Where a coder's feature results exist
(`interp features`), hovering over a feature, and its row of a table, show its top tokens and its
logit lens."""

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
    results = features.get(node["coder"]) if node["kind"] == "feature" else None
    if results is None or node["latent"] >= results.n_latents:
        return ""
    tops = [results.vocab[c.token_ids[c.center]] for c in results.top_contexts(node["latent"], TOP_TOKENS)]
    parts = ["top tokens: " + " ".join(repr(t) for t in tops)] if tops else []
    lens = results.logit_lens(node["latent"])
    if lens:
        parts.append("logit lens: " + " ".join(repr(t) for t, _ in lens[0][:TOP_TOKENS]))
    return "; ".join(parts)


def _spread(cells: dict[tuple[int, float], list[str]]) -> dict[str, tuple[float, float]]:
    """Node positions: each cell (column, row) holds its nodes, strongest first, spread across the column's width."""
    return {node_id: (column - 0.35 + 0.7 * (slot + 0.5) / len(ids), row)
            for (column, row), ids in cells.items() for slot, node_id in enumerate(ids)}


def _add_edges(fig: go.Figure, edges: list[dict], placed: dict[str, tuple[float, float]], opacity: float, width: float) -> None:
    """The edges between placed nodes as two line traces: positive (red) and negative (blue)."""
    for sign, colour in ((1, f"rgba(200,60,40,{opacity})"), (-1, f"rgba(40,90,200,{opacity})")):
        xs, ys = [], []
        for edge in edges:
            if edge["source"] in placed and edge["target"] in placed and (edge["weight"] > 0) == (sign > 0):
                (x0, y0), (x1, y1) = placed[edge["source"]], placed[edge["target"]]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": width}, hoverinfo="skip",
                                 name="positive edges" if sign > 0 else "negative edges"))


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
    placed = _spread({(column, row): ids for (row, column), ids in cells.items()})
    fig = go.Figure()
    _add_edges(fig, result["edges"], placed, opacity=0.5, width=1.5)
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


def _page(title: str, body: str, n_nodes: int) -> str:
    """A page whose body says, once plotly has drawn, data-rendered="circuit" (or "failed")."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}
pre{{background:#f6f6f6;padding:0.6em}}</style></head>
<body data-rendered="pending">
{body}
<script>
window.addEventListener("load", () => {{
  const graph = document.getElementById("circuit-graph");
  const drawn = graph && graph.querySelector(".main-svg");
  document.body.dataset.rendered = drawn ? "circuit" : "failed";
  document.body.dataset.nodes = String({json.dumps(n_nodes)});
}});
</script>
</body></html>
"""


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
    body = f"""<h1>Feature circuit: {html.escape(result['config']['task'])}</h1>
<pre>{html.escape(result['summary'])}</pre>
{figure}
<h2>Faithfulness on held-out prompts</h2>
<table><tr><th>nodes</th><th>faithfulness</th><th>random circuits</th><th>without error nodes</th><th>completeness</th></tr>{rows_curve}</table>
<h2>Strongest nodes</h2>
<table><tr><th>node</th><th>effect</th><th>what its feature results say</th></tr>{rows_nodes}</table>"""
    page = _page(f"interp circuit: {result['config']['task']}", body, len(result["nodes"][:60]))
    write_text(path, page)
    return path


GRAPH_SYMBOLS = {"feature": "circle", "error": "square", "embedding": "triangle-up", "bias": "cross", "target": "star"}


def graph_figure(result: dict, features: dict[str, FeatureResults] | None = None, max_nodes: int = 200) -> go.Figure:
    features = features or {}
    nodes = result["nodes"][:max_nodes]
    n_layers = result["n_layers"]
    row = {n["id"]: (-1 if n["kind"] == "embedding" else n["layer"] + (0.5 if n["kind"] in ("error", "bias") else 0)) for n in nodes}
    cells: dict[tuple[int, float], list[str]] = {}
    for node in nodes:
        cells.setdefault((node["position"], row[node["id"]]), []).append(node["id"])
    placed = _spread(cells)
    biggest = max((n["influence"] for n in nodes if n["kind"] != "target"), default=1.0) or 1.0
    fig = go.Figure()
    _add_edges(fig, result["edges"], placed, opacity=0.45, width=1)
    for kind, symbol in GRAPH_SYMBOLS.items():
        chosen = [n for n in nodes if n["kind"] == kind]
        if not chosen:
            continue
        hover = []
        for n in chosen:
            text = f"{html.escape(n['id'])} ({kind})<br>influence {n['influence']:.4f}"
            if "activation" in n:
                text += f"<br>activation {n['activation']:.4f}"
            if "token" in n:
                text += f"<br>token {html.escape(repr(n['token']))}"
            if notes := feature_notes(n, features):
                text += f"<br>{html.escape(notes)}"
            hover.append(text)
        fig.add_trace(go.Scatter(
            x=[placed[n["id"]][0] for n in chosen], y=[placed[n["id"]][1] for n in chosen], mode="markers", name=f"{kind} nodes",
            marker={"symbol": symbol, "size": [8 + 26 * min(1.0, n["influence"] / biggest) ** 0.5 for n in chosen],
                    "line": {"width": 1, "color": "#333"}}, text=hover, hovertemplate="%{text}<extra></extra>"))
    tokens = result["tokens"]
    fig.update_layout(
        title=f"attribution graph: {result['target']['label']}",
        xaxis={"tickvals": list(range(len(tokens))), "ticktext": [repr(t) for t in tokens], "title": "position"},
        yaxis={"tickvals": [-1, *range(n_layers), n_layers], "ticktext": ["tokens", *map(str, range(n_layers)), "target"], "title": "layer"},
        height=300 + 22 * n_layers, template="plotly_white",
    )
    return fig


def write_graph_page(result: dict, path: str | Path, features: dict[str, FeatureResults] | None = None) -> Path:
    features = features or {}
    path = Path(path)
    figure = graph_figure(result, features).to_html(full_html=False, include_plotlyjs=True, div_id="circuit-graph")
    rows_nodes = "".join(
        f"<tr class='node' id='{html.escape(n['id'])}'><td>{html.escape(n['id'])}</td><td>{n['kind']}</td><td>{n['influence']:.4f}</td>"
        f"<td>{n.get('activation', float('nan')):.4f}</td><td>{html.escape(feature_notes(n, features))}</td></tr>" for n in result["nodes"][:50])
    rows_split = ""
    for e in (e for e in result["edges"] if "split" in e):
        heads = ", ".join(f"L{h['layer']}.H{h['head']} {h['part']:+.4f}" for h in e["split"]["heads"][:6])
        rows_split += (f"<tr><td>{html.escape(e['source'])} &rarr; {html.escape(e['target'])}</td><td>{e['weight']:+.4f}</td>"
                       f"<td>{e['split']['residual']:+.4f}</td><td>{html.escape(heads)}</td></tr>")
    body = f"""<h1>Attribution graph: {html.escape(result['target']['label'])}</h1>
<pre>{html.escape(result['summary'])}</pre>
{figure}
<h2>Strongest nodes</h2>
<table><tr><th>node</th><th>kind</th><th>influence</th><th>activation</th><th>what its feature results say</th></tr>{rows_nodes}</table>
<h2>Strongest edges by attention head</h2>
<table><tr><th>edge</th><th>weight</th><th>residual path</th><th>first attention head (layer.head: part)</th></tr>{rows_split}</table>"""
    write_text(path, _page(f"interp graph: {result['target']['label']}", body, len(result["nodes"][:200])))
    return path


AGREEMENT = {"roc_auc": "ROC-AUC", "precision_at_n": "precision at n", "recall_at_n": "recall at n", "best_f1": "best F1",
             "best_paper_f1": "best 2TPR(1-FPR)/(TPR+1-FPR)"}


def format_score(value: float | None) -> str:
    """A score to three decimals, or n/a where it is undefined (a reference of every head or none)."""
    return "n/a" if value is None else f"{value:.3f}"


def agreement_rows(result: dict) -> list[tuple[str, dict]]:
    """(method, its agreement with the reference) for each scored method of a heads result."""
    rows = [("codes (nodes)", result["nodes"]["codes"]), ("attribution patching (nodes)", result["nodes"]["attribution"])]
    for method in ("codes", "attribution"):
        if method in result["edges"]:
            rows.append((f"{'attribution patching' if method == 'attribution' else method} (edges)", result["edges"][method]))
    return rows


HEAD_PANELS = (("exact_effect", "exact patching effect"), ("attribution_effect", "attribution patching"), ("code_score", "code score"))
KV_PANELS = (("k", "key heads: attribution patching"), ("v", "value heads: attribution patching"))


def heads_figure(result: dict) -> go.Figure:
    """Layer x head heat-maps side by side: each query head's exact patching effect (the
    reference), attribution patching's estimate of it and the code method's score; then each
    key and value head's attribution patching estimate (each read by several query heads)."""
    from plotly.subplots import make_subplots

    n_layers, n_heads, n_kv = result["n_layers"], result["n_heads"], result["n_kv_heads"]
    panels = [(result[key], n_heads, "H", title, key != "code_score") for key, title in HEAD_PANELS]
    panels += [(result["kv_attribution_effect"][kind], n_kv, "KV", title, True) for kind, title in KV_PANELS]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[panel[3] for panel in panels], horizontal_spacing=0.05,
                        column_widths=[width for _, width, *_ in panels])
    reference = set(result["reference_heads"])
    for col, (values, width, letter, title, signed) in enumerate(panels, start=1):
        grid = [[values[layer * width + head] for head in range(width)] for layer in range(n_layers)]
        text = [[("* " if f"L{layer}{letter}{head}" in reference else "") + f"L{layer}{letter}{head}" for head in range(width)]
                for layer in range(n_layers)]
        bound = max((abs(v) for v in values), default=1.0) or 1.0
        fig.add_trace(go.Heatmap(
            z=grid, text=text, hovertemplate="%{text}: %{z:.4g}<extra>" + title + "</extra>",
            colorscale="RdBu" if signed else "Viridis", zmid=0 if signed else None,
            zmin=-bound if signed else 0, zmax=bound, showscale=False,
        ), row=1, col=col)
        fig.update_xaxes(title_text="key/value head" if letter == "KV" else "head", row=1, col=col)
        fig.update_yaxes(title_text="layer" if col == 1 else None, row=1, col=col)
    fig.update_layout(height=max(360, 22 * n_layers + 120), title=f"Heads of {result['task']} (* in the reference circuit)")
    return fig


def write_heads_page(result: dict, path: str | Path) -> Path:
    path = Path(path)
    figure = heads_figure(result).to_html(full_html=False, include_plotlyjs=True, div_id="circuit-graph")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td>{format_score(scores[key])}</td>" for key in AGREEMENT) + "</tr>"
        for name, scores in agreement_rows(result))
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items())
    body = f"""<h1>Heads of {html.escape(result['task'])}</h1>
<p>{result['prompts']} prompts; reference circuit (exact patching): {html.escape(', '.join(result['reference_heads']))}. Runtimes: {seconds}.</p>
{figure}
<h2>Against the reference</h2>
<table><tr><th>method</th>{''.join(f'<th>{html.escape(label)}</th>' for label in AGREEMENT.values())}</tr>{rows}</table>"""
    write_text(path, _page(f"interp heads: {result['task']}", body, len(result["heads"])))
    return path


# --- the task evaluation of dictionaries ----------------------------------------------------------

def evaluation_table(result: dict) -> tuple[list[str], list[list]]:
    """(column names, one row per dictionary) of a task evaluation: approximation, control at two
    features and the edit size that reaches half the patch's effect (None where no edit does, or
    where patching the node does not move the answer), best-detector F1 per attribute, symptoms."""
    attributes = list(result["attribute_values"])
    controlled = list(result["counterfactual_baseline"])
    columns = ["dictionary", "FVU", "L0", "sufficiency", "necessity"]
    columns += [f"control {a} (2 features)" for a in controlled] + [f"{a}: features for half the patch" for a in controlled]
    columns += [f"F1 {a}" for a in attributes] + ["occluded", "over-split"]
    rows = []
    for row in result["rows"]:
        control = {a: {int(size): closed for size, closed in row["control"][a].items()} for a in controlled}
        half = [next((size for size, closed in sorted(control[a].items()) if closed is not None and closed >= 0.5), None)
                for a in controlled]
        rows.append([row["name"], row["fvu"], row["l0"], row["sufficiency"], row["necessity"],
                     *[control[a].get(2) for a in controlled], *half,
                     *[row["interpretability"][a]["best_f1"] for a in attributes],
                     ", ".join(row["occluded"]) or "-", ", ".join(row["over_split"]) or "-"])
    return columns, rows


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def evaluation_figure(result: dict) -> go.Figure:
    """The evaluation table as a heat-map: a row per dictionary, a column per score (higher is
    better everywhere but FVU and the edit size), each column coloured on its own scale."""
    columns, rows = evaluation_table(result)
    numeric = [i for i in range(1, len(columns)) if i != 2 and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)]
    lower_better = {1} | {i for i in numeric if columns[i].endswith("half the patch")}
    shade = []
    for r in rows:
        line = []
        for i in numeric:
            column = [x[i] for x in rows if x[i] is not None]
            low, high = (min(column), max(column)) if column else (0, 1)
            value = r[i] if r[i] is not None else (high if i in lower_better else low)
            share = 0.5 if high == low else (value - low) / (high - low)
            line.append(1 - share if i in lower_better else share)
        shade.append(line)
    fig = go.Figure(go.Heatmap(
        z=shade, x=[columns[i] for i in numeric], y=[r[0] for r in rows], text=[[format_cell(r[i]) for i in numeric] for r in rows],
        texttemplate="%{text}", hovertemplate="%{y}, %{x}: %{text}<extra></extra>", colorscale="Greens", showscale=False, zmin=0, zmax=1))
    fig.update_yaxes(autorange="reversed")
    hook, role = result["node"]
    fig.update_layout(height=120 + 40 * len(rows), title=f"{result['task']} at {hook}, {role}: each column shaded from worst to best")
    return fig


def write_evaluation_page(result: dict, path: str | Path) -> Path:
    path = Path(path)
    figure = evaluation_figure(result).to_html(full_html=False, include_plotlyjs=True, div_id="circuit-graph")
    columns, rows = evaluation_table(result)
    table = "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    hook, role = result["node"]
    base = result["baseline"]
    body = f"""<h1>{html.escape(result['task'])}: dictionaries at {html.escape(hook)}, {html.escape(role)}</h1>
<p>{result['prompts']} held-out prompts ({result['fit_prompts']} fitted the dictionaries); metric {base['clean']:.3f} clean,
{base['mean_ablated']:.3f} with the node mean-ablated.</p>
{figure}
<table>{table}</table>"""
    write_text(path, _page(f"interp evaluation: {result['task']}", body, len(rows)))
    return path
