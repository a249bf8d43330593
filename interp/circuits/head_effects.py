"""Each attention head's effect on a task's metric, and each head-to-head edge's: exact activation
and path patching, the reference, and attribution patching, the estimate from one forward and
backward pass; under grouped-query attention, for query heads and for key/value heads.

A head's activation is one of its attention block's per-head hooks (`KINDS`): `z`, a query head's
mixture of values (n_heads of them), or `k` and `v`, a key/value head's keys and values before
rotary (n_kv_heads, each read by n_heads / n_kv_heads query heads). The model expands a key/value
head to its query heads after these hooks, so the gradient at `hook_k` already sums the paths
through every query head that reads it, and patching a key/value head changes what all of them
read: each is counted once, as the one activation it is.

- A head's exact effect: the mean clean metric minus the mean with that head's activation alone
  patched from the corrupt prompts, at every position (one forward pass per head).
- Its attribution patching estimate: -(dm/da) . (a_corrupt - a_clean), summed over positions.
- An edge sender -> receiver (the sender a query head in an earlier layer) by path patching: the
  receiver's activation is taken from a pass where its layer's residual stream holds the clean
  residual plus the sender's corrupt-minus-clean output (z @ W_O[sender]); everything else is
  clean. For a query-head receiver (`z`) only its own z is taken from that pass, so the key/value
  head it shares with its siblings changes for it alone; for a key/value receiver (`k`, `v`) all
  the query heads reading it see the change.
- The edge's attribution patching estimate: the receiver's gradient g = dm/da_receiver from the
  clean pass, the vector-Jacobian product of (g . a_receiver) with the receiver layer's residual
  stream (one backward through that block's attention), dotted with the sender's output change.
"""

from __future__ import annotations

import torch

from interp.circuits.tasks import Task
from interp.errors import BadInput
from interp.hooks import capture, grad_key, patched_logits

KINDS = ("z", "k", "v")


def head_hook(layer: int, kind: str = "z") -> str:
    return f"blocks.{layer}.attn.hook_{kind}"


def z_hook(layer: int) -> str:
    return head_hook(layer, "z")


def heads_of(model, kind: str) -> int:
    """How many heads a layer has of this kind: query heads for z, key/value heads for k and v."""
    if kind not in KINDS:
        raise BadInput(f"unknown head activation {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "z":
        return model.cfg.n_heads
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def head_acts(model, tokens_nt: torch.Tensor, kinds: tuple[str, ...] = ("z",)) -> dict[str, torch.Tensor]:
    """{kind: (layers, prompts, positions, heads, d_head)}: every head's activation of each kind,
    from one forward pass."""
    n, length = tokens_nt.shape
    hooks = {kind: [head_hook(layer, kind) for layer in range(model.cfg.n_layers)] for kind in kinds}
    acts = capture(model, tokens_nt, [hook for kind in kinds for hook in hooks[kind]])
    return {kind: torch.stack([acts[hook].view(n, length, heads_of(model, kind), -1) for hook in hooks[kind]]) for kind in kinds}


def head_z(model, tokens_nt: torch.Tensor) -> torch.Tensor:
    return head_acts(model, tokens_nt)["z"]


def _replace_head(head: int, value_nthd: torch.Tensor):
    def patch(act):
        act = act.clone()
        act[:, :, head] = value_nthd[:, :, head].to(act)
        return act
    return patch


@torch.no_grad()
def patching_effects(model, task: Task, clean: float, corrupt_lnthd: torch.Tensor, kind: str = "z",
                     heads: list[int] | None = None, progress=None) -> torch.Tensor:
    """(len(heads),): the mean clean metric `clean` minus the mean with one head's activation
    patched from the corrupt prompts; heads numbered layer * heads_of(kind) + head, all by default."""
    per_layer = heads_of(model, kind)
    effects = []
    for index in heads if heads is not None else range(model.cfg.n_layers * per_layer):
        layer, head = divmod(index, per_layer)
        logits = patched_logits(model, task.clean_nt, {head_hook(layer, kind): _replace_head(head, corrupt_lnthd[layer])})
        effects.append(clean - float(task.metric_n(logits).mean()))
        if progress:
            progress()
    return torch.tensor(effects)


def attribution_effects(model, task: Task, clean: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{kind: (layers x heads_of(kind),)}: attribution patching's estimate of `patching_effects`
    for each kind of `clean` (kind -> head_acts on the clean prompts), one forward and backward."""
    n, length = task.clean_nt.shape
    hooks = {kind: [head_hook(layer, kind) for layer in range(model.cfg.n_layers)] for kind in clean}
    acts = capture(model, task.clean_nt, [h for kind in hooks for h in hooks[kind]], with_grads=True,
                   objective=lambda logits: task.metric_n(logits).mean())
    effects = {}
    for kind, names in hooks.items():
        grads_lnthd = torch.stack([acts[grad_key(h)].view(n, length, heads_of(model, kind), -1) for h in names])
        # mean m(patched) - mean m(clean) ~ g . (a_corrupt - a_clean), g already the mean's gradient
        # (each prompt's share 1/n); the effect is its negative
        effects[kind] = -(grads_lnthd * (corrupt[kind] - clean[kind]).to(grads_lnthd)).sum((1, 2, 4)).flatten()
    return effects


def _sender_delta(model, z_clean: torch.Tensor, z_corrupt: torch.Tensor, sender: int) -> torch.Tensor:
    """(prompts, positions, d_model): the sender query head's corrupt-minus-clean output."""
    layer, head = divmod(sender, model.cfg.n_heads)
    return (z_corrupt[layer, :, :, head] - z_clean[layer, :, :, head]) @ model.W_O[layer, head].detach().to(z_clean)


def _edge_layers(model, pairs: list[tuple[int, int]], kind: str) -> list[tuple[int, int, int, int]]:
    """(sender layer, sender head, receiver layer, receiver head) of each pair, checked."""
    per_layer = heads_of(model, kind)
    layers = []
    for sender, receiver in pairs:
        (l1, h1), (l2, h2) = divmod(sender, model.cfg.n_heads), divmod(receiver, per_layer)
        if l1 >= l2:
            raise BadInput(f"an edge needs the sender in an earlier layer: L{l1}H{h1} -> L{l2}H{h2} ({kind})")
        layers.append((l1, h1, l2, h2))
    return layers


@torch.no_grad()
def path_patching_effects(model, task: Task, clean: float, z_clean: torch.Tensor, z_corrupt: torch.Tensor,
                          pairs: list[tuple[int, int]], kind: str = "z", progress=None) -> torch.Tensor:
    """(pairs,): for each (sender query head, receiver head of `kind`), the mean clean metric
    `clean` minus the mean when only the receiver reads the sender's corrupt output through the
    residual stream (every other path clean)."""
    per_layer = heads_of(model, kind)
    n, length = task.clean_nt.shape
    effects = []
    for (sender, _), (_, _, l2, h2) in zip(pairs, _edge_layers(model, pairs, kind)):
        delta_ntm = _sender_delta(model, z_clean, z_corrupt, sender)
        moved = capture(model, task.clean_nt, [head_hook(l2, kind)],
                        patch={f"blocks.{l2}.hook_resid_pre": lambda act, d=delta_ntm: act + d.to(act)})
        receiver_nthd = moved[head_hook(l2, kind)].view(n, length, per_layer, -1)
        logits = patched_logits(model, task.clean_nt, {head_hook(l2, kind): _replace_head(h2, receiver_nthd)})
        effects.append(clean - float(task.metric_n(logits).mean()))
        if progress:
            progress()
    return torch.tensor(effects)


def edge_attribution_effects(model, task: Task, z_clean: torch.Tensor, z_corrupt: torch.Tensor,
                             pairs: list[tuple[int, int]], kind: str = "z") -> torch.Tensor:
    """(pairs,): attribution patching's estimate of `path_patching_effects`: one forward and
    backward for every receiver's gradient, then one backward through a receiver's attention
    block per receiver, shared by all its senders."""
    if not pairs:
        return torch.zeros(0)
    layers = _edge_layers(model, pairs, kind)
    receivers = sorted({(l2, h2) for _, _, l2, h2 in layers})
    hooks = sorted({head_hook(l2, kind) for l2, _ in receivers})
    n, length = task.clean_nt.shape
    per_layer = heads_of(model, kind)
    grads = capture(model, task.clean_nt, hooks, with_grads=True, objective=lambda logits: task.metric_n(logits).mean())
    reads = {}
    for l2 in sorted({l2 for l2, _ in receivers}):
        resid = f"blocks.{l2}.hook_resid_pre"
        graph = capture(model, task.clean_nt, [resid, head_hook(l2, kind)], keep_graph=True)
        for layer, head in [r for r in receivers if r[0] == l2]:
            g_nthd = grads[grad_key(head_hook(layer, kind))].view(n, length, per_layer, -1)
            act_nthd = graph[head_hook(layer, kind)].view(n, length, per_layer, -1)
            target = (g_nthd[:, :, head].to(act_nthd) * act_nthd[:, :, head]).sum()
            # dm ~ (dm/da) . da and da ~ J d_resid: the receiver's read of the residual stream
            reads[layer, head] = torch.autograd.grad(target, graph[resid], retain_graph=True)[0].detach()
    effects = [-(reads[l2, h2] * _sender_delta(model, z_clean, z_corrupt, sender).to(reads[l2, h2])).sum()
               for (sender, _), (_, _, l2, h2) in zip(pairs, layers)]
    return torch.stack(effects).float()
