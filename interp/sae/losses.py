"""The custom autograd a coder's training step uses: the reconstruction loss (FVU) with a one-pass
backward, and the encoder bias that also carries the decoder bias's gradient. Each replaces what
autograd would build from elementwise ops with fewer passes over (tokens, d) tensors; bench/
train_step.py measures the step they are part of.
"""

from __future__ import annotations

import torch

from interp import distributed
from interp.kernels import torch_ops


class _ShiftedEncoderBias(torch.autograd.Function):
    """b_enc forward; backward also gives b_dec the gradient it gets through the encoder input
    x - b_dec of z = W_enc (x - b_dec) + b_enc, which is -(d b_enc) W_enc: one matrix-vector
    product, where autograd through the subtraction would gather a (tokens, d) gradient of the
    input and sum it."""

    @staticmethod
    def forward(ctx, b_enc_n, W_enc_nd, b_dec_d):
        ctx.save_for_backward(W_enc_nd)
        ctx.b_dec_dtype = b_dec_d.dtype
        return b_enc_n.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_n):
        (W_enc_nd,) = ctx.saved_tensors
        grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_b_dec = -_weighted_row_sum(grad_n.to(W_enc_nd.dtype), W_enc_nd).to(ctx.b_dec_dtype)
        return grad_n, None, grad_b_dec


def shifted_encoder_bias(b_enc_n: torch.Tensor, W_enc_nd: torch.Tensor, b_dec_d: torch.Tensor) -> torch.Tensor:
    """b_enc, whose backward also gives b_dec its gradient through z = W_enc (x - b_dec) + b_enc."""
    return _ShiftedEncoderBias.apply(b_enc_n, W_enc_nd, b_dec_d)


def _weighted_row_sum(weights_n: torch.Tensor, table_nd: torch.Tensor) -> torch.Tensor:
    """weights @ table. The CPU's BLAS computes a vector-matrix product on one core; the kernels'
    segment sum over 8 blocks of rows uses all of them, and the 8 partial sums are added."""
    if table_nd.device.type != "cpu":
        return weights_n @ table_nd
    n, step = len(table_nd), -(-len(table_nd) // 8)
    bounds = torch.arange(0, n + step, step).clamp(max=n)  # the last bound is the first >= n
    return torch_ops.segment_sum(table_nd, torch.arange(n), weights_n, bounds).sum(0)


class _SquaredError(torch.autograd.Function):
    """sum ||x_hat - target||^2 as one dot product, and a backward of one pass: autograd through
    (target - x_hat).pow(2).sum() writes the square and three more (tokens, d) tensors."""

    @staticmethod
    def forward(ctx, x_hat, target):
        diff = (x_hat - target).flatten()
        ctx.save_for_backward(diff)
        ctx.shape = x_hat.shape
        return torch.dot(diff, diff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        grad_x_hat = (diff * (2 * grad)).view(ctx.shape)
        return grad_x_hat, -grad_x_hat if ctx.needs_input_grad[1] else None


def total_variance(target: torch.Tensor) -> torch.Tensor:
    """sum ||target - mean(target)||^2 over the batch: the FVU's denominator. Under data
    parallelism (`interp.distributed.batch_across_ranks`) over the global batch, every rank's
    share of it."""
    if not distributed.across_ranks():
        centered = (target - target.mean(0)).flatten()
        return torch.dot(centered, centered)
    count = distributed.sum_over_ranks(torch.tensor(float(len(target)), device=target.device, dtype=target.dtype))
    mean = distributed.sum_over_ranks(target.sum(0)) / count
    centered = (target - mean).flatten()
    return distributed.sum_over_ranks(torch.dot(centered, centered))


def fraction_unexplained(target: torch.Tensor, x_hat: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """FVU = sum ||target - x_hat||^2 / sum ||target - mean(target)||^2 over the batch; pass
    `variance` when total_variance(target) is already known."""
    variance = total_variance(target) if variance is None else variance
    return _SquaredError.apply(x_hat, target) / variance.clamp_min(1e-12)
