"""Sparse decode, forward + backward, on a GPU: our Triton kernels against a dense decoder
(torch matmuls) and against torch's embedding_bag, with the memory bandwidth achieved.

    python bench/decode_gpu.py                       # d=2304, n=2^17, k=64, 8192 tokens, bf16

Each method computes out = decode(code, W) forward, then the gradients of values and W from a
fixed upstream gradient. The dense decoder is given its (tokens, n) code already materialised,
which favours it. Bandwidth is counted two ways:
- gathered bytes: what the gather algorithm must read and write, each selected row of W or of
  the upstream gradient counted every time it is used (the traffic of the kernels as designed);
- compulsory bytes: every distinct byte once (W's touched rows twice: forward and d values,
  d W written once), the floor for any algorithm whatever its caching.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton.testing

from interp import kernels

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float | None:
    """The card's datasheet HBM bandwidth (GB/s), from its name."""
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def copy_bandwidth() -> float:
    """A device-to-device copy, counting bytes read and written: the bandwidth one can reach."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--n", type=int, default=1 << 17)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    B, d, n, k = args.tokens, args.d, args.n, args.k
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    # Distinct latents per token, as a TopK selection gives.
    indices_bk = torch.rand(B, n, device="cuda").topk(k, dim=1).indices
    values_bk = torch.rand(B, k, device="cuda", dtype=dtype).requires_grad_(True)
    W_nd = (torch.randn(n, d, device="cuda", dtype=dtype) / d**0.5).requires_grad_(True)
    grad_bd = torch.randn(B, d, device="cuda", dtype=dtype)
    with torch.no_grad():
        dense_bn = kernels.reference.densify(indices_bk, values_bk, n).requires_grad_(True)

    def ours():
        # A fresh indices tensor, as each training step has: the kernels sort a code by latent
        # once per indices tensor, and reusing one would leave the sort out of the timing.
        with kernels.use_backend("triton"):
            kernels.decode(indices_bk.clone(), values_bk, W_nd).backward(grad_bd)

    def ours_forward():
        with torch.no_grad(), kernels.use_backend("triton"):
            kernels.decode(indices_bk, values_bk, W_nd)

    def dense():
        (dense_bn @ W_nd).backward(grad_bd)

    def dense_forward():
        with torch.no_grad():
            dense_bn @ W_nd

    def embedding_bag():
        # torch's CUDA embedding_bag has no half-precision gradient for the per-sample weights:
        # it computes d W only, which favours it.
        weights_bk = values_bk.detach() if dtype != torch.float32 else values_bk
        F.embedding_bag(indices_bk, W_nd, per_sample_weights=weights_bk, mode="sum").backward(grad_bd)

    def embedding_bag_forward():
        with torch.no_grad():
            F.embedding_bag(indices_bk, W_nd, per_sample_weights=values_bk, mode="sum")

    # Correctness at this shape before timing: ours against the dense decoder.
    for t in (values_bk, W_nd, dense_bn):
        t.grad = None
    ours()
    ours_grads = values_bk.grad.float(), W_nd.grad.float()
    W_nd.grad = None
    dense()
    dense_values_grad = dense_bn.grad.gather(1, indices_bk).float()
    for name, a, e in zip(("d values", "d W"), ours_grads, (dense_values_grad, W_nd.grad.float())):
        err = ((a - e).abs().max() / e.abs().max()).item()
        print(f"check {name}: max error relative to max |grad| = {err:.2e}")

    def time_ms(fn):
        def step():
            for t in (values_bk, W_nd, dense_bn):
                t.grad = None
            fn()

        return triton.testing.do_bench(step, warmup=5, rep=50)

    rows = {
        "ours (triton)": (time_ms(ours_forward), time_ms(ours)),
        "dense matmul": (time_ms(dense_forward), time_ms(dense)),
        "embedding_bag": (time_ms(embedding_bag_forward), time_ms(embedding_bag)),
    }
    name = torch.cuda.get_device_name()
    print(f"\n{name}: tokens={B} d={d} n={n} k={k} {args.dtype}")
    print(f"{'method':<16}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ours is x faster':>18}")
    ours_ms = rows["ours (triton)"][1]
    for method, (fwd, total) in rows.items():
        print(f"{method:<16}{fwd:>10.3f}{total:>12.3f}{total / ours_ms:>18.2f}")

    size = torch.finfo(dtype).bits // 8
    row_bytes = d * size
    entries = B * k
    touched = torch.unique(indices_bk).numel()
    code_bytes = entries * (8 + size)
    # forward: W rows + code + out; backward: W rows + grad rows (d values), grad rows
    # gathered by latent + d W written (segment sum), plus the sort's keys and permutation.
    gathered = 3 * entries * row_bytes + 2 * B * row_bytes + n * row_bytes + 4 * code_bytes
    compulsory = 2 * touched * row_bytes + 2 * B * row_bytes + n * row_bytes + 2 * code_bytes
    copy_gbps = copy_bandwidth()
    peak = peak_bandwidth(name)
    print(f"\ndevice copy bandwidth: {copy_gbps:.0f} GB/s; datasheet peak: {peak or 'unknown'} GB/s")
    for label, nbytes in (("gathered", gathered), ("compulsory", compulsory)):
        gbps = nbytes / ours_ms / 1e6
        bound_ms = nbytes / (peak or copy_gbps) / 1e6
        print(
            f"{label:<11} bytes {nbytes / 1e9:6.2f} GB: achieved {gbps:6.0f} GB/s = "
            f"{gbps / (peak or copy_gbps):.0%} of peak; bound {bound_ms:.3f} ms, ours {ours_ms / bound_ms:.2f}x the bound"
        )
    print(
        f"decode fwd+bwd: ours {ours_ms:.3f} ms, {rows['dense matmul'][1] / ours_ms:.1f}x faster than dense, "
        f"{rows['embedding_bag'][1] / ours_ms:.1f}x faster than embedding_bag"
    )


if __name__ == "__main__":
    main()
