"""Pruning an attribution graph by influence on its target.

Each node's edges in are normalised to absolute shares (|edge| / the sum of |edges| into the
node); a node's influence is the target's share reaching it through every path of such shares
(1 for the target itself). Nodes are kept, strongest first, until they hold `node_threshold` of
the influence of all candidate nodes; edges among the kept nodes are scored by their share times
the influence of the node they enter, and kept until `edge_threshold` of the score. Tokens and the
target always stay; a feature, error or bias left without kept edges out (or a feature without
edges in) is dropped, until nothing changes. The result is sparse: node indices and edge triples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.circuits.graph import EMBEDDING, FEATURE, TARGET, Graph
from interp.errors import BadInput


@dataclass
class Pruned:
    nodes: torch.Tensor
    """(kept,) node indices, strongest influence first."""
    influence: torch.Tensor
    """(nodes,) every node's influence on the target in the full graph."""
    edges: torch.Tensor
    """(edges, 2) (target node, source node) of every kept edge, strongest first."""
    weights: torch.Tensor
    """(edges,) their weights."""


def _shares(adjacency: torch.Tensor) -> torch.Tensor:
    magnitude = adjacency.abs()
    return magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-30)


def influence(graph: Graph, adjacency: torch.Tensor | None = None) -> torch.Tensor:
    """(nodes,) the target's influence reaching each node through all paths (the target: 1)."""
    shares = _shares(graph.adjacency if adjacency is None else adjacency).double()
    frontier = torch.zeros(len(graph.rows), dtype=torch.float64)
    frontier[-1] = 1.0
    total = torch.zeros(len(graph.kind), dtype=torch.float64)
    total[graph.target] = 1.0
    # The graph is a DAG over layers, so every path is at most n_layers + 2 edges long.
    for _ in range(graph.n_layers + 3):
        reached = frontier @ shares
        if not reached.any():
            break
        total += reached
        frontier = reached[graph.rows]
    return total.float()


def _keep_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """A mask of the strongest scores whose sum first reaches `share` of the total."""
    order = scores.argsort(descending=True)
    cumulative = scores[order].cumsum(0)
    total = cumulative[-1] if len(cumulative) else 0
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if total > 0:
        count = int((cumulative < share * total).sum()) + 1
        mask[order[:count]] = True
    return mask


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 < value <= 1.0:
            raise BadInput(f"{name} is a share of influence in (0, 1], got {value}")
    full = influence(graph)
    always = torch.tensor([k in (EMBEDDING, TARGET) for k in graph.kind])
    keep = _keep_share(torch.where(always, 0.0, full), node_threshold) | always
    row_keep = keep[graph.rows]
    adjacency = graph.adjacency * row_keep[:, None] * keep[None]
    row_influence = influence(graph, adjacency)[graph.rows]
    scores = _shares(adjacency) * row_influence[:, None]
    edge_mask = _keep_share(scores.flatten(), edge_threshold).view_as(scores) & (adjacency != 0)
    is_feature = torch.tensor([k == FEATURE for k in graph.kind])
    while True:
        has_out = edge_mask.any(0)
        has_in = torch.zeros_like(keep)
        has_in[graph.rows] = edge_mask.any(1)
        new_keep = keep & (always | (has_out & (has_in | ~is_feature)))
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
        edge_mask &= keep[graph.rows][:, None] & keep[None]
    rows, sources = edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[rows, sources]
    order = (scores[rows, sources]).argsort(descending=True)
    edges = torch.stack([graph.rows[rows], sources], 1)[order]
    kept = keep.nonzero().flatten()
    return Pruned(kept[full[kept].argsort(descending=True)], full, edges, weights[order])
