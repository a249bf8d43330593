"""The sparse products as autograd Functions, over whichever primitives dispatch picked.

Both products reduce to four primitives (implemented in torch_ops.py and triton_ops.py):
- gather_sum:  out[b] = sum_j w[b, j] * T[idx[b, j]]              decode forward, encoder dx
- gather_dot:  out[b, j] = <r[b], T[idx[b, j]]>                   decode d values, encode forward
- segment_sum: the same gather-sum over CSR rows; with the active entries sorted by latent it
               is the scatter-add of outer products, d W = sum over (b, j) of w[b, j] r[b],
               written row by row without atomics                 decode d W_dec, encoder d W_enc
- segment_sum_dot: segment_sum plus, for each entry, the dot of its gathered row with its CSR
               row's table row: one pass by latent reads W_dec once for d W_dec and d values
                                                                  decode backward

The segment sums need the code's entries sorted by latent. A `LatentLayout` (`latent_layout`)
holds that sort for one indices tensor, made on first use in a backward pass; the caller passes
one layout to the decode and encode_selected of the same code so that they sort once. Nothing is
cached between calls otherwise.
"""

from __future__ import annotations

import logging
import operator
from types import ModuleType

import numpy as np
import torch

from .dispatch import backend
from .reference import decode_reference, encode_selected_reference

log = logging.getLogger("interp.kernels")


def _primitives(name: str) -> ModuleType:
    # Imported on first use: Triton reads TRITON_INTERPRET when its kernels are defined.
    if name == "triton":
        from . import triton_ops

        return triton_ops
    from . import torch_ops

    return torch_ops


def _check_code(indices_bk: torch.Tensor, values_bk: torch.Tensor | None = None) -> None:
    if indices_bk.dim() != 2 or indices_bk.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be a 2-D int64 or int32 tensor, got {indices_bk.dtype} {tuple(indices_bk.shape)}")
    if values_bk is not None and values_bk.shape != indices_bk.shape:
        raise ValueError(f"values {tuple(values_bk.shape)} and indices {tuple(indices_bk.shape)} differ in shape")


def _without_sentinels(indices_bk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices with -1 replaced by latent 0, mask of the real entries); callers zero the weights."""
    valid_bk = indices_bk >= 0
    return indices_bk.clamp(min=0).long().contiguous(), valid_bk


def _stable_order_cpu(keys_e: torch.Tensor, max_key: int) -> torch.Tensor:
    """The stable argsort of non-negative int32 keys, all at most `max_key`, on the CPU.

    Not torch.sort: its CPU sort runs on the intra-op thread pool, whose barriers stall when the
    cores are busy with other work, and running it on one thread takes torch.set_num_threads, a
    process-global setting. numpy's stable sort is single-threaded, and a radix sort for 16-bit
    integers (wider ones get a much slower timsort), so wider keys take two stable 16-bit passes:
    by the low half, then by the high half."""
    keys = keys_e.numpy()
    if max_key < 1 << 16:
        order = np.argsort(keys.astype(np.uint16), kind="stable")
    else:
        order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order).long()


def _by_latent(
    indices_bk: torch.Tensor, valid_bk: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real entries grouped by latent: (order_e, offsets_n1) of a CSR (n, B) layout, order_e
    listing flat positions into the code (entry p is token p // k).

    Empty slots sort last, past offsets[n], so no segment reads them (a batch-level coder's padded
    code can be mostly empty slots: one huge-norm token widens every row)."""
    # int32 keys sort faster, and n_latents + 1 fits.
    keys_e = torch.where(valid_bk, indices_bk, n_latents).reshape(-1).to(torch.int32)
    order_e = torch.sort(keys_e, stable=True)[1] if keys_e.is_cuda else _stable_order_cpu(keys_e, n_latents)
    # Latent i's entries start after all entries of smaller latents: counts, cheaper than a
    # search of the sorted keys.
    offsets_n1 = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices_bk.device)
    torch.cumsum(torch.bincount(keys_e, minlength=n_latents + 1)[:n_latents], 0, out=offsets_n1[1:])
    return order_e, offsets_n1


def _segment_sum_by_latent(prims: ModuleType, table_bd, weights_bk, order_e, offsets_n1) -> torch.Tensor:
    """out[i] = sum over latent i's entries (b, j) of weights[b, j] * table[b]: a CSR segment sum
    over the entries in `_by_latent` order."""
    return prims.segment_sum(table_bd, order_e // weights_bk.shape[1], weights_bk.reshape(-1)[order_e], offsets_n1)


class LatentLayout:
    """One code's active entries grouped by latent, for the sparse backward passes: the sort
    `_by_latent` makes, done on first use and kept. Make one with `latent_layout(indices_bk,
    n_latents)` and pass it as `layout=` to the decode and the encode_selected of the same
    indices: the backward of whichever runs first sorts, the other reuses the sort.

    A layout belongs to its indices tensor (or a view of the same memory, with the same shape
    and strides) in its current contents, and to one number of latents (the tables' rows); a
    product given other indices, other latents, or indices changed in place since the layout was
    made raises ValueError. It keeps the indices, and once sorted the order, as long as it lives:
    make a fresh one per code."""

    def __init__(self, indices_bk: torch.Tensor, n_latents: int):
        _check_code(indices_bk)
        n_latents = operator.index(n_latents)
        if not 0 < n_latents < 2**31 - 1:
            # The sort's keys are int32, n_latents itself marking empty slots.
            raise ValueError(f"n_latents must lie in [1, 2^31 - 1), got {n_latents}")
        self.indices_bk = indices_bk
        self.n_latents = n_latents
        self._version = indices_bk._version
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        state = "sorted" if self._sorted is not None else "not sorted yet"
        return f"LatentLayout(indices {tuple(self.indices_bk.shape)}, n_latents={self.n_latents}, {state})"

    def check(self, indices_bk: torch.Tensor, n_latents: int) -> None:
        """Raise ValueError unless this layout was made for `indices_bk`, as they are now, and
        `n_latents` latents."""
        mine = self.indices_bk
        same_memory = indices_bk is mine or (
            indices_bk.device == mine.device
            and indices_bk.dtype == mine.dtype
            and indices_bk.shape == mine.shape
            and indices_bk.stride() == mine.stride()
            and indices_bk.data_ptr() == mine.data_ptr()
        )
        if not same_memory:
            raise ValueError(
                f"layout made for other indices ({tuple(mine.shape)} {mine.dtype}) than these "
                f"({tuple(indices_bk.shape)} {indices_bk.dtype}): pass the tensor it was made from"
            )
        if n_latents != self.n_latents:
            raise ValueError(f"layout made for {self.n_latents} latents, used with a table of {n_latents} rows")
        if indices_bk._version != self._version:
            raise ValueError("the indices changed in place since their layout was made: make a new layout")

    def sorted(self, idx_bk: torch.Tensor, valid_bk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_e, offsets_n1); idx_bk and valid_bk are the indices' `_without_sentinels`."""
        if self._sorted is None:
            self._sorted = _by_latent(idx_bk, valid_bk, self.n_latents)
        return self._sorted


def latent_layout(indices_bk: torch.Tensor, n_latents: int) -> LatentLayout:
    """A layout of the code `indices_bk` (B, k) over `n_latents` latents, sorted lazily; pass it
    as `layout=` to the decode and encode_selected of these indices to sort them once."""
    return LatentLayout(indices_bk, n_latents)


def _sorted_by_latent(
    layout: LatentLayout | None, idx_bk: torch.Tensor, valid_bk: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared layout's sort, or without one this product's own."""
    return _by_latent(idx_bk, valid_bk, n_latents) if layout is None else layout.sorted(idx_bk, valid_bk)


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices_bk, values_bk, W_nd, bias_d, prims, layout):
        idx_bk, valid_bk = _without_sentinels(indices_bk)
        weights_bk = (values_bk * valid_bk).to(W_nd.dtype)
        ctx.layout = layout
        ctx.prims, ctx.values_dtype = prims, values_bk.dtype
        ctx.bias_dtype = None if bias_d is None else bias_d.dtype
        ctx.save_for_backward(idx_bk, valid_bk, weights_bk, W_nd)
        return prims.gather_sum(W_nd, idx_bk, weights_bk, bias_d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_bd):
        idx_bk, valid_bk, weights_bk, W_nd = ctx.saved_tensors
        prims = ctx.prims
        grad_values = grad_W = grad_bias = None
        if ctx.needs_input_grad[2]:
            order_e, offsets_n1 = _sorted_by_latent(ctx.layout, idx_bk, valid_bk, W_nd.shape[0])
            if ctx.needs_input_grad[1]:
                # One pass by latent reads each row of W once for both gradients.
                grad_W, grad_values = prims.segment_sum_dot(grad_bd, weights_bk, order_e, offsets_n1, W_nd)
            else:
                grad_W = _segment_sum_by_latent(prims, grad_bd, weights_bk, order_e, offsets_n1)
            grad_W = grad_W.to(W_nd.dtype)
        elif ctx.needs_input_grad[1]:
            # The fused pass writes 0 at empty slots; the gather reads latent 0 there.
            grad_values = prims.gather_dot(W_nd, idx_bk, grad_bd) * valid_bk
        if grad_values is not None:
            grad_values = grad_values.to(ctx.values_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_bd.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return None, grad_values, grad_W, grad_bias, None, None


class _EncodeSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk, prims, layout):
        idx_bk, valid_bk = _without_sentinels(indices_bk)
        ctx.layout = layout
        ctx.prims = prims
        ctx.dtypes = (x_bd.dtype, W_enc_nd.dtype, b_enc_n.dtype)
        ctx.save_for_backward(x_bd, W_enc_nd, idx_bk, valid_bk)
        if pre_bk is not None:
            # Already computed by the dense no-grad encoder; a copy keeps autograd from
            # aliasing the caller's tensor.
            return pre_bk.clone()
        pre_bk = prims.gather_dot(W_enc_nd, idx_bk, x_bd) + b_enc_n[idx_bk]
        return (pre_bk * valid_bk).to(W_enc_nd.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_bk):
        x_bd, W_enc_nd, idx_bk, valid_bk = ctx.saved_tensors
        prims = ctx.prims
        x_dtype, W_dtype, b_dtype = ctx.dtypes
        n_latents = W_enc_nd.shape[0]
        grad_bk = grad_bk * valid_bk
        weights_bk = grad_bk.to(W_dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = prims.gather_sum(W_enc_nd, idx_bk, weights_bk).to(x_dtype)
        if ctx.needs_input_grad[1]:
            order_e, offsets_n1 = _sorted_by_latent(ctx.layout, idx_bk, valid_bk, n_latents)
            grad_W = _segment_sum_by_latent(prims, x_bd, weights_bk, order_e, offsets_n1).to(W_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=torch.float32, device=idx_bk.device)
            grad_b.index_add_(0, idx_bk.reshape(-1), grad_bk.reshape(-1).float())
            grad_b = grad_b.to(b_dtype)
        return grad_x, grad_W, grad_b, None, None, None, None


def decode(
    indices_bk: torch.Tensor,
    values_bk: torch.Tensor,
    W_nd: torch.Tensor,
    bias_d: torch.Tensor | None = None,
    *,
    layout: LatentLayout | None = None,
) -> torch.Tensor:
    """out[b] = sum_j values[b, j] * W[indices[b, j]] (+ bias); index -1 marks an empty slot.

    Differentiable in values, W and bias. The result has W's dtype; accumulation is in fp32.
    `layout` (from `latent_layout(indices_bk, W_nd.shape[0])`) shares the backward's sort of the
    entries by latent with other products of these indices; without one this call sorts its own.
    """
    _check_code(indices_bk, values_bk)
    if layout is not None:
        layout.check(indices_bk, W_nd.shape[0])
    name = backend(indices_bk, values_bk, W_nd)
    log.debug("decode: backend=%s B=%d k=%d n=%d d=%d %s", name, *indices_bk.shape, *W_nd.shape, W_nd.dtype)
    if name == "reference":
        return decode_reference(indices_bk, values_bk, W_nd, bias_d)
    return _Decode.apply(indices_bk, values_bk, W_nd, bias_d, _primitives(name), layout)


def encode_selected(
    x_bd: torch.Tensor,
    W_enc_nd: torch.Tensor,
    b_enc_n: torch.Tensor,
    indices_bk: torch.Tensor,
    pre_bk: torch.Tensor | None = None,
    *,
    layout: LatentLayout | None = None,
) -> torch.Tensor:
    """pre[b, j] = <x[b], W_enc[indices[b, j]]> + b_enc[indices[b, j]], with a sparse backward.

    If `pre_bk` is given (gathered from a no-grad dense encoder pass) it is returned as the
    value and treated as a constant; gradients flow to x, W_enc and b_enc only through the
    selected latents. Sentinel entries (index -1) read 0 when computed here and get no gradient.
    `layout` (from `latent_layout(indices_bk, W_enc_nd.shape[0])`) shares the backward's sort of
    the entries by latent with other products of these indices; without one this call sorts its own.
    """
    _check_code(indices_bk, pre_bk)
    if layout is not None:
        layout.check(indices_bk, W_enc_nd.shape[0])
    name = backend(x_bd, W_enc_nd, indices_bk)
    log.debug("encode_selected: backend=%s B=%d k=%d n=%d d=%d %s", name, *indices_bk.shape, *W_enc_nd.shape, W_enc_nd.dtype)
    if name == "reference":
        return encode_selected_reference(x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk)
    return _EncodeSelected.apply(x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk, _primitives(name), layout)
