"""Dense torch references for the sparse products: what the kernels must agree with.

They scatter the sparse code into a dense tokens x latents matrix and use ordinary matmuls, so
autograd derives their gradients; that is exactly the waste the kernels avoid, and why these
are only for tests, benchmarks and debugging (`INTERP_KERNELS=reference`).
"""

from __future__ import annotations

import torch


def densify(indices_bk: torch.Tensor, values_bk: torch.Tensor, n_latents: int) -> torch.Tensor:
    """The dense (B, n) code; sentinel entries (index -1) contribute nothing."""
    valid_bk = indices_bk >= 0
    dense_bn = values_bk.new_zeros(values_bk.shape[0], n_latents)
    return dense_bn.scatter_add(1, indices_bk.clamp(min=0).long(), values_bk * valid_bk)


def decode_reference(
    indices_bk: torch.Tensor,
    values_bk: torch.Tensor,
    W_nd: torch.Tensor,
    bias_d: torch.Tensor | None = None,
) -> torch.Tensor:
    dense_bn = densify(indices_bk, values_bk.to(W_nd.dtype), W_nd.shape[0])
    out_bd = dense_bn @ W_nd
    return out_bd if bias_d is None else out_bd + bias_d


def encode_selected_reference(
    x_bd: torch.Tensor,
    W_enc_nd: torch.Tensor,
    b_enc_n: torch.Tensor,
    indices_bk: torch.Tensor,
    pre_bk: torch.Tensor | None = None,
) -> torch.Tensor:
    pre_bn = x_bd @ W_enc_nd.T + b_enc_n
    valid_bk = indices_bk >= 0
    selected_bk = pre_bn.gather(1, indices_bk.clamp(min=0).long()) * valid_bk
    if pre_bk is None:
        return selected_bk
    # The given values, with the gradient of the dense computation.
    return pre_bk.detach() + (selected_bk - selected_bk.detach())
