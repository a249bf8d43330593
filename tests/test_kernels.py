"""interp.kernels against the dense torch reference: values and gradients, every backend.

With a GPU the Triton kernels run compiled on CUDA. Without one they run under Triton's
interpreter on CPU tensors (slow, so shapes are small). The interpreter must be switched on
before anything imports Triton, which the test session's conftest may already have done (via
transformers); then the Triton cases are skipped here and `test_triton_interpreted` runs them
in a fresh Python process with TRITON_INTERPRET=1.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import triton.language as tl  # noqa: E402
from interp.kernels import dispatch, ops  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from interp import kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = DEVICE == "cuda" or isinstance(tl.zeros, InterpretedFunction)
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_HERE, reason="interpreted in test_triton_interpreted")),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.skipif(TRITON_HERE, reason="the Triton cases run in this process")
def test_triton_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-k", "triton", "--noconftest", "-p", "no:cacheprovider"],
        cwd=Path(__file__).parents[1],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def sparse_code(B, k, n, *, seed=0, ragged=False, device=DEVICE, index_dtype=torch.int64):
    """Random (indices, values) with repeats across rows; ragged rows end in -1 sentinels,
    and the last row of a ragged code is empty. ragged="one_wide_row": the first row is full and
    the others hold at most one entry, the padded code of a huge-norm token in a batch-level coder."""
    g = torch.Generator().manual_seed(seed)
    indices_bk = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(B)]) if k <= n else torch.randint(0, n, (B, k), generator=g)
    if ragged:
        lengths_b = torch.randint(0, 2 if ragged == "one_wide_row" else k + 1, (B,), generator=g)
        lengths_b[0] = k if ragged == "one_wide_row" else lengths_b[0]
        lengths_b[-1] = 0
        indices_bk[torch.arange(k)[None, :] >= lengths_b[:, None]] = -1
    values_bk = torch.randn(B, k, generator=g)
    return indices_bk.to(device=device, dtype=index_dtype), values_bk.to(device)


def assert_close(actual, expected, dtype, what):
    scale = expected.abs().max().clamp_min(1.0)
    err = (actual.double() - expected.double()).abs().max() / scale
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3g} > {TOLERANCE[dtype]}"


def run_products(backend, indices_bk, values_bk, W_nd, bias_d, x_bd, b_enc_n, grad_bd, grad_bk, use_pre=False, shared_layout=False):
    """Forward both products and backward from fixed upstream gradients; returns values and grads.
    shared_layout: both products get one `latent_layout` of the indices."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (values_bk, W_nd, bias_d, x_bd, b_enc_n)]
    values, W, bias, x, b_enc = leaves
    layout = kernels.latent_layout(indices_bk, W.shape[0]) if shared_layout else None
    with kernels.use_backend(backend):
        out_bd = kernels.decode(indices_bk, values, W, bias, layout=layout)
        pre_given = None
        if use_pre:
            with torch.no_grad():
                pre_given = kernels.encode_selected_reference(x, W, b_enc, indices_bk)
        pre_bk = kernels.encode_selected(x, W, b_enc, indices_bk, pre_bk=pre_given, layout=layout)
        torch.autograd.backward([out_bd, pre_bk], [grad_bd, grad_bk])
    return [out_bd.detach(), pre_bk.detach()] + [t.grad for t in leaves]


NAMES = ["out", "pre", "d values", "d W", "d bias", "d x", "d b_enc"]

CASES = {
    # name: (B, k, n, d, ragged)
    "small": (9, 5, 13, 37, False),
    "ragged_repeats": (12, 6, 7, 20, True),
    "k1": (10, 1, 50, 33, False),
    "k_exceeds_n": (6, 9, 4, 10, False),
    "long_rows_wide_d": (4, 40, 300, 300, True),
    "one_wide_row": (10, 24, 40, 17, "one_wide_row"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_products_match_reference(backend, case, dtype):
    B, k, n, d, ragged = CASES[case]
    indices_bk, values_bk = sparse_code(B, k, n, ragged=ragged)
    g = torch.Generator().manual_seed(1)
    W_nd, x_bd, grad_bd = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((n, d), (B, d), (B, d)))
    bias_d, b_enc_n, grad_bk = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((d,), (n,), (B, k)))
    values_bk = values_bk.to(dtype)
    inputs = (indices_bk, values_bk, W_nd, bias_d, x_bd, b_enc_n, grad_bd, grad_bk)
    ours = run_products(backend, *inputs)
    expected = run_products("reference", *(t.double() if t.is_floating_point() else t for t in inputs))
    for name, a, e in zip(NAMES, ours, expected):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}"
        assert_close(a, e, dtype, f"{backend} {case} {dtype} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_int32_and_given_pre(backend):
    B, k, n, d = 8, 4, 19, 24
    indices_bk, values_bk = sparse_code(B, k, n, ragged=True, index_dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    # W stored transposed, x and the code strided: nothing is contiguous.
    W_nd = torch.randn(d, n, generator=g).to(DEVICE).t()
    x_bd = torch.randn(B, 2 * d, generator=g).to(DEVICE)[:, ::2]
    values_bk = values_bk.t().contiguous().t()
    bias_d, b_enc_n = torch.randn(d, generator=g).to(DEVICE), torch.randn(n, generator=g).to(DEVICE)
    grad_bd, grad_bk = torch.randn(B, d, generator=g).to(DEVICE), torch.randn(B, k, generator=g).to(DEVICE)
    inputs = (indices_bk, values_bk, W_nd, bias_d, x_bd, b_enc_n, grad_bd, grad_bk)
    ours = run_products(backend, *inputs, use_pre=True)
    expected = run_products("reference", *inputs, use_pre=True)
    for name, a, e in zip(NAMES, ours, expected):
        assert_close(a, e, torch.float32, f"{backend} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wanted", ["values", "W"])
def test_decode_backward_for_one_input(backend, wanted):
    """d values alone and d W alone take their own paths (the fused pass needs both)."""
    B, k, n, d = 11, 6, 9, 21
    indices_bk, values_bk = sparse_code(B, k, n, ragged=True)
    g = torch.Generator().manual_seed(3)
    W_nd, grad_bd = torch.randn(n, d, generator=g).to(DEVICE), torch.randn(B, d, generator=g).to(DEVICE)
    grads = {}
    for name in (backend, "reference"):
        leaves = {"values": values_bk.clone(), "W": W_nd.clone()}
        leaves[wanted].requires_grad_(True)
        with kernels.use_backend(name):
            kernels.decode(indices_bk, leaves["values"], leaves["W"]).backward(grad_bd)
        grads[name] = leaves[wanted].grad
    assert_close(grads[backend], grads["reference"], torch.float32, f"{backend} d {wanted} alone")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sort_shared_between_products_follows_the_indices(backend):
    """Without a layout every product sorts its own indices: changing the indices in place between
    products, or using them with another table height, still gives the right gradients."""
    B, k, d = 10, 3, 6
    indices_bk, values_bk = sparse_code(B, k, 11)
    g = torch.Generator().manual_seed(6)
    tables = [torch.randn(n, d, generator=g).to(DEVICE) for n in (11, 11, 14)]
    grad_bd = torch.randn(B, d, generator=g).to(DEVICE)
    codes, outs = [], []
    for step, W_nd in enumerate(tables):
        if step == 1:
            indices_bk[:, 0] = (indices_bk[:, 0] + 1) % 11
        codes.append((indices_bk.clone(), values_bk.clone().requires_grad_(True), W_nd.clone().requires_grad_(True)))
        with kernels.use_backend(backend):
            outs.append(kernels.decode(indices_bk, *codes[-1][1:]))
    for out, (indices, v, W) in zip(outs, codes):
        out.backward(grad_bd)
        v_ref, W_ref = v.detach().clone().requires_grad_(True), W.detach().clone().requires_grad_(True)
        kernels.decode_reference(indices, v_ref, W_ref).backward(grad_bd)
        assert_close(v.grad, v_ref.grad, torch.float32, f"{backend} d values")
        assert_close(W.grad, W_ref.grad, torch.float32, f"{backend} d W")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["ragged_repeats", "one_wide_row", "k_exceeds_n"])
@pytest.mark.parametrize("use_pre", [False, True])
def test_shared_layout_matches_reference_and_sorts_once(backend, case, use_pre, monkeypatch):
    """decode and encode_selected given one layout: the values and gradients of the products
    without it (bit for bit: the same sort) and of the dense reference, from one sort."""
    B, k, n, d, ragged = CASES[case]
    indices_bk, values_bk = sparse_code(B, k, n, ragged=ragged)
    g = torch.Generator().manual_seed(7)
    W_nd, x_bd, grad_bd = (torch.randn(*s, generator=g).to(DEVICE) for s in ((n, d), (B, d), (B, d)))
    bias_d, b_enc_n, grad_bk = (torch.randn(*s, generator=g).to(DEVICE) for s in ((d,), (n,), (B, k)))
    inputs = (indices_bk, values_bk, W_nd, bias_d, x_bd, b_enc_n, grad_bd, grad_bk)
    sorts = []
    by_latent = ops._by_latent
    monkeypatch.setattr(ops, "_by_latent", lambda *args: sorts.append(args) or by_latent(*args))
    shared = run_products(backend, *inputs, use_pre=use_pre, shared_layout=True)
    assert len(sorts) == 1, f"the shared layout sorted {len(sorts)} times"
    alone = run_products(backend, *inputs, use_pre=use_pre)
    assert len(sorts) == 3, "without a layout each product sorts its own"
    expected = run_products("reference", *(t.double() if t.is_floating_point() else t for t in inputs), use_pre=use_pre)
    for name, a, b, e in zip(NAMES, shared, alone, expected):
        assert torch.equal(a, b), f"{backend} {case} {name}: the shared layout changed the result"
        assert_close(a, e, torch.float32, f"{backend} {case} {name}")


def test_layout_must_match_its_indices():
    B, k, n, d = 6, 3, 10, 4
    indices_bk, values_bk = sparse_code(B, k, n, ragged=True)
    W_nd, x_bd = torch.randn(n, d, device=DEVICE), torch.randn(B, d, device=DEVICE)
    b_enc_n = torch.zeros(n, device=DEVICE)
    layout = kernels.latent_layout(indices_bk, n)
    assert isinstance(layout, kernels.LatentLayout)

    def both(indices, W, layout):
        kernels.decode(indices, values_bk[:, : indices.shape[1]], W, layout=layout)
        kernels.encode_selected(x_bd, W, b_enc_n, indices, layout=layout)

    both(indices_bk, W_nd, layout)
    both(indices_bk[:], W_nd, layout)  # a view of the same memory is the same indices
    for backend in ("torch", "reference"):  # checked whichever backend runs
        with kernels.use_backend(backend):
            with pytest.raises(ValueError, match="other indices"):
                both(indices_bk.clone(), W_nd, layout)  # equal values, but another tensor
            with pytest.raises(ValueError, match="other indices"):
                both(indices_bk.to(torch.int32), W_nd, layout)
            with pytest.raises(ValueError, match="other indices"):
                both(indices_bk[:, :2], W_nd, layout)
            with pytest.raises(ValueError, match="latents"):
                both(indices_bk, torch.randn(n + 1, d, device=DEVICE), layout)
            with pytest.raises(ValueError, match="latents"):
                kernels.encode_selected(x_bd, torch.randn(n + 1, d, device=DEVICE), torch.zeros(n + 1, device=DEVICE), indices_bk, layout=layout)
    indices_bk[0, 0] = (indices_bk[0, 0] + 1) % n
    with pytest.raises(ValueError, match="changed in place"):
        kernels.decode(indices_bk, values_bk, W_nd, layout=layout)
    with pytest.raises(ValueError, match="changed in place"):
        kernels.encode_selected(x_bd, W_nd, b_enc_n, indices_bk, layout=layout)
    both(indices_bk, W_nd, kernels.latent_layout(indices_bk, n))
    with pytest.raises(TypeError, match="int64 or int32"):
        kernels.latent_layout(values_bk, n)
    with pytest.raises(ValueError, match="n_latents"):
        kernels.latent_layout(indices_bk, 0)
    with pytest.raises(TypeError):
        kernels.latent_layout(indices_bk, 10.0)


@pytest.mark.parametrize(
    "E, n_latents",
    [(4096 * 32, 9216), (5000, 3), (1, 1), (0, 5), (3000, (1 << 16) - 1), (3000, 1 << 16), (20000, (1 << 20) + 3), (3000, 2**31 - 2)],
)
def test_cpu_sort_is_torch_stable_sort(E, n_latents):
    """The CPU sort by latent gives exactly torch's stable sort order (empty slots have key
    n_latents, so keys lie in [0, n_latents]); ties are frequent."""
    g = torch.Generator().manual_seed(E + n_latents)
    keys_e = torch.randint(0, n_latents + 1, (E,), generator=g, dtype=torch.int64).to(torch.int32)
    if E > 10:
        keys_e[::7] = n_latents  # empty slots
        keys_e[1::11] = 0
        keys_e[2::13] = keys_e[2]  # a heavily repeated key
    order_e = ops._stable_order_cpu(keys_e, n_latents)
    assert order_e.dtype == torch.int64
    assert torch.equal(order_e, torch.sort(keys_e, stable=True)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_and_empty_rows(backend):
    B, k, n, d = 6, 3, 10, 7
    indices_bk = torch.full((B, k), -1, device=DEVICE)
    indices_bk[1] = torch.tensor([2, 2, 5])
    values_bk = torch.zeros(B, k, device=DEVICE)
    values_bk[1] = torch.tensor([1.0, 2.0, 0.0])
    W_nd = torch.randn(n, d, device=DEVICE)
    with kernels.use_backend(backend):
        out_bd = kernels.decode(indices_bk, values_bk, W_nd)
    assert torch.all(out_bd[[0, 2, 3, 4, 5]] == 0)
    torch.testing.assert_close(out_bd[1], 3.0 * W_nd[2])


@pytest.mark.parametrize("use_pre", [False, True])
def test_gradcheck_torch_path_float64(use_pre):
    B, k, n, d = 5, 3, 8, 6
    indices_bk, values_bk = sparse_code(B, k, n, ragged=True, device="cpu")
    g = torch.Generator().manual_seed(3)
    values_bk = values_bk.double().requires_grad_(True)
    W_nd, x_bd = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((n, d), (B, d)))
    bias_d, b_enc_n = (torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in (d, n))
    with kernels.use_backend("torch"):
        assert torch.autograd.gradcheck(lambda v, W, b: kernels.decode(indices_bk, v, W, b), (values_bk, W_nd, bias_d))

        def encode(x, W, b):
            pre_bk = None
            if use_pre:
                with torch.no_grad():
                    pre_bk = kernels.encode_selected_reference(x, W, b, indices_bk)
            return kernels.encode_selected(x, W, b, indices_bk, pre_bk=pre_bk)

        assert torch.autograd.gradcheck(encode, (x_bd, W_nd, b_enc_n))


def test_large_n_and_k():
    """2^20 latents (offsets past 2^31 elements on a GPU's d) and k = 512, torch path; the
    Triton path too when compiled (interpreting a grid of 2^20 programs would take minutes)."""
    n, d = (1 << 20) + 3, 5
    cases = [(3, 512, n, d), (16, 8, n, d)]
    backends = ["torch", "triton"] if DEVICE == "cuda" else ["torch"]
    for B, k, n_latents, width in cases:
        indices_bk, values_bk = sparse_code(B, k, n_latents, ragged=True)
        W_nd = torch.randn(n_latents, width, device=DEVICE)
        grad_bd = torch.randn(B, width, device=DEVICE)
        expected = run_products("reference", indices_bk, values_bk, W_nd, W_nd[0], W_nd[:B], W_nd[:, 0], grad_bd, values_bk)
        for backend in backends:
            ours = run_products(backend, indices_bk, values_bk, W_nd, W_nd[0], W_nd[:B], W_nd[:, 0], grad_bd, values_bk)
            for name, a, e in zip(NAMES, ours, expected):
                assert_close(a, e, torch.float32, f"{backend} B={B} k={k} {name}")


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: a 2304-wide bf16 table with 2^20 rows")
def test_triton_table_past_2_31_elements():
    n, d, B, k = 1 << 20, 2304, 64, 64
    indices_bk, values_bk = sparse_code(B, k, n)
    indices_bk[:, 0] = n - 1  # the last row starts past element 2^31
    W_nd = torch.randn(n, d, device=DEVICE, dtype=torch.bfloat16)
    values_bk = values_bk.bfloat16()
    with kernels.use_backend("triton"):
        out_bd = kernels.decode(indices_bk, values_bk, W_nd)
    expected_bd = torch.einsum("bk,bkd->bd", values_bk.float(), W_nd[indices_bk].float())
    assert_close(out_bd, expected_bd, torch.bfloat16, "decode past 2^31")


def topk_sae_weights(backend, steps=4):
    """Train a small TopK SAE for a few Adam steps on one backend; return its parameters."""
    from interp.sae.topk import TopKConfig, TopKSAE

    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=24, n_latents=96, k=4)).double().to(DEVICE)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    data = torch.randn(steps, 32, 24, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    with kernels.use_backend(backend):
        for x in data:
            out = sae(x)
            optimizer.zero_grad()
            out.fvu.backward()
            optimizer.step()
    return {name: p.detach() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sae_training_matches_dense_reference(backend):
    ours, expected = topk_sae_weights(backend), topk_sae_weights("reference")
    initial = topk_sae_weights("reference", steps=0)
    for name in expected:
        assert not torch.equal(expected[name], initial[name]), f"{name} never moved"
        # Adam divides by the root of tiny second moments, which magnifies rounding (float64
        # here) to about 1e-8; a wrong gradient would move weights by the step size, 1e-2.
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-6, atol=1e-6)


def test_dispatch(monkeypatch, caplog):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    cpu = torch.zeros(1)
    assert kernels.backend(cpu) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert kernels.backend(cpu) == "reference"
    with kernels.use_backend("triton"):
        assert kernels.backend(cpu) == "triton"
        with kernels.use_backend("auto"):
            assert kernels.backend(cpu) == "torch"
    assert kernels.backend(cpu) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda-please")
    with pytest.raises(ValueError, match="INTERP_KERNELS"):
        kernels.backend(cpu)
    with pytest.raises(ValueError, match="unknown kernels backend"):
        with kernels.use_backend("fast"):
            pass
    monkeypatch.delenv(dispatch.ENV_VAR)
    with caplog.at_level(logging.DEBUG, logger="interp.kernels"):
        kernels.decode(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), torch.ones(3, 4))
    assert "decode: backend=torch" in caplog.text


def test_rejects_bad_codes():
    with pytest.raises(TypeError, match="int64 or int32"):
        kernels.decode(torch.zeros(2, 1), torch.ones(2, 1), torch.ones(3, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        kernels.decode(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 2), torch.ones(3, 4))
