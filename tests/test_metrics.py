import pytest
import torch

from interp.data import iter_texts, iter_token_batches
from interp.metrics import reconstruction_metrics, splice_metrics
from interp.sae import create_coder

HOOK = "blocks.0.hook_resid_post"


def perfect_sae(d):
    """W = [I; -I] with k = d reconstructs any x exactly: each coordinate's sign picks one row."""
    sae = create_coder("topk", d_in=d, n_latents=2 * d, k=d, hook=HOOK, model="tiny-llama")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def token_batches(model, n=2):
    batches = iter_token_batches(model.tokenizer, iter_texts("builtin", "test"), 32, 4)
    return [next(batches) for _ in range(n)]


def test_reconstruction_metrics_of_a_perfect_coder():
    sae = perfect_sae(8)
    x = torch.randn(500, 8)
    metrics = reconstruction_metrics(sae, [{HOOK: x[:250]}, {HOOK: x[250:]}])
    assert metrics["fvu"] == pytest.approx(0, abs=1e-10)
    assert metrics["l0"] == 8 and metrics["eval_tokens"] == 500
    assert metrics["dead_frac"] == 0 and metrics["dense_frac"] == 1


def test_dead_latents_are_counted():
    sae = perfect_sae(8)
    x = torch.randn(100, 8).abs()  # only the +I half ever fires
    assert reconstruction_metrics(sae, [{HOOK: x}])["dead_frac"] == 0.5


def test_splicing_a_perfect_coder_costs_nothing(tiny_model):
    metrics = splice_metrics(tiny_model, perfect_sae(tiny_model.cfg.d_model), token_batches(tiny_model), progress=False)
    assert metrics["loss_spliced"] == pytest.approx(metrics["loss_clean"], abs=1e-4)
    assert metrics["kl"] == pytest.approx(0, abs=1e-5)
    assert metrics["loss_recovered"] == pytest.approx(1, abs=1e-3)


def test_splicing_a_zero_coder_equals_zero_ablation(tiny_model):
    sae = perfect_sae(tiny_model.cfg.d_model)
    with torch.no_grad():
        sae.W_dec.zero_()
    metrics = splice_metrics(tiny_model, sae, token_batches(tiny_model), progress=False)
    assert metrics["loss_spliced"] == pytest.approx(metrics["loss_zero"], abs=1e-5)
    assert metrics["loss_recovered"] == pytest.approx(0, abs=1e-4)
    assert metrics["kl"] > 0


def test_tokens_above_the_norm_bound_are_left_out_of_the_metrics():
    sae = perfect_sae(8)
    x = torch.randn(100, 8)
    with torch.no_grad():
        sae.W_dec[0] = 0  # the bound must hide these errors: only outliers use latent 0
        x[:, 0] = -x[:, 0].abs()
        x[:4, 0] = 1000.0
    sae.set_max_input_norm(100.0)
    metrics = reconstruction_metrics(sae, [{HOOK: x}])
    assert metrics["fvu"] == pytest.approx(0, abs=1e-10)
    assert metrics["eval_tokens"] == 96 and metrics["outlier_frac"] == 0.04


def test_tokens_above_the_norm_bound_stay_clean_when_spliced(tiny_model):
    sae = perfect_sae(tiny_model.cfg.d_model)
    with torch.no_grad():
        sae.W_dec.zero_()  # would ruin every token it covers
    sae.set_max_input_norm(0.0)  # it covers none
    metrics = splice_metrics(tiny_model, sae, token_batches(tiny_model), progress=False)
    assert metrics["loss_spliced"] == pytest.approx(metrics["loss_clean"], abs=1e-6)
    assert metrics["loss_zero"] == pytest.approx(metrics["loss_clean"], abs=1e-6)
    assert metrics["kl"] == pytest.approx(0, abs=1e-6)


def test_allocation_scores_a_batch_level_coder_by_the_batch_top_k_it_trained_with():
    torch.manual_seed(0)
    d, n, k = 8, 32, 3
    sae = create_coder("batchtopk", d_in=d, n_latents=n, k=k, hook=HOOK, model="tiny-llama")
    with torch.no_grad():
        sae.b_dec.zero_()
        sae.threshold.fill_(1e6)  # by its threshold it would keep nothing
    sae.eval()
    batches = [torch.randn(40, d), torch.randn(25, d)]
    errors, fires = [], torch.zeros(n, dtype=torch.bool)
    for x in batches:  # the dense reference: each batch's k * B largest ReLU(z) over all its entries
        z = (x @ sae.W_enc.T + sae.b_enc).relu().detach()
        keep = torch.zeros(z.numel(), dtype=torch.bool)
        keep[z.flatten().topk(k * len(x)).indices] = True
        f = z * keep.reshape(z.shape)
        errors.append((x - f @ sae.W_dec).pow(2).sum())
        fires |= (f > 0).any(0)
    x_all = torch.cat(batches)
    expected = sum(errors) / (x_all - x_all.mean(0)).pow(2).sum()
    metrics = reconstruction_metrics(sae, [{HOOK: x} for x in batches], allocation=True)
    assert metrics["fvu"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["l0"] == pytest.approx(k, abs=1e-9)
    assert metrics["dead_frac"] == pytest.approx(1 - fires.float().mean().item())
    assert sae.threshold.item() == 1e6 and not sae.training
    assert reconstruction_metrics(sae, [{HOOK: x} for x in batches])["l0"] == 0
    with pytest.raises(ValueError, match="topk selects per token"):
        reconstruction_metrics(perfect_sae(8), [{HOOK: x_all}], allocation=True)
