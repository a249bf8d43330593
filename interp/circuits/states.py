"""The nodes of a feature circuit and their values on a set of prompts.

With coders spliced in and their errors kept, each coder's written activation is, at every
position it edits (all but BOS),

    y = sum_i f_i W_dec[i] + b_dec + s + e,     s = W_skip x (skip transcoders), e = y - reconstruction,

in the model's units (`coder.model_units()`), so the model computes exactly what it did. Each
active feature f_i, each coder's error e and its skip term s are the nodes (Marks et al. 2024:
features and error nodes). `CoderState` holds their values for a batch of prompts; `baseline`
gives the values a node is patched or ablated to: "corrupt" (its value on the corrupt prompt),
"zero", or "mean" (its mean over other prompts, position by position: every prompt of a task
has the same length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.errors import BadInput
from interp.hooks import capture, coder_hooks, output_hook
from interp.kernels.reference import densify
from interp.sae.base import SparseCoder

BASELINES = ("corrupt", "mean", "zero")


@dataclass(frozen=True)
class Node:
    """A node: coder index, kind ("feature", "error", "skip"), latent (-1 for error and skip), group index."""

    coder: int
    kind: str
    latent: int
    group: int


@dataclass
class CoderState:
    """One coder's node values on (prompts, positions); position 0 (BOS) is never a node."""

    coder: SparseCoder
    f_ntk: torch.Tensor
    """(prompts, positions, latents) feature activations (dense; 0 where inactive)."""
    error_ntd: torch.Tensor
    """(prompts, positions, d_out) y - reconstruction."""
    skip_ntd: torch.Tensor | None
    """(prompts, positions, d_out) the skip transcoder's linear term."""
    y_ntd: torch.Tensor
    """(prompts, positions, d_out) the written activation."""
    nodes_nt: torch.Tensor
    """(prompts, positions) where the coder has nodes: what splice edits (not BOS, and only tokens
    within the coder's input-norm bound); elsewhere every node value is 0 and y passes unchanged."""

    @property
    def hook(self) -> str:
        return output_hook(self.coder)

    def like(self, f_ntk, error_ntd, skip_ntd) -> CoderState:
        """A state with other node values; y follows from them."""
        units = self.coder.model_units()
        y = f_ntk @ units.W_dec + units.b_dec + error_ntd + (0 if skip_ntd is None else skip_ntd)
        y = torch.where(self.nodes_nt[..., None], y, self.y_ntd)
        return CoderState(self.coder, f_ntk, error_ntd, skip_ntd, y, self.nodes_nt)


@torch.no_grad()
def coder_states(model, coders: list[SparseCoder], tokens_nt: torch.Tensor) -> list[CoderState]:
    """The node values of every coder on `tokens_nt`, from the clean model's activations (with
    errors kept, splicing the coders in changes nothing, so one plain pass gives them all)."""
    hooks = [h for c in coders for h in coder_hooks(c)]
    acts = capture(model, tokens_nt, hooks)
    n, length = tokens_nt.shape
    states = []
    for coder in coders:
        device = coder.W_dec.device
        x_ntd = acts[coder.cfg.hook].view(n, length, -1).to(device)
        y_ntd = acts[output_hook(coder)].view(n, length, -1).to(device)
        nodes_nt = coder.inliers(x_ntd.flatten(0, 1)).view(n, length)
        nodes_nt[:, 0] = False  # BOS, which splice never edits
        x_td = x_ntd[nodes_nt]
        code = coder.encode(x_td)
        f_ntk = torch.zeros(n, length, coder.cfg.n_latents, device=device)
        f_ntk[nodes_nt] = densify(code.indices_bk, code.values_bk.detach(), coder.cfg.n_latents)
        error = torch.zeros_like(y_ntd)
        error[nodes_nt] = y_ntd[nodes_nt] - coder.reconstruct(x_td, code).detach()
        skip = None
        if coder.cfg.skip:
            skip = torch.zeros_like(y_ntd)
            skip[nodes_nt] = x_td @ coder.model_units().W_skip.T
        states.append(CoderState(coder, f_ntk, error, skip, y_ntd, nodes_nt))
    return states


def baseline(kind: str, clean: list[CoderState], corrupt: list[CoderState], calibration: list[CoderState] | None) -> list[CoderState]:
    """The node values a patch or an ablation sets (see the module docstring)."""
    if kind not in BASELINES:
        raise BadInput(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    if kind == "corrupt":
        return corrupt
    out = []
    for state, calib in zip(clean, calibration or [None] * len(clean)):
        if kind == "zero":
            zero = torch.zeros_like(state.error_ntd)
            out.append(state.like(torch.zeros_like(state.f_ntk), zero, None if state.skip_ntd is None else zero))
        else:
            if calib is None:
                raise BadInput("a mean baseline needs calibration prompts")
            if calib.f_ntk.shape[1] != state.f_ntk.shape[1]:
                raise BadInput("calibration prompts must have the task's length")
            n = len(state.f_ntk)
            out.append(state.like(*(None if t is None else t.mean(0, keepdim=True).expand(n, *t.shape[1:])
                                    for t in (calib.f_ntk, calib.error_ntd, calib.skip_ntd))))
    return out
