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
"""

from __future__ import annotations

import logging
import weakref
from types import ModuleType

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


def _serial_sort(keys_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # torch's parallel CPU sort of B k keys is no faster than a serial one, and when the cores
    # are shared it stalls at its barriers: 380 ms instead of 3 ms measured on 2 busy cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.sort(keys_e, stable=True)
    finally:
        torch.set_num_threads(threads)


def _by_latent(
    indices_bk: torch.Tensor, valid_bk: torch.Tensor, n_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The real entries grouped by latent: (order_e, offsets_n1) of a CSR (n, B) layout, order_e
    listing flat positions into the code (entry p is token p // k).

    Empty slots sort last, past offsets[n], so no segment reads them (a batch-level coder's padded
    code can be mostly empty slots: one huge-norm token widens every row)."""
    # int32 keys sort faster, and n_latents + 1 fits.
    keys_e = torch.where(valid_bk, indices_bk, n_latents).reshape(-1).to(torch.int32)
    order_e = torch.sort(keys_e, stable=True)[1] if keys_e.is_cuda else _serial_sort(keys_e)[1]
    # Latent i's entries start after all entries of smaller latents: counts, not a search of the
    # sorted keys (0.13 against 0.28 ms for 131k entries on the CPU).
    offsets_n1 = torch.zeros(n_latents + 1, dtype=torch.int64, device=indices_bk.device)
    torch.cumsum(torch.bincount(keys_e, minlength=n_latents + 1)[:n_latents], 0, out=offsets_n1[1:])
    return order_e, offsets_n1


def _segment_sum_by_latent(prims: ModuleType, table_bd, weights_bk, order_e, offsets_n1) -> torch.Tensor:
    """out[i] = sum over latent i's entries (b, j) of weights[b, j] * table[b]: a CSR segment sum
    over the entries in `_by_latent` order."""
    return prims.segment_sum(table_bd, order_e // weights_bk.shape[1], weights_bk.reshape(-1)[order_e], offsets_n1)


class _LatentLayout:
    """One code's entries grouped by latent (`_by_latent`), sorted on first use and shared by the
    products of the same indices tensor: the decoder and encoder backward of one forward pass sort
    once. A one-slot cache, checked by identity and version of the indices."""

    _last: _LatentLayout | None = None

    def __init__(self, indices_bk: torch.Tensor, n_latents: int):
        self._indices = weakref.ref(indices_bk)
        self._version = indices_bk._version
        self._n_latents = n_latents
        self._sorted: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of(cls, indices_bk: torch.Tensor, n_latents: int) -> _LatentLayout:
        last = cls._last
        if (
            last is None
            or last._indices() is not indices_bk
            or last._version != indices_bk._version
            or last._n_latents != n_latents
        ):
            last = cls._last = cls(indices_bk, n_latents)
        return last

    def sorted(self, idx_bk: torch.Tensor, valid_bk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(order_e, offsets_n1); idx_bk and valid_bk are the indices' `_without_sentinels`."""
        if self._sorted is None:
            self._sorted = _by_latent(idx_bk, valid_bk, self._n_latents)
        return self._sorted


class _Decode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices_bk, values_bk, W_nd, bias_d, prims):
        idx_bk, valid_bk = _without_sentinels(indices_bk)
        weights_bk = (values_bk * valid_bk).to(W_nd.dtype)
        ctx.layout = _LatentLayout.of(indices_bk, W_nd.shape[0])
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
            order_e, offsets_n1 = ctx.layout.sorted(idx_bk, valid_bk)
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
        return None, grad_values, grad_W, grad_bias, None


class _EncodeSelected(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk, prims):
        idx_bk, valid_bk = _without_sentinels(indices_bk)
        ctx.layout = _LatentLayout.of(indices_bk, W_enc_nd.shape[0])
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
            order_e, offsets_n1 = ctx.layout.sorted(idx_bk, valid_bk)
            grad_W = _segment_sum_by_latent(prims, x_bd, weights_bk, order_e, offsets_n1).to(W_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=torch.float32, device=idx_bk.device)
            grad_b.index_add_(0, idx_bk.reshape(-1), grad_bk.reshape(-1).float())
            grad_b = grad_b.to(b_dtype)
        return grad_x, grad_W, grad_b, None, None, None


def decode(
    indices_bk: torch.Tensor,
    values_bk: torch.Tensor,
    W_nd: torch.Tensor,
    bias_d: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[b] = sum_j values[b, j] * W[indices[b, j]] (+ bias); index -1 marks an empty slot.

    Differentiable in values, W and bias. The result has W's dtype; accumulation is in fp32.
    """
    _check_code(indices_bk, values_bk)
    name = backend(indices_bk, values_bk, W_nd)
    log.debug("decode: backend=%s B=%d k=%d n=%d d=%d %s", name, *indices_bk.shape, *W_nd.shape, W_nd.dtype)
    if name == "reference":
        return decode_reference(indices_bk, values_bk, W_nd, bias_d)
    return _Decode.apply(indices_bk, values_bk, W_nd, bias_d, _primitives(name))


def encode_selected(
    x_bd: torch.Tensor,
    W_enc_nd: torch.Tensor,
    b_enc_n: torch.Tensor,
    indices_bk: torch.Tensor,
    pre_bk: torch.Tensor | None = None,
) -> torch.Tensor:
    """pre[b, j] = <x[b], W_enc[indices[b, j]]> + b_enc[indices[b, j]], with a sparse backward.

    If `pre_bk` is given (gathered from a no-grad dense encoder pass) it is returned as the
    value and treated as a constant; gradients flow to x, W_enc and b_enc only through the
    selected latents. Sentinel entries (index -1) read 0 when computed here and get no gradient.
    """
    _check_code(indices_bk, pre_bk)
    name = backend(x_bd, W_enc_nd, indices_bk)
    log.debug("encode_selected: backend=%s B=%d k=%d n=%d d=%d %s", name, *indices_bk.shape, *W_enc_nd.shape, W_enc_nd.dtype)
    if name == "reference":
        return encode_selected_reference(x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk)
    return _EncodeSelected.apply(x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk, _primitives(name))
