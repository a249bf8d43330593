"""Is a circuit the mechanism? Run the model with every node outside the circuit set to its
baseline value (states.baseline) and the circuit's own nodes computed as the model runs, coders
spliced in with their errors (Marks et al. 2024, section 3):

    faithfulness(C) = (m(C) - m(empty)) / (m(M) - m(empty))      m(M): the whole model
    completeness(C) = (m(M \\ C) - m(empty)) / (m(M) - m(empty))   the model without the circuit

m is the task metric averaged over prompts. A node of the circuit is (coder, kind, latent,
group): in groups where a feature is not in the circuit it takes its baseline value, wherever it
fires or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.circuits.attribution import Groups
from interp.circuits.states import CoderState, Node
from interp.hooks import Spliced, splice
from interp.kernels.reference import densify
from interp.sae.base import SparseCoder


@dataclass
class Membership:
    """Which of one coder's nodes are in a circuit, per group."""

    feature_gk: torch.Tensor
    """(groups, latents) bool"""
    error_g: torch.Tensor
    skip_g: torch.Tensor

    @classmethod
    def none(cls, coder: SparseCoder, n_groups: int) -> Membership:
        device = coder.W_dec.device
        return cls(torch.zeros(n_groups, coder.cfg.n_latents, dtype=torch.bool, device=device),
                   torch.zeros(n_groups, dtype=torch.bool, device=device), torch.zeros(n_groups, dtype=torch.bool, device=device))

    @classmethod
    def everything(cls, coder: SparseCoder, n_groups: int) -> Membership:
        none = cls.none(coder, n_groups)
        return cls(~none.feature_gk, ~none.error_g, ~none.skip_g)

    def complement(self) -> Membership:
        return Membership(~self.feature_gk, ~self.error_g, ~self.skip_g)


def _rewrite(members: dict[int, Membership], baselines: dict[int, CoderState], groups: Groups):
    """splice's rewrite: circuit nodes as computed now, the others at their baseline values."""

    def rewrite(record: Spliced, x_td: torch.Tensor) -> torch.Tensor:
        coder, mask_bt = record.coder, record.mask_bt
        member, base = members[id(coder)], baselines[id(coder)]
        group_t = groups.ids_nt.to(mask_bt.device)[mask_bt].clamp(min=0)
        units = coder.model_units()
        f_tk = densify(record.code.indices_bk, record.code.values_bk, coder.cfg.n_latents).to(units.W_dec.dtype)
        mask = mask_bt.to(base.f_ntk.device)
        f_tk = torch.where(member.feature_gk[group_t], f_tk, base.f_ntk[mask])
        out = f_tk @ units.W_dec + units.b_dec
        out = out + torch.where(member.error_g[group_t][:, None], record.error_td, base.error_ntd[mask])
        if units.W_skip is not None:
            out = out + torch.where(member.skip_g[group_t][:, None], x_td @ units.W_skip.T, base.skip_ntd[mask])
        return out

    return rewrite


@torch.no_grad()
def metric_with(model, task, tokens_nt: torch.Tensor, states: list[CoderState], baselines: list[CoderState],
                members: list[Membership], groups: Groups) -> float:
    """The mean metric with the nodes outside `members` at their baseline values."""
    coders = [s.coder for s in states]
    rewrite = _rewrite({id(c): m for c, m in zip(coders, members)}, {id(c): b for c, b in zip(coders, baselines)}, groups)
    with splice(model, coders, keep_error=True, rewrite=rewrite):
        logits = model(tokens_nt.to(model.cfg.device))
    return float(task.metric_n(logits).mean())


@dataclass
class Faithfulness:
    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    random: list[float]
    """Faithfulness of random circuits of the same sizes (same number of nodes per coder)."""
    without_errors: list[float]
    """Faithfulness of the circuit with its error nodes taken out."""
    m_model: float
    m_empty: float


def memberships(nodes: list[Node], states: list[CoderState], n_groups: int) -> list[Membership]:
    members = [Membership.none(s.coder, n_groups) for s in states]
    for node in nodes:
        member = members[node.coder]
        if node.kind == "feature":
            member.feature_gk[node.group, node.latent] = True
        else:
            (member.error_g if node.kind == "error" else member.skip_g)[node.group] = True
    return members


def faithfulness_curve(model, task, tokens_nt, states, baselines, groups: Groups, ranked: list[Node], sizes: list[int],
                       candidates: list[Node], n_random: int = 5, seed: int = 0, progress=None) -> Faithfulness:
    """Faithfulness and completeness of the top-s nodes of `ranked` for each s in `sizes`, with
    the same for random circuits of s nodes drawn from `candidates` and for each circuit
    without its error nodes."""
    n_groups = len(groups.names)

    def m(nodes=None, everything=False):
        members = [Membership.everything(s.coder, n_groups) for s in states] if everything else memberships(nodes, states, n_groups)
        if progress:
            progress()
        return metric_with(model, task, tokens_nt, states, baselines, members, groups)

    m_model, m_empty = m(everything=True), m([])
    span = m_model - m_empty
    ratio = lambda value: (value - m_empty) / span if span else float("nan")
    rng = torch.Generator().manual_seed(seed)
    faith, complete, random, no_errors = [], [], [], []
    for size in sizes:
        circuit = ranked[:size]
        faith.append(ratio(m(circuit)))
        complement = [member.complement() for member in memberships(circuit, states, n_groups)]
        if progress:
            progress()
        complete.append(ratio(metric_with(model, task, tokens_nt, states, baselines, complement, groups)))
        draws = [ratio(m([candidates[i] for i in torch.randperm(len(candidates), generator=rng)[:size].tolist()]))
                 for _ in range(n_random)]
        random.append(sum(draws) / len(draws) if draws else float("nan"))
        no_errors.append(ratio(m([node for node in circuit if node.kind == "feature"])))
    return Faithfulness(list(sizes), faith, complete, random, no_errors, m_model, m_empty)
