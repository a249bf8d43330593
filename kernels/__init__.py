"""Sparse products for training and running sparse coders, without dense tokens x latents matrices.

    out_bd = decode(indices_bk, values_bk, W_nd, bias_d=None, *, layout=None)
        out[b] = sum_j values[b, j] * W[indices[b, j]] (+ bias). W is stored (n_latents, d) so a
        latent's row is contiguous. Differentiable in values, W and bias:
        d values[b, j] = <d out[b], W[indices[b, j]]>, d W = scatter-add over active entries of
        values[b, j] * d out[b].
    pre_bk = encode_selected(x_bd, W_enc_nd, b_enc_n, indices_bk, pre_bk=None, *, layout=None)
        pre[b, j] = <x[b], W_enc[indices[b, j]]> + b_enc[indices[b, j]]. Pass `pre_bk` when it was
        already gathered from a no-grad dense encoder pass: it is returned unchanged, and the
        backward is sparse: d x = gather-sum of W_enc rows, d W_enc and d b_enc scatter-adds.
    layout = latent_layout(indices_bk, n_latents) -> LatentLayout
        The backward passes of both products sort the code's active entries by latent (d W is a
        segment sum over each latent's entries). Pass one layout as `layout=` to the decode and
        the encode_selected of the same code and they share one sort, made lazily by whichever
        backward runs first; with layout=None each product sorts on its own (same results).
        A layout is bound to its indices tensor (the same object, or a view of the same memory
        with the same shape and strides) as it was when the layout was made, and to n_latents
        (the tables' rows): using it with other indices, another table height, or indices
        changed in place since raises ValueError. Make one per code; nothing is cached globally.

Layout of a sparse code: padded. `indices_bk` (int64 or int32) and `values_bk` (any float dtype)
have shape (B, k); a row with fewer than k active latents (mutual-choice, feature-choice and
BatchTopK coders) fills its unused slots with the sentinel index -1, whose value is ignored and
whose gradient is zero. Indices must lie in [-1, n_latents); repeats within a batch are fine.
Results have W's dtype (fp32, bf16, fp16 or fp64) and are accumulated in fp32. Any tensor may
be non-contiguous.

Which implementation runs is decided in one place (dispatch.py) and can be read back:
    backend(*tensors)  -> "triton" | "torch" | "reference"
    use_backend(name)  context manager forcing "auto", "triton", "torch" or "reference"
    INTERP_KERNELS=... the same, from the environment, for debugging
"auto" runs the Triton kernels when the tensors are on CUDA and Triton imports, the torch
implementation otherwise; "reference" is the dense torch reference. Each call logs its backend
at DEBUG level on the logger "interp.kernels".
"""

from .dispatch import backend, use_backend
from .ops import LatentLayout, decode, encode_selected, latent_layout
from .reference import decode_reference, encode_selected_reference

__all__ = [
    "LatentLayout",
    "backend",
    "decode",
    "decode_reference",
    "encode_selected",
    "encode_selected_reference",
    "latent_layout",
    "use_backend",
]
