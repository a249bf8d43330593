"""Transcoder circuits from the weights (Dunefsky et al. 2024): how a transcoder feature is
driven by the features of transcoders upstream and by the tokens, through the residual stream.

A transcoder at layer L encodes its MLP's normalised input, n(r) = r / rms(r) (times the norm's
gain when it reads ln2.hook_out), of the residual stream r before the MLP. Feature j's
pre-activation is therefore z_j = s(r) (v_j . r) + b_j with s = 1/rms(r) and v_j its encoder row
in the model's units (times the gain for ln2.hook_out). An upstream transcoder's feature i adds
f_i W_dec[i] to the residual stream, so

- the input-invariant connection is W_dec[i] . v_j (how strongly i drives j per unit of
  activation, up to the norm's scale),
- on a prompt, i's input-dependent contribution to z_j at a position is s f_i (W_dec[i] . v_j),
  and every other part of r contributes s (part . v_j), so the parts add up to z_j exactly
  (tested),
- de-embedding scores W_E[token] . v_j say which tokens drive j directly from the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.errors import BadInput
from interp.hooks import capture, output_hook
from interp.models import hook_layer
from interp.sae.base import SparseCoder

_INPUTS = ("ln2.hook_normalized", "ln2.hook_out")


def transcoder_layer(coder: SparseCoder) -> int:
    """The layer of an MLP transcoder (reads ln2, writes hook_mlp_out), or a clear error."""
    layer = hook_layer(coder.cfg.hook)
    reads = coder.cfg.hook.split(".", 2)[-1] if layer is not None else ""
    if layer is None or reads not in _INPUTS or coder.cfg.target_hook != f"blocks.{layer}.hook_mlp_out":
        raise BadInput(f"weights-based circuits need MLP transcoders (reading blocks.L.ln2.hook_normalized or "
                       f"ln2.hook_out, writing blocks.L.hook_mlp_out); this coder reads {coder.cfg.hook} and writes {output_hook(coder)}")
    return layer


def encoder_direction(model, coder: SparseCoder, feature: int) -> torch.Tensor:
    """(d_model,) v_j: the residual-stream direction feature j's pre-activation reads, per unit of s(r)."""
    layer = transcoder_layer(coder)
    v = coder.model_units().W_enc[coder.check_feature(feature)]
    if coder.cfg.hook.endswith("ln2.hook_out"):
        v = v * model.blocks[layer].ln2.weight.detach().to(v)
    return v


@dataclass
class Connection:
    coder: int
    """Index of the upstream coder."""
    feature: int
    weight: float


def upstream_connections(model, upstream: list[SparseCoder], coder: SparseCoder, feature: int, top: int = 10) -> list[Connection]:
    """The strongest input-invariant connections W_dec[i] . v_j into `feature` of `coder` from the
    features of the `upstream` transcoders (those before its layer)."""
    layer = transcoder_layer(coder)
    v = encoder_direction(model, coder, feature)
    found = []
    for index, up in enumerate(upstream):
        if transcoder_layer(up) >= layer:
            raise BadInput(f"{up.cfg.hook} is not upstream of {coder.cfg.hook}")
        weights = up.model_units().W_dec @ v.to(up.W_dec)
        latents = weights.abs().topk(min(top, len(weights))).indices
        found += [Connection(index, int(k), float(weights[k])) for k in latents.tolist()]
    return sorted(found, key=lambda c: -abs(c.weight))[:top]


def deembedding(model, coder: SparseCoder, feature: int, top: int = 10) -> list[tuple[int, float]]:
    """(token id, W_E[token] . v_j) of the tokens that drive the feature most directly."""
    v = encoder_direction(model, coder, feature)
    scores = model.W_E.detach().to(v) @ v
    values, tokens = scores.topk(top)
    return list(zip(tokens.tolist(), values.tolist()))


@dataclass
class Contributions:
    """Feature j's pre-activation at one position of one prompt, split into its sources."""

    features: dict[tuple[int, int], float]
    """(upstream coder, feature) -> s f_i (W_dec[i] . v_j), for the features active there."""
    rest: dict[str, float]
    """The other parts of the residual stream (embedding, attention outputs, each upstream
    transcoder's bias, skip term and error, MLPs without a transcoder), and the encoder bias."""
    pre_activation: float
    """z_j as the coder computes it."""


@torch.no_grad()
def input_dependent(model, upstream: list[SparseCoder], coder: SparseCoder, feature: int, tokens_t: torch.Tensor,
                    position: int) -> Contributions:
    """Feature `feature`'s pre-activation at `position` of the prompt `tokens_t`, split into the
    contributions of the upstream transcoders' features and of everything else in the residual
    stream before its MLP (the parts sum to it)."""
    layer = transcoder_layer(coder)
    by_layer = {transcoder_layer(up): (i, up) for i, up in enumerate(upstream)}
    normalized_hook = f"blocks.{layer}.ln2.hook_normalized"
    hooks = ["hook_embed", f"blocks.{layer}.hook_resid_mid", normalized_hook, coder.cfg.hook]
    hooks += [f"blocks.{l}.hook_attn_out" for l in range(layer + 1)] + [f"blocks.{l}.hook_mlp_out" for l in range(layer)]
    hooks += [up.cfg.hook for _, up in by_layer.values()]
    acts = {name: value[position] for name, value in capture(model, tokens_t[None], hooks).items()}
    v = encoder_direction(model, coder, feature)
    # s = 1 / rms(r), read off the norm itself: its normalised output is s r
    scale = float(acts[normalized_hook].norm() / acts[f"blocks.{layer}.hook_resid_mid"].norm())
    features: dict[tuple[int, int], float] = {}
    rest = {"embedding": scale * float(acts["hook_embed"] @ v)}
    for l in range(layer + 1):
        rest[f"blocks.{l}.hook_attn_out"] = scale * float(acts[f"blocks.{l}.hook_attn_out"] @ v)
    for l in range(layer):
        mlp = acts[f"blocks.{l}.hook_mlp_out"]
        if l not in by_layer:
            rest[f"blocks.{l}.hook_mlp_out"] = scale * float(mlp @ v)
            continue
        index, up = by_layer[l]
        units = up.model_units()
        x = acts[up.cfg.hook][None]
        code = up.encode(x)
        recon = up.reconstruct(x, code)[0]
        for k, value in zip(code.indices_bk[0].tolist(), code.values_bk[0].tolist()):
            if k >= 0 and value != 0:
                features[(index, k)] = scale * value * float(units.W_dec[k] @ v)
        rest[f"blocks.{l}.transcoder bias"] = scale * float(units.b_dec @ v)
        if units.W_skip is not None:
            rest[f"blocks.{l}.transcoder skip"] = scale * float((x[0] @ units.W_skip.T) @ v)
        rest[f"blocks.{l}.transcoder error"] = scale * float((mlp - recon) @ v)
    rest["encoder bias"] = float(coder.model_units().b_enc[feature])
    pre = float(coder.preacts(coder.encoder_input(coder.normalized_input(acts[coder.cfg.hook][None])))[0, feature])
    return Contributions(features, rest, pre)
