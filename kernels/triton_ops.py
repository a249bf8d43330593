"""Triton kernels for the four sparse primitives (see ops.py), same signatures as torch_ops.py.

Three kernels cover them: a gather-sum over rows of entries (padded rows of k, or CSR rows for
the latent-sorted scatter), a gather-dot, and the two fused for the decoder's backward. A program
owns one output row (BLOCK_R rows for the fused kernel) and one block of d columns, loads a tile
of the selected table rows per step, and accumulates in fp32 (fp64 for fp64 tables); offsets are
computed in int64, so tables past 2^31 elements (2^20 latents x 2304) work.
Tables and dense operands are read through their strides, so nothing needs to be contiguous;
index and weight vectors are small and arrive contiguous from ops.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_sum_kernel(
    out_ptr,
    table_ptr,
    cols_ptr,
    weights_ptr,
    offsets_ptr,
    bias_ptr,
    D,
    K,
    stride_out_r,
    stride_out_d,
    stride_table_r,
    stride_table_d,
    stride_bias_d,
    CSR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if CSR:
        start = tl.load(offsets_ptr + r)
        end = tl.load(offsets_ptr + r + 1)
    else:
        start = r * K
        end = start + K
    acc_d = tl.zeros([BLOCK_D], dtype=ACC)
    for e0 in range(start, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        mask_e = offs_e < end
        cols_e = tl.load(cols_ptr + offs_e, mask=mask_e, other=0).to(tl.int64)
        w_e = tl.load(weights_ptr + offs_e, mask=mask_e, other=0.0).to(ACC)
        rows_ed = tl.load(
            table_ptr + cols_e[:, None] * stride_table_r + offs_d[None, :] * stride_table_d,
            mask=mask_e[:, None] & mask_d[None, :],
            other=0.0,
        ).to(ACC)
        acc_d += tl.sum(rows_ed * w_e[:, None], axis=0)
    if HAS_BIAS:
        acc_d += tl.load(bias_ptr + offs_d * stride_bias_d, mask=mask_d, other=0.0).to(ACC)
    tl.store(out_ptr + r * stride_out_r + offs_d * stride_out_d, acc_d, mask=mask_d)


@triton.jit
def _gather_dot_kernel(
    out_ptr,
    table_ptr,
    cols_ptr,
    rows_ptr,
    D,
    K,
    stride_table_r,
    stride_table_d,
    stride_rows_b,
    stride_rows_d,
    ACC: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    mask_e = offs_e < K
    cols_e = tl.load(cols_ptr + b * K + offs_e, mask=mask_e, other=0).to(tl.int64)
    acc_e = tl.zeros([BLOCK_E], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        row_d = tl.load(rows_ptr + b * stride_rows_b + offs_d * stride_rows_d, mask=mask_d, other=0.0).to(ACC)
        table_ed = tl.load(
            table_ptr + cols_e[:, None] * stride_table_r + offs_d[None, :] * stride_table_d,
            mask=mask_e[:, None] & mask_d[None, :],
            other=0.0,
        ).to(ACC)
        acc_e += tl.sum(table_ed * row_d[None, :], axis=1)
    tl.store(out_ptr + b * K + offs_e, acc_e, mask=mask_e)


@triton.jit
def _segment_sum_dot_kernel(
    out_ptr,
    dots_ptr,
    rows_ptr,
    table_ptr,
    cols_ptr,
    weights_ptr,
    offsets_ptr,
    R,
    D,
    E,
    stride_out_r,
    stride_out_d,
    stride_rows_b,
    stride_rows_d,
    stride_table_r,
    stride_table_d,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (BLOCK_R consecutive CSR rows, column block), their entries loaded as one
    # (rows, BLOCK_S slots, columns) tile per step. Each table row is read once and serves both
    # sums; programs of one column block run together, so the gathered rows come from L2. The
    # dots are partial over this column block; the caller sums the blocks (no atomics, so the
    # result is deterministic). Entries are read and dots written in CSR order: reading the
    # code's positions through the sort order here instead was slower (bench/decode_gpu.py).
    rows_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows_r < R
    c = tl.program_id(1)
    offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
    start_r = tl.load(offsets_ptr + rows_r, mask=mask_r, other=0)
    count_r = tl.load(offsets_ptr + rows_r + 1, mask=mask_r, other=0) - start_r
    table_rd = tl.load(
        table_ptr + rows_r[:, None] * stride_table_r + offs_d[None, :] * stride_table_d, mask=mask_rd, other=0.0
    ).to(ACC)
    acc_rd = tl.zeros([BLOCK_R, BLOCK_D], dtype=ACC)
    slots_s = tl.arange(0, BLOCK_S)
    for s0 in range(0, tl.max(count_r, axis=0), BLOCK_S):
        mask_rs = (s0 + slots_s)[None, :] < count_r[:, None]
        e_rs = start_r[:, None] + s0 + slots_s[None, :]
        cols_rs = tl.load(cols_ptr + e_rs, mask=mask_rs, other=0).to(tl.int64)
        w_rs = tl.load(weights_ptr + e_rs, mask=mask_rs, other=0.0).to(ACC)
        g_rsd = tl.load(
            rows_ptr + cols_rs[:, :, None] * stride_rows_b + offs_d[None, None, :] * stride_rows_d,
            mask=mask_rs[:, :, None] & mask_rd[:, None, :],
            other=0.0,
        ).to(ACC)
        acc_rd += tl.sum(g_rsd * w_rs[:, :, None], axis=1)
        tl.store(dots_ptr + c * E + e_rs, tl.sum(g_rsd * table_rd[:, None, :], axis=2), mask=mask_rs)
    tl.store(out_ptr + rows_r[:, None] * stride_out_r + offs_d[None, :] * stride_out_d, acc_rd, mask=mask_rd)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _config(kernel: str, D: int, K: int) -> dict:
    """Launch shape of `kernel` ("gather_sum", "segment_sum", "segment_sum_dot" or "gather_dot")
    for width D and K entries per row (0 for CSR rows). Swept on an H100 at d=2304, k=64,
    n=2^17, bf16: the padded kernels want whole rows of k entries per step over narrow column
    blocks; the latent-sorted rows hold B k / n entries on average, so few entries over wide
    blocks (not one, which would serialise a latent that fires on every token). For the fused
    decoder backward one CSR row per program beat 2, 4 and 8 (bench/decode_gpu.py)."""
    block_e, block_d, warps = {
        "gather_sum": (64, 64, 1),
        "gather_dot": (32, 64, 1),
        "segment_sum": (4, 512, 1),
        "segment_sum_dot": (4, 512, 1),
    }[kernel]
    if kernel in ("gather_sum", "gather_dot"):
        block_e = min(block_e, triton.next_power_of_2(K))
    config = {"BLOCK_E": block_e, "BLOCK_D": min(block_d, triton.next_power_of_2(D)), "num_warps": warps}
    if kernel == "segment_sum_dot":
        config.update(BLOCK_R=1, BLOCK_S=config.pop("BLOCK_E"))
    return config


def _launch_gather_sum(kernel, table_nd, cols_e, weights_e, n_rows, K, offsets, bias_d):
    D = table_nd.shape[1]
    out_rd = torch.empty(n_rows, D, dtype=table_nd.dtype, device=table_nd.device)
    if out_rd.numel() == 0:
        return out_rd
    config = _config(kernel, D, K)
    _gather_sum_kernel[(n_rows, triton.cdiv(D, config["BLOCK_D"]))](
        out_rd,
        table_nd,
        cols_e,
        weights_e,
        cols_e if offsets is None else offsets,
        out_rd if bias_d is None else bias_d,
        D,
        K,
        out_rd.stride(0),
        out_rd.stride(1),
        table_nd.stride(0),
        table_nd.stride(1),
        0 if bias_d is None else bias_d.stride(0),
        CSR=offsets is not None,
        HAS_BIAS=bias_d is not None,
        ACC=_acc(table_nd.dtype),
        **config,
    )
    return out_rd


def gather_sum(
    table_nd: torch.Tensor,
    indices_bk: torch.Tensor,
    weights_bk: torch.Tensor,
    bias_d: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[indices[b, j]] (+ bias), in the table's dtype."""
    B, K = indices_bk.shape
    return _launch_gather_sum(
        "gather_sum", table_nd, indices_bk.contiguous(), weights_bk.contiguous(), B, K, None, bias_d
    )


def segment_sum(
    table_md: torch.Tensor,
    cols_e: torch.Tensor,
    weights_e: torch.Tensor,
    offsets_r1: torch.Tensor,
) -> torch.Tensor:
    """out[r] = sum over e in [offsets[r], offsets[r+1]) of weights[e] * table[cols[e]] (CSR rows)."""
    n_rows = offsets_r1.numel() - 1
    return _launch_gather_sum(
        "segment_sum", table_md, cols_e.contiguous(), weights_e.contiguous(), n_rows, 0, offsets_r1, None
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
    in no row), dots in the accumulator's dtype."""
    n_rows = offsets_r1.numel() - 1
    B, K = weights_bk.shape
    D = rows_bd.shape[1]
    out_rd = torch.empty(n_rows, D, dtype=rows_bd.dtype, device=rows_bd.device)
    config = _config("segment_sum_dot", D, 0)
    blocks = triton.cdiv(D, config["BLOCK_D"])
    dots_ce = torch.zeros(blocks, B * K, dtype=_acc_dtype(table_rd.dtype), device=rows_bd.device)
    if out_rd.numel() > 0:
        _segment_sum_dot_kernel[(triton.cdiv(n_rows, config["BLOCK_R"]), blocks)](
            out_rd,
            dots_ce,
            rows_bd,
            table_rd,
            order_e // K,
            weights_bk.reshape(-1)[order_e],
            offsets_r1,
            n_rows,
            D,
            B * K,
            out_rd.stride(0),
            out_rd.stride(1),
            rows_bd.stride(0),
            rows_bd.stride(1),
            table_rd.stride(0),
            table_rd.stride(1),
            ACC=_acc(table_rd.dtype),
            **config,
        )
    # Entries past the last row were never written: their partial dots stay 0.
    dots_e = dots_ce.sum(0)
    return out_rd, torch.empty_like(dots_e).scatter_(0, order_e, dots_e).view(B, K)


def gather_dot(table_nd: torch.Tensor, indices_bk: torch.Tensor, rows_bd: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <rows[b], table[indices[b, j]]>, in the accumulator's dtype."""
    B, K = indices_bk.shape
    D = table_nd.shape[1]
    out_bk = torch.empty(B, K, dtype=_acc_dtype(table_nd.dtype), device=table_nd.device)
    if out_bk.numel() == 0:
        return out_bk
    config = _config("gather_dot", D, K)
    _gather_dot_kernel[(B, triton.cdiv(K, config["BLOCK_E"]))](
        out_bk,
        table_nd,
        indices_bk.contiguous(),
        rows_bd,
        D,
        K,
        table_nd.stride(0),
        table_nd.stride(1),
        rows_bd.stride(0),
        rows_bd.stride(1),
        ACC=_acc(table_nd.dtype),
        **config,
    )
    return out_bk
