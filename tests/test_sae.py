import json

import pytest
import torch

from interp.sae import TopKSAE, create_coder, load_sae
from interp.sae.base import SelectContext, geometric_median
from interp.sae.losses import fraction_unexplained


def make(d=16, n=64, k=4):
    return create_coder("topk", d_in=d, n_latents=n, k=k, hook="blocks.0.hook_resid_post", model="tiny-llama")


def test_topk_keeps_exactly_k_relu_latents():
    sae = make()
    x = torch.randn(32, 16) * 3 + 1
    code = sae.encode(x)
    assert code.indices_bk.shape == (32, 4) and code.values_bk.shape == (32, 4)
    pre = (sae.normalized_input(x) - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    expected = pre.topk(4, dim=1).values.relu()
    torch.testing.assert_close(code.values_bk.sort(1).values, expected.sort(1).values)
    dense = torch.zeros(32, 64).scatter(1, code.indices_bk, code.values_bk)
    torch.testing.assert_close(sae.decode(code), dense @ sae.W_dec + sae.b_dec)


def test_reused_preactivation_buffer_leaks_into_no_result():
    torch.manual_seed(0)
    sae = create_coder("topk", d_in=12, n_latents=40, k=5, hook="h")
    x1, x2 = torch.randn(30, 12), torch.randn(50, 12) * 3
    code1 = sae.encode(x1)
    kept = [t.clone() for t in code1]
    out2 = sae(x2)
    sae.encode(x1[:7])
    assert all(torch.equal(a, b) for a, b in zip(code1, kept))
    fresh = create_coder("topk", d_in=12, n_latents=40, k=5, hook="h")
    fresh.load_state_dict(sae.state_dict())
    torch.testing.assert_close(fresh(x2).x_hat, out2.x_hat, rtol=0, atol=0)
    assert sae._preacts._buffer.shape == (50, 40)  # grown once, then reused


def test_k_larger_than_latents_is_rejected():
    with pytest.raises(ValueError, match="k must be between 1 and the number of latents"):
        make(n=8, k=9)


def test_normalization_is_saved_and_outputs_reproduced(tmp_path):
    sae = make()
    x = torch.randn(100, 16) * 7
    sae.fit_normalization(x)
    sae.init_from_data(x)
    assert (sae.normalized_input(x).norm(dim=1).pow(2).mean()).item() == pytest.approx(16, rel=1e-4)
    sae.save(tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert isinstance(loaded, TopKSAE) and loaded.cfg == sae.cfg
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)


@pytest.mark.parametrize("transcoder", [False, True])
def test_gradients_match_plain_autograd(transcoder):
    """The sparse path (no-grad dense encoder, sparse backward, b_dec's encoder gradient as a
    matrix-vector product) gives every parameter the gradient of the textbook formula."""
    torch.manual_seed(0)
    target_hook = "blocks.0.hook_mlp_out" if transcoder else None
    coder = create_coder("topk", d_in=10, n_latents=30, k=4, hook="h", target_hook=target_hook).double()
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p))
    x, target = torch.randn(25, 10, dtype=torch.float64), torch.randn(25, 10, dtype=torch.float64)
    out = coder(x, target if transcoder else None)
    out.fvu.backward()
    ours = {name: p.grad.clone() for name, p in coder.named_parameters()}
    coder.zero_grad()
    x_norm = coder.normalized_input(x)
    x_in = x_norm if transcoder else x_norm - coder.b_dec
    pre = x_in @ coder.W_enc.T + coder.b_enc
    top = pre.topk(4, dim=1)
    f = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    x_hat = f @ coder.W_dec + coder.b_dec
    t = target * coder.out_scale if transcoder else x_norm
    ((t - x_hat).pow(2).sum() / (t - t.mean(0)).pow(2).sum()).backward()
    for name, p in coder.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_fvu_gradcheck():
    g = torch.Generator().manual_seed(5)
    target, x_hat = (torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(fraction_unexplained, (target, x_hat))


def test_decoder_gradient_along_rows_is_removed():
    sae = make()
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grads()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_auxk_only_with_dead_latents():
    sae = make()
    x = torch.randn(32, 16)
    none_dead = torch.zeros(64, dtype=torch.bool)
    assert sae(x, ctx=SelectContext(dead_mask=none_dead)).aux_loss.item() == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    out = sae(x, ctx=SelectContext(dead_mask=dead))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    # AuxK trains only the dead latents' encoder rows.
    assert sae.W_enc.grad[20:].abs().sum() == 0 and sae.W_enc.grad[:20].abs().sum() > 0


def test_geometric_median_minimises_summed_distance():
    points = torch.cat([torch.randn(50, 3), torch.full((5, 3), 100.0)])
    median = geometric_median(points)
    cost = lambda p: (points - p).norm(dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert cost(median) <= cost(median + 0.05 * torch.randn(3)) + 1e-4
    assert median.norm() < 2  # robust to the outliers, unlike the mean


def test_fvu_definition():
    y = torch.randn(50, 4)
    assert fraction_unexplained(y, y).item() == 0
    assert fraction_unexplained(y, y.mean(0).expand_as(y)).item() == pytest.approx(1)


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: (f / "cfg.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "weights.safetensors").write_bytes(b"garbage"), "corrupt"),
        (lambda f: (f / "weights.safetensors").unlink(), "no weights.safetensors"),
        (lambda f: (f / "cfg.json").write_text(json.dumps({**json.loads((f / "cfg.json").read_text()), "format_version": 99})), "format_version 99"),
        (lambda f: (f / "cfg.json").write_text(json.dumps({**json.loads((f / "cfg.json").read_text()), "arch": "nope"})), "unknown architecture"),
    ],
)
def test_malformed_folders_are_rejected(tmp_path, corrupt, message):
    make().save(tmp_path / "sae")
    corrupt(tmp_path / "sae")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_sae(tmp_path / "sae")


def test_mismatched_weights_are_rejected(tmp_path):
    make(n=64).save(tmp_path / "a")
    make(n=32).save(tmp_path / "b")
    (tmp_path / "a" / "cfg.json").write_bytes((tmp_path / "b" / "cfg.json").read_bytes())
    with pytest.raises(ValueError, match="shape"):
        load_sae(tmp_path / "a")


def test_not_a_coder_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved sparse coder"):
        load_sae(tmp_path)
