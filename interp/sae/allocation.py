"""What the batch-level coders (BatchTopK, mutual choice, feature choice) share: turning a set of
(token, latent) matches into the padded sparse code, and thresholds that make inference on one
token independent of the rest of its batch.

In training these coders choose matches over the whole batch, so a token's latents depend on its
neighbours. At inference (`coder.eval()`) they instead keep every latent whose pre-activation
exceeds a threshold estimated during training (`threshold`, a scalar or one per latent), a rule
that reads one token at a time: a token gets the same code alone as in any batch.
"""

from __future__ import annotations

import torch

from interp import distributed


def padded_code(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) (n_rows, widest row) of latents `cols` active in tokens `rows` with
    `values`; index -1 and value 0 pad short rows."""
    counts = torch.bincount(rows, minlength=n_rows)
    width = max(1, int(counts.max())) if len(rows) else 1
    order = torch.argsort(rows, stable=True)
    rows, cols, values = rows[order], cols[order], values[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - starts[rows]
    indices_bk = torch.full((n_rows, width), -1, dtype=torch.long, device=rows.device)
    indices_bk[rows, slot] = cols
    values_bk = torch.zeros((n_rows, width), dtype=values.dtype, device=values.device)
    values_bk[rows, slot] = values
    return indices_bk, values_bk


def select_above(pre_bn: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference rule: latents with pre-activation above `threshold` (and above 0), per token,
    with their pre-activations."""
    rows, cols = ((pre_bn > threshold) & (pre_bn > 0)).nonzero(as_tuple=True)
    return padded_code(rows, cols, pre_bn[rows, cols], len(pre_bn))


def batch_topk(pre_bn: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The `budget` largest positive pre-activations of the whole batch: (rows, cols, values).

    One top-`budget` over all B x n entries is slow on the CPU. Instead each row offers its top-c candidates (c = twice the mean share); they are a subset
    of the batch, so their budget-th largest is a lower bound of the true cut. Every entry at or above
    that bound (a few more than `budget`, however the top is spread over rows) then goes into
    an exact top-`budget`."""
    if distributed.across_ranks():
        return _batch_topk_across_ranks(pre_bn, budget)
    B, n = pre_bn.shape
    budget = min(budget, pre_bn.numel())
    per_row = min(n, 2 * -(-budget // B))
    candidates_e = pre_bn.topk(per_row, dim=1, sorted=False).values.flatten()
    bound = candidates_e.topk(budget, sorted=False).values.min()
    rows, cols = (pre_bn >= bound if bound > 0 else pre_bn > 0).nonzero(as_tuple=True)
    values = pre_bn[rows, cols]
    if len(values) > budget:
        top = values.topk(budget, sorted=False).indices
        rows, cols, values = rows[top], cols[top], values[top]
    return rows, cols, values


def _batch_topk_across_ranks(pre_bn: torch.Tensor, budget: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`batch_topk` of the global batch under data parallelism, each rank holding a share of it
    (`budget`: this share's, k x its tokens): the global budget's largest entries lie among each
    share's own largest that many, so every rank offers those (padded to the same count), all
    ranks take the same cut from them all, and each keeps its entries at or above it. The same
    set as one process's top of the concatenated batch, ties at the cut aside."""
    total = distributed.total_over_ranks(budget, pre_bn.device)
    offered = pre_bn.flatten().topk(min(total, pre_bn.numel()), sorted=False).values
    padded = torch.full((total,), float("-inf"), device=pre_bn.device, dtype=pre_bn.dtype)
    padded[: len(offered)] = offered
    cut = distributed.gather_rows(padded).topk(total, sorted=False).values.min()
    rows, cols = (pre_bn >= cut if cut > 0 else pre_bn > 0).nonzero(as_tuple=True)
    return rows, cols, pre_bn[rows, cols]


@torch.no_grad()
def update_ema(running: torch.Tensor, observed: torch.Tensor, rate: float, started: torch.Tensor) -> None:
    """running <- (1 - rate) running + rate observed; the first observation is taken as is."""
    if not bool(started):
        running.copy_(observed)
        started.fill_(True)
    else:
        running.lerp_(observed.to(running.dtype), rate)
