"""The effect of each node on the task metric, and of each node on the next coder's nodes.

A node's effect is the change of the metric when the node moves from its clean value to its
baseline value (states.baseline), estimated as in Marks et al. 2024:
- attribution patching (Syed et al. 2023), "atp": (baseline - clean) . dm/dnode at the clean
  prompt; one forward and one backward for every coder at once;
- integrated gradients (Sundararajan et al. 2017), "ig": (baseline - clean) . the mean of
  dm/dnode along the straight path from the coder's clean written activation to its baseline one
  (`steps` points, midpoint rule); `steps` forward and backward passes per coder. By IG's
  completeness the effects of a coder's nodes sum to the exact effect of patching its whole
  written activation as the steps grow (tested).
dm/dnode of a feature is the gradient at the coder's written hook read along the feature's
decoder direction (y is linear in the nodes; the gradient is the model's own, through every
downstream path). Effects are summed over the positions of a group (a role such as IO or END, a
position, or all positions) and averaged over prompts.

An edge (u -> d) between a node u of one coder and a node d of the next coder downstream is the
effect of u on the metric through d: (baseline - clean)_u . d/du [dm/dd . d], with dm/dd fixed at
the clean prompt (Marks et al.'s attribution-patching edges), the model computing everything
between the two coders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from interp.circuits.states import CoderState, Node
from interp.errors import BadInput
from interp.hooks import capture, coder_hooks, grad_key

METHODS = ("atp", "ig")


@dataclass
class Groups:
    """Which group each (prompt, position) belongs to."""

    ids_nt: torch.Tensor
    """(prompts, positions) group index; -1 for positions that are never nodes (BOS)."""
    names: list[str]

    @classmethod
    def of(cls, roles_of_positions: list[list[str]], by: str) -> Groups:
        """by="role": each role (IO, S2, END, ...), other positions together as "other";
        "position": each position; "all": one group."""
        if by not in ("role", "position", "all"):
            raise BadInput(f"unknown grouping {by!r}; choose role, position or all")
        labels = [[(r or "other") if by == "role" else f"pos{t}" if by == "position" else "all"
                   for t, r in enumerate(row)] for row in roles_of_positions]
        names = sorted({label for row in labels for label in row[1:]}, key=lambda s: (s == "other", s))
        index = {name: i for i, name in enumerate(names)}
        ids = torch.tensor([[index[label] if t else -1 for t, label in enumerate(row)] for row in labels])
        return cls(ids, names)

    def total(self, per_position_nt: torch.Tensor) -> torch.Tensor:
        """(prompts, positions, *rest) -> (groups, *rest): summed over each group's positions,
        averaged over prompts."""
        n = per_position_nt.shape[0]
        keep = self.ids_nt >= 0
        values = per_position_nt[keep.to(per_position_nt.device)]
        out = torch.zeros(len(self.names), *values.shape[1:], device=values.device, dtype=values.dtype)
        return out.index_add_(0, self.ids_nt[keep].to(values.device), values) / n


@dataclass
class NodeEffects:
    """One coder's node effects, per group."""

    feature_gk: torch.Tensor
    """(groups, latents)"""
    error_g: torch.Tensor
    skip_g: torch.Tensor | None


def _effects(clean: CoderState, patched: CoderState, grad_ntd: torch.Tensor, groups: Groups) -> NodeEffects:
    W_dec = clean.coder.model_units().W_dec
    grad_ntd = grad_ntd * clean.nodes_nt[..., None]
    grad_ntk = grad_ntd @ W_dec.T
    feature = groups.total((patched.f_ntk - clean.f_ntk) * grad_ntk)
    error = groups.total(((patched.error_ntd - clean.error_ntd) * grad_ntd).sum(-1))
    skip = None if clean.skip_ntd is None else groups.total(((patched.skip_ntd - clean.skip_ntd) * grad_ntd).sum(-1))
    return NodeEffects(feature, error, skip)


def metric_gradients(model, tokens_nt, hooks: list[str], objective, patch=None) -> dict[str, torch.Tensor]:
    """{hook: (prompts, positions, width)} d objective / d activation at each hook."""
    n, length = tokens_nt.shape
    acts = capture(model, tokens_nt, hooks, with_grads=True, objective=objective, patch=patch)
    return {hook: acts[grad_key(hook)].view(n, length, -1) for hook in hooks}


def node_effects(model, tokens_nt: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor],
                 clean: list[CoderState], patched: list[CoderState], groups: Groups, method: str = "atp",
                 steps: int = 10, progress: Callable[[], None] | None = None,
                 clean_grads: dict[str, torch.Tensor] | None = None) -> list[NodeEffects]:
    """Every coder's node effects on `objective(logits)` (the metric summed over prompts).
    `clean_grads`: `metric_gradients` at the coders' written hooks on the clean prompts, when the
    caller has them already (attribution patching reads nothing else)."""
    if method not in METHODS:
        raise BadInput(f"unknown attribution method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "ig" and steps < 1:
        raise BadInput(f"integrated gradients need at least 1 step, got {steps}")
    hooks = [state.hook for state in clean]
    if method == "atp":
        grads = clean_grads if clean_grads is not None else metric_gradients(model, tokens_nt, hooks, objective)
        if progress:
            progress()
        return [_effects(c, p, grads[c.hook].to(c.y_ntd.device), groups) for c, p in zip(clean, patched)]
    out = []
    for c, p in zip(clean, patched):
        mean_grad = torch.zeros_like(c.y_ntd)
        delta = (p.y_ntd - c.y_ntd) * c.nodes_nt[..., None]  # BOS and tokens no coder covers stay
        for step in range(steps):
            alpha = (step + 0.5) / steps
            on_path = (c.y_ntd + alpha * delta).detach()
            grads = metric_gradients(model, tokens_nt, [c.hook], objective, patch={c.hook: _setter(on_path)})
            mean_grad += grads[c.hook].to(mean_grad.device) / steps
            if progress:
                progress()
        out.append(_effects(c, p, mean_grad, groups))
    return out


def _setter(value_ntd: torch.Tensor):
    def set_to(act):
        return value_ntd.to(act).view(act.shape)
    return set_to


def edges_into(model, tokens_nt: torch.Tensor, upstream: CoderState, up_patched: CoderState, downstream: CoderState,
               down_grad_ntd: torch.Tensor, targets: list[Node], groups: Groups) -> list[NodeEffects]:
    """For each downstream node in `targets`, the edges from every node of `upstream` into it,
    as NodeEffects of the upstream coder (per upstream group). `down_grad_ntd` is dm/dy at the
    downstream coder's written hook on the clean prompts."""
    hooks = list(dict.fromkeys([upstream.hook, *coder_hooks(downstream.coder)]))
    acts = capture(model, tokens_nt, hooks, keep_graph=True)
    n, length = tokens_nt.shape
    y_up = acts[upstream.hook]
    x_down = acts[downstream.coder.cfg.hook]
    y_down = acts[downstream.hook]
    units = downstream.coder.model_units()
    # d f_i / dx: W_enc[i] (model units) where latent i is active; none for a discrete coder's codes
    jacobian = torch.zeros_like(units.W_enc) if downstream.coder.discrete else units.W_enc
    device = downstream.y_ntd.device
    active_ntk = downstream.f_ntk > 0
    out = []
    for target in targets:
        in_group = (groups.ids_nt == target.group).to(device)[..., None]
        if target.kind == "feature":
            w_nt = (down_grad_ntd @ units.W_dec[target.latent]) * active_ntk[..., target.latent]
            g_x = (w_nt[..., None] * in_group) * jacobian[target.latent]
            g_y = torch.zeros_like(down_grad_ntd)
        else:
            w_ntd = down_grad_ntd * in_group
            g_y = w_ntd if target.kind == "error" else torch.zeros_like(w_ntd)
            if target.kind == "error":
                # e = y - reconstruction(x): d/dx of w . reconstruction is sum over active i of (W_dec[i] . w) W_enc[i], plus W_skip^T w
                g_x = -(((w_ntd @ units.W_dec.T) * active_ntk) @ jacobian)
                if units.W_skip is not None:
                    g_x = g_x - w_ntd @ units.W_skip
            else:
                g_x = w_ntd @ units.W_skip
        g_up = torch.zeros_like(upstream.y_ntd)
        outputs, grads = [], []
        for tensor, g in ((x_down, g_x), (y_down, g_y)):
            if tensor is y_up:  # the downstream coder reads (or writes) the upstream one's hook
                g_up += g.to(g_up)
            elif tensor.requires_grad:
                outputs.append(tensor)
                grads.append(g.to(tensor).view(tensor.shape))
        if outputs:
            through = torch.autograd.grad(outputs, y_up, grads, retain_graph=True, allow_unused=True)[0]
            if through is not None:
                g_up += through.detach().view(n, length, -1).to(g_up)
        out.append(_effects(upstream, up_patched, g_up * upstream.nodes_nt[..., None], groups))
    return out
