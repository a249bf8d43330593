"""The torch implementation of the four sparse primitives (CPU, or CUDA without Triton).

Each primitive reads only the rows it needs, through `embedding_bag`, whose CPU kernel is
multithreaded and accumulates half-precision inputs in fp32, and (for segment_sum_dot's dots on
the CPU) torch's sampled sparse product. Callers (ops.py) have already replaced sentinel indices
by 0 with weight 0, so no primitive sees a -1.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


def gather_sum(
    table_nd: torch.Tensor,
    indices_bk: torch.Tensor,
    weights_bk: torch.Tensor,
    bias_d: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]] (+ bias), in the table's dtype."""
    weights_bk = weights_bk.to(table_nd.dtype)
    used_bk = weights_bk != 0
    if used_bk.float().mean() < 0.5:
        # Mostly empty slots (a padded code of uneven rows): bag only the used entries.
        counts_b = used_bk.sum(1)
        offsets_b = torch.cumsum(counts_b, 0) - counts_b
        out_bd = F.embedding_bag(indices_bk[used_bk], table_nd, offsets_b, mode="sum", per_sample_weights=weights_bk[used_bk])
    else:
        out_bd = F.embedding_bag(indices_bk, table_nd, per_sample_weights=weights_bk, mode="sum")
    return out_bd if bias_d is None else out_bd.add_(bias_d)


def segment_sum(
    table_md: torch.Tensor,
    cols_e: torch.Tensor,
    weights_e: torch.Tensor,
    offsets_r1: torch.Tensor,
) -> torch.Tensor:
    """out[r] = sum over e in [offsets[r], offsets[r+1]) of weights[e] * table[cols[e]] (CSR rows)."""
    return F.embedding_bag(
        cols_e,
        table_md.contiguous(),
        offsets_r1,
        mode="sum",
        per_sample_weights=weights_e.to(table_md.dtype),
        include_last_offset=True,
    )


def segment_sum_dot(
    rows_bd: torch.Tensor,
    weights_bk: torch.Tensor,
    order_e: torch.Tensor,
    offsets_r1: torch.Tensor,
    table_rd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, dots) for a padded (B, K) code whose entries, listed as flat positions p = order[e],
    are grouped into CSR rows by offsets: out[r] = sum over the entries of row r of
    weights.flat[p] * rows[p // K], and dots.flat[p] = <rows[p // K], table[r]> (0 at positions
    in no row), in the table's dtype."""
    n_used = int(offsets_r1[-1])
    order_u = order_e[:n_used]
    tokens_u = order_u // weights_bk.shape[1]
    out_rd = segment_sum(rows_bd, tokens_u, weights_bk.reshape(-1)[order_u], offsets_r1)
    rows_bd = rows_bd.to(table_rd.dtype)
    if table_rd.is_cuda or n_used > table_rd.shape[0] * rows_bd.shape[0]:
        # CUDA without Triton (which has the fast kernel), or more entries than sampled_addmm's
        # (rows, tokens) shape has positions (only when tokens repeat a latent and k > n).
        latents_u = torch.repeat_interleave(torch.arange(len(offsets_r1) - 1, device=order_e.device), offsets_r1.diff())
        dots_u = torch.bmm(table_rd[latents_u][:, None, :], rows_bd[tokens_u][:, :, None]).reshape(-1)
    else:
        dots_u = _csr_dots(table_rd, rows_bd, tokens_u, offsets_r1)
    dots_bk = torch.zeros(weights_bk.shape, dtype=dots_u.dtype, device=dots_u.device)
    return out_rd, dots_bk.view(-1).index_copy_(0, order_u, dots_u).view_as(weights_bk)


def gather_dot(table_nd: torch.Tensor, indices_bk: torch.Tensor, rows_bd: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <rows[b], table[indices[b, j]]>, in the table's dtype."""
    if table_nd.is_cuda:
        # The fused kernel below has no half-precision CUDA version; cuBLAS accumulates in fp32.
        return torch.bmm(table_nd[indices_bk], rows_bd.to(table_nd.dtype)[:, :, None])[..., 0]
    B, k = indices_bk.shape
    flat_e = indices_bk.reshape(-1)
    offsets_b = torch.arange(0, B * k, k, device=flat_e.device)
    bag_e = torch.arange(B, device=flat_e.device).repeat_interleave(k)
    # This is embedding_bag's gradient with respect to its per-sample weights: one fused pass
    # over the selected rows, without materialising the (B, k, d) gather.
    out_e = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows_bd.to(table_nd.dtype).contiguous(), table_nd, flat_e, offsets_b, bag_e, 0, -1
    )
    return out_e.view(B, k)


def _csr_dots(table_rd: torch.Tensor, rows_bd: torch.Tensor, cols_u: torch.Tensor, offsets_r1: torch.Tensor) -> torch.Tensor:
    """dots[e] = <table[r], rows[cols[e]]> for each entry e of CSR row r: torch's sampled matrix
    product (faster than embedding_bag's per-sample-weights gradient in the CPU training step),
    which has no half-precision CPU kernel: half inputs are
    computed in fp32. Its output is beta * pattern's values + the dots, hence zero values."""
    dtype = table_rd.dtype if table_rd.dtype in (torch.float32, torch.float64) else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            offsets_r1, cols_u, torch.zeros(len(cols_u), dtype=dtype), (len(table_rd), len(rows_bd)), check_invariants=False
        )
    dots_u = torch.sparse.sampled_addmm(pattern, table_rd.to(dtype), rows_bd.to(dtype).t(), beta=0.0).values()
    return dots_u.to(table_rd.dtype)
