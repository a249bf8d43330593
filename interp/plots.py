"""plotly figures of features: density over all features, one feature's activation histogram, a
heat-map of activations over a text, and a feature's decoder-direction neighbours."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from interp.errors import BadInput
from interp.features import FeatureResults, decoder_neighbours
from interp.sae.base import SparseCoder


def density_histogram(results: FeatureResults, bins: int = 50) -> go.Figure:
    """log10 firing density of every live feature; dead features are counted in the title."""
    density = results.density_n
    live = density[density > 0]
    fig = go.Figure(go.Histogram(x=live.log10().tolist(), nbinsx=bins, marker_color="#4c78a8"))
    fig.update_layout(
        title=f"Feature density over {results.n_tokens:,} tokens: {len(live)} live, {len(density) - len(live)} never fired",
        xaxis_title="log10(fraction of tokens the feature fires on)", yaxis_title="features", bargap=0.05,
    )
    return fig


def activation_histogram(results: FeatureResults, feature: int) -> go.Figure:
    """How often the feature fired at each activation (log-spaced bins)."""
    edges, counts = results.histogram(feature)
    used = counts.nonzero().squeeze(1)
    if len(used):
        counts, lo, hi = counts[used[0] : used[-1] + 1], edges[used[0] : used[-1] + 1], edges[used[0] + 1 : used[-1] + 2]
    else:
        lo = hi = edges[:0]
        counts = counts[:0]
    centers = (lo * hi).sqrt().tolist()
    fig = go.Figure(go.Bar(
        x=centers, y=counts.tolist(), width=(hi - lo).tolist(), marker_color="#e45756",
        hovertemplate="activation %{x:.3g}: %{y} tokens<extra></extra>",
    ))
    fig.update_layout(
        title=f"Feature {feature}: activations when firing ({int(counts.sum())} of {results.n_tokens:,} tokens)",
        xaxis_title="activation", yaxis_title="tokens", xaxis_type="log", bargap=0,
    )
    return fig


def text_heatmap(tokens: list[str], acts: list[float], title: str = "", per_row: int = 12) -> go.Figure:
    """The tokens of a text laid out in rows, each cell coloured by its activation."""
    if len(tokens) != len(acts):
        raise BadInput(f"{len(tokens)} tokens but {len(acts)} activations")
    rows = max(1, math.ceil(len(tokens) / per_row))
    pad = rows * per_row - len(tokens)
    shown = [t.replace("\n", "↵") for t in tokens] + [""] * pad
    values = list(acts) + [None] * pad
    z = [values[r * per_row : (r + 1) * per_row] for r in range(rows)]
    text = [shown[r * per_row : (r + 1) * per_row] for r in range(rows)]
    fig = go.Figure(go.Heatmap(
        z=z, text=text, texttemplate="%{text}", colorscale="Reds", zmin=0, showscale=True,
        hovertemplate="%{text}: %{z:.3f}<extra></extra>", xgap=2, ygap=2,
    ))
    fig.update_layout(
        title=title, height=120 + 40 * rows,
        yaxis=dict(autorange="reversed", showticklabels=False), xaxis=dict(showticklabels=False),
    )
    return fig


def neighbours_figure(coder: SparseCoder, feature: int, n: int = 10) -> go.Figure:
    """The features whose decoder directions point closest to `feature`'s (cosine similarity)."""
    pairs = decoder_neighbours(coder, feature, n)
    fig = go.Figure(go.Bar(
        x=[cos for _, cos in pairs], y=[f"feature {f}" for f, _ in pairs], orientation="h", marker_color="#72b7b2",
    ))
    fig.update_layout(
        title=f"Decoder neighbours of feature {feature}", xaxis_title="cosine similarity",
        yaxis=dict(autorange="reversed"), height=150 + 25 * len(pairs),
    )
    return fig
