"""Edges of an attribution graph split by the attention head they pass through first.

Under the frozen patterns every path from a source node s (writing o_s at position p_s after
layer l_s) to a target t either stays in the residual stream at p_s (then p_s is t's position) or
first enters some attention head (l, h) with l_s < l, through that head's value input at p_s.
Paths are partitioned by that first head, so

    edge(s -> t) = residual + sum over heads (l, h) of part(l, h) + other,

where part(l, h) = o_s . (what t's input receives per unit at p_s through head h's values, by
every path after it), and `other` is the rest: paths entering a skip transcoder's linear term
first (0 without skip transcoders). Grouped-query attention: query head h reads the key-value
head h // (n_heads / n_kv_heads), so each query head is split out though its values are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.circuits.graph import (
    FINAL,
    TARGET,
    Graph,
    by_layer,
    frozen_pass,
    output_vector,
)
from interp.circuits.head_effects import heads_of
from interp.sae.base import SparseCoder


@dataclass
class HeadSplit:
    target: int
    source: int
    edge: float
    residual: float
    """The part that stays in the residual stream at the source's position."""
    heads: dict[tuple[int, int], float]
    """(layer, query head) -> the part whose first attention hop is that head."""
    other: float
    """edge - residual - sum(heads): paths through skip transcoders' linear terms."""


def _reads(graph: Graph, coders_at: dict[int, SparseCoder], node: int) -> tuple[str, str, torch.Tensor, int]:
    """(hook holding the node's input, the residual stream that hook reads at its layer, the
    direction whose dot product there is the input, the layers of attention before it)."""
    if graph.kind[node] == TARGET:
        return FINAL, "ln_final.hook_in", graph.direction, graph.n_layers
    layer = int(graph.layer[node])
    coder = coders_at[layer]
    return coder.cfg.hook, f"blocks.{layer}.hook_resid_mid", coder.model_units().W_enc[int(graph.feature[node])].float(), layer + 1


def head_split(model, graph: Graph, coders: list[SparseCoder], pairs: list[tuple[int, int]]) -> list[HeadSplit]:
    """The split of each (target node, source node) edge in `pairs`."""
    coders_at = by_layer(model, coders)
    cfg = model.cfg
    n_heads, n_kv = cfg.n_heads, heads_of(model, "k")
    group = torch.arange(n_heads) // (n_heads // n_kv)
    tokens_1t = torch.tensor([graph.tokens], device=cfg.device)
    by_target: dict[int, list[int]] = {}
    for target, source in pairs:
        by_target.setdefault(target, []).append(source)
    reads = {t: _reads(graph, coders_at, t) for t in by_target}
    hooks = sorted({h for r in reads.values() for h in r[:2]})
    hooks += [f"blocks.{l}.attn.hook_{name}" for l in range(cfg.n_layers) for name in ("z", "v")]
    hooks += [f"blocks.{l}.hook_resid_pre" for l in range(cfg.n_layers)]
    acts = frozen_pass(model, tokens_1t, graph.replacement, hooks)
    row_of = {int(n): r for r, n in enumerate(graph.rows.tolist())}
    splits = []
    for target, sources in by_target.items():
        out_hook, resid_hook, direction, n_attn = reads[target]
        out = acts[out_hook]
        position = int(graph.position[target])
        seed = torch.zeros_like(out)
        seed[0, position] = direction.to(out)
        z_hooks = [f"blocks.{l}.attn.hook_z" for l in range(n_attn)]
        grads = torch.autograd.grad(out, [acts[resid_hook]] + [acts[h] for h in z_hooks], seed, retain_graph=True, allow_unused=True)
        direct_pd = grads[0][0]
        vectors_sd = torch.stack([output_vector(graph, s).to(out) for s in sources])
        positions = graph.position[sources]
        layers = graph.layer[sources]
        parts_sh = torch.zeros(len(sources), n_attn, n_heads, dtype=out.dtype)
        for layer, grad_z in enumerate(grads[1:]):
            if grad_z is None:
                continue
            pattern_hqk = graph.replacement.frozen[f"blocks.{layer}.attn.hook_pattern"][0].to(out)
            # what each query head's values at key position k receive, by every path after the head
            grad_v_hkd = torch.einsum("hqk,qhd->hkd", pattern_hqk, grad_z[0])
            v, resid = acts[f"blocks.{layer}.attn.hook_v"], acts[f"blocks.{layer}.hook_resid_pre"]
            seed_v = torch.zeros(n_heads, *v.shape, dtype=v.dtype, device=v.device)
            seed_v[torch.arange(n_heads), 0, :, group] = grad_v_hkd.to(v)
            # through the layer's value projection and frozen norm to the residual stream it reads
            per_head = torch.autograd.grad(v, resid, seed_v, retain_graph=True, is_grads_batched=True)[0][:, 0]  # (heads, pos, d)
            upstream = layers < layer
            parts_sh[:, layer] = torch.einsum("hsd,sd->sh", per_head[:, positions], vectors_sd) * upstream[:, None].to(out)
        residual_s = (direct_pd[positions] * vectors_sd).sum(-1)
        for i, source in enumerate(sources):
            edge = float(graph.adjacency[row_of[target], source])
            heads = {(l, h): float(parts_sh[i, l, h]) for l in range(n_attn) for h in range(n_heads) if parts_sh[i, l, h] != 0}
            splits.append(HeadSplit(target, source, edge, float(residual_s[i]), heads, edge - float(residual_s[i]) - sum(heads.values())))
    return splits
