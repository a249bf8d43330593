"""Every registered architecture: shapes, sparsity exactly as each paper defines it, batch-free
inference, save/load, where gradients flow; transcoders and attention-output coders on a tiny model."""

from pathlib import Path

import pytest
import torch

from interp.data import DataConfig
from interp.metrics import splice_metrics
from interp.run import (
    RunConfig,
    default_run_folder,
    heldout_token_batches,
    target_hook,
    train_run,
)
from interp.sae import REGISTRY, SelectContext, create_coder, load_sae
from interp.sae.allocation import batch_topk
from interp.sae.choice import feature_choice, underused_by_zipf, zipf_capacities
from interp.train import TrainConfig

D, N, K, B = 16, 64, 4, 32
HOOK = "blocks.0.hook_resid_post"
BATCH_LEVEL = ["batchtopk", "mutual_choice", "feature_choice"]


def make(arch, **options):
    return create_coder(arch, d_in=D, n_latents=N, k=K, hook=HOOK, model="tiny-llama", **options)


def data(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, D, generator=g) * 2 + 0.5
    return x, torch.randn(batch, D, generator=g)


def context(coder, grad):
    return SelectContext(grad=grad) if coder.needs_grad else SelectContext()


TRAINED = sorted(arch for arch, cls in REGISTRY.items() if cls.trainable)


def warm_up(coder, steps=5):
    """A few training-mode passes, so running estimates (thresholds, densities) are set."""
    for step in range(steps):
        x, grad = data(seed=step + 1)
        coder(x, ctx=context(coder, grad))


def dense(code, n=N):
    keep = code.indices_bk >= 0
    out = torch.zeros(len(code.indices_bk), n)
    out[keep.nonzero(as_tuple=True)[0], code.indices_bk[keep]] = code.values_bk[keep]
    return out


def test_registry_names():
    assert set(REGISTRY) == {"topk", "batchtopk", "mutual_choice", "feature_choice", "gradient", "codebook", "jumprelu"}
    assert TRAINED == ["batchtopk", "codebook", "feature_choice", "gradient", "mutual_choice", "topk"]


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match="beta do not apply to architecture 'topk'"):
        make("topk", beta=1.0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("arch", TRAINED)
def test_select_returns_the_preactivations_it_chose(arch, training):
    coder = make(arch)
    warm_up(coder)
    coder.train(training)
    x, grad = data(seed=9)
    pre = coder.preacts(coder.encoder_input(coder.normalized_input(x)))
    indices, pre_bk = coder.select(pre, context(coder, grad))
    used = indices >= 0
    assert used.any()
    assert torch.equal(pre_bk[used], pre.gather(1, indices.clamp(min=0))[used])


@pytest.mark.parametrize("arch", TRAINED)
def test_shapes_and_save_load_round_trip(arch, tmp_path):
    coder = make(arch)
    x, grad = data()
    coder.fit_normalization(x)
    coder.init_from_data(x)
    warm_up(coder)
    out = coder(x, ctx=context(coder, grad))
    assert out.x_hat.shape == (B, D) and out.code.indices_bk.shape == out.code.values_bk.shape
    assert out.code.indices_bk.shape[0] == B and out.fvu.ndim == 0
    coder.save(tmp_path / arch)
    loaded = load_sae(tmp_path / arch)
    assert type(loaded) is type(coder) and loaded.cfg == coder.cfg
    assert set(loaded.training_state()) == set(coder.training_state())
    # A saved coder carries what inference needs; training's own state (running estimates'
    # bookkeeping) travels in the trainer's checkpoint.
    loaded.load_training_state(coder.training_state())
    for mode in (True, False):
        coder.train(mode), loaded.train(mode)
        # Training-mode passes update running estimates: compare on copies of the same state.
        torch.testing.assert_close(loaded.state_dict(), coder.state_dict(), rtol=0, atol=0)
        assert torch.equal(loaded(x, ctx=context(coder, grad)).x_hat, coder(x, ctx=context(coder, grad)).x_hat)


@pytest.mark.parametrize("arch", TRAINED)
def test_gradients_reach_only_active_latents(arch):
    coder = make(arch, aux_coef=0.0)
    x, grad = data()
    out = coder(x, ctx=context(coder, grad))
    (out.fvu + out.aux_loss).backward()
    active = torch.zeros(N, dtype=torch.bool)
    active[out.code.indices_bk[out.code.values_bk > 0]] = True
    assert active.any()
    assert torch.equal(coder.W_enc.grad.abs().sum(1) > 0, active)
    assert torch.equal(coder.W_dec.grad.abs().sum(1) > 0, active)
    if coder.discrete:  # no bias; the chosen codes' norms learn
        assert torch.equal(coder.code_norm.grad != 0, active)
    else:
        assert coder.b_dec.grad.abs().sum() > 0
    assert (out.code.values_bk[out.code.indices_bk < 0] == 0).all()


def test_topk_and_gradient_keep_exactly_k():
    for arch in ("topk", "gradient"):
        coder = make(arch)
        x, grad = data()
        assert ((coder.encode(x, context(coder, grad)).indices_bk >= 0).sum(1) == K).all()


def test_codebook_replaces_each_token_by_the_sum_of_its_k_most_similar_codes():
    coder = make("codebook")
    x, _ = data()
    coder.fit_normalization(x)
    with torch.no_grad():
        coder.code_norm.uniform_(0.2, 3.0)
    warm_up(coder)
    # The paper's definition, by hand: cosine similarity to each code vector, the k best, their sum.
    codes_nd = coder.code_norm.detach()[:, None] * coder.W_dec.detach()
    x_norm = x * coder.in_scale
    similarity_bn = torch.nn.functional.cosine_similarity(x_norm[:, None, :], codes_nd[None], dim=-1)
    best_bk = similarity_bn.topk(K, dim=1).indices
    code = coder.encode(x)
    assert torch.equal(code.indices_bk.sort(1).values, best_bk.sort(1).values)
    torch.testing.assert_close(coder.reconstruct(x), codes_nd[best_bk].sum(1) / coder.out_scale, atol=1e-5, rtol=1e-5)
    # A token's code is a set of integers: every chosen code's value is its norm, whatever x is.
    torch.testing.assert_close(code.values_bk, coder.code_norm.detach()[code.indices_bk])
    assert coder(x).x_hat.shape == x.shape and coder.cfg.k == K


def test_a_codebook_is_not_a_transcoder():
    with pytest.raises(ValueError, match="cannot be a transcoder"):
        make("codebook", target_hook="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="cannot be a transcoder"):
        make("codebook", skip=True)


@pytest.mark.parametrize("arch", ["batchtopk", "mutual_choice"])
def test_mutual_choice_spends_exactly_its_budget(arch):
    coder = make(arch)
    x, _ = data()
    code = coder.encode(x)
    active = code.indices_bk >= 0
    assert int(active.sum()) == K * B
    assert (code.values_bk[active] > 0).all()
    per_token = active.sum(1)
    assert per_token.min() < per_token.max()  # the budget is shared unevenly
    pre = coder.preacts(coder.encoder_input(coder.normalized_input(x)))
    assert torch.equal(dense(code) > 0, pre >= pre.flatten().topk(K * B).values.min())


@pytest.mark.parametrize("crowded_rows", [0, 1, 7])
def test_batch_topk_equals_one_global_topk(crowded_rows):
    # Rows that hold far more than their share (huge-norm tokens do) force the candidate widening.
    pre = torch.randn(64, 300, generator=torch.Generator().manual_seed(crowded_rows))
    pre[:crowded_rows] += 6.0
    budget = 5 * 64
    rows, cols, values = batch_topk(pre, budget)
    expected = pre.flatten().topk(budget).values
    expected = expected[expected > 0]
    assert torch.equal(values.sort().values, expected.sort().values)
    assert torch.equal(pre[rows, cols], values)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == len(values)
    if crowded_rows:
        assert int((rows < crowded_rows).sum()) > 4 * 5 * crowded_rows


def test_feature_choice_respects_each_capacity():
    coder = make("feature_choice", capacity_order="index")
    x, _ = data()
    code = coder.encode(x)
    counts = torch.bincount(code.indices_bk[code.indices_bk >= 0], minlength=N)
    capacity = coder.capacities(B)
    assert (counts <= capacity).all() and int(counts.sum()) <= K * B + N
    # Each feature took its own top tokens: nothing it left out beats what it took.
    pre = coder.preacts(coder.encoder_input(coder.normalized_input(x)))
    chosen = dense(code) > 0
    for i in range(N):
        if chosen[:, i].any() and (~chosen[:, i]).any():
            assert pre[chosen[:, i], i].min() >= pre[~chosen[:, i], i].max()


def test_feature_choice_by_demand_gives_the_largest_capacity_to_the_most_demanded_latent():
    coder = make("feature_choice", capacity_order="demand")
    x, _ = data()
    pre = coder.preacts(coder.encoder_input(coder.normalized_input(x)))
    code = coder.encode(x)
    # The reference: demand is each latent's count among the batch's K B largest positive
    # entries (one global top over the dense matrix); the r-th most demanded latent takes the
    # r-th capacity, then its own top-m positive pre-activations by a plain column top-m.
    top_e = pre.flatten().topk(K * B).indices
    top_e = top_e[pre.flatten()[top_e] > 0]
    demand = torch.bincount(top_e % N, minlength=N).float() / B
    assert torch.allclose(coder.demand, demand)
    rank = torch.empty(N, dtype=torch.long)
    rank[demand.argsort(descending=True, stable=True)] = torch.arange(N)
    capacity_i = zipf_capacities(N, K * B, B, exponent=1.0)[rank]
    chosen = dense(code) > 0
    for i in range(N):
        top = pre[:, i].topk(int(capacity_i[i])).indices
        expected = torch.zeros(B, dtype=torch.bool)
        expected[top[pre[top, i] > 0]] = True
        assert torch.equal(chosen[:, i], expected), i
        assert coder.threshold[i] == pre[top[-1], i].clamp_min(0)
    assert not torch.equal(rank, torch.arange(N))  # the test would not tell the orders apart otherwise


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0])
def test_capacities_that_do_not_divide_the_budget_stay_ordered_and_select(exponent):
    # 16 x 32 matches over 48 latents: 10.67 each under exponent 0, so some take 11 and some 10.
    capacity = zipf_capacities(48, 16 * 32, 32, exponent)
    assert int(capacity.sum()) == 16 * 32 and (capacity[:-1] >= capacity[1:]).all()
    pre = torch.randn(32, 48, generator=torch.Generator().manual_seed(1))
    rows, cols, _ = feature_choice(pre, capacity)
    top = pre.topk(int(capacity.max()), dim=0).values  # the reference: each column's own top-m
    expected = pre >= top.gather(0, (capacity - 1)[None]).clamp_min(0)
    expected &= pre > 0
    chosen = torch.zeros_like(expected)
    chosen[rows, cols] = True
    assert torch.equal(chosen, expected)


def test_zipf_capacities_redistribute_what_the_batch_cannot_hold():
    # At k = 16, n = 2304, B = 4096 the first latents' Zipf share exceeds the batch: they are
    # capped at B and the rest of the budget still goes to the others.
    B, n, k = 4096, 2304, 16
    capacity = zipf_capacities(n, k * B, B, exponent=1.0)
    assert int(capacity.sum()) == k * B
    assert capacity[0] == B and capacity.max() == B and (capacity[:-1] >= capacity[1:]).all()
    free = capacity < B
    ratio = capacity[free].double() / (1 / torch.arange(1, n + 1, dtype=torch.float64))[free]
    assert ratio.max() / ratio.min() < 1.5  # still Zipf below the cap (up to integer rounding)


def test_underused_latents_fall_under_the_zipf_law():
    ranks = torch.arange(1, 101, dtype=torch.float)
    law = 0.1 / ranks
    assert not underused_by_zipf(law, 0.5).any()
    density = law.clone()
    density[80:] *= 0.1  # the low end falls off the law, as the paper observes
    density[99] = 0  # dead
    order = torch.randperm(100)
    expected = torch.arange(100) >= 80
    assert torch.equal(underused_by_zipf(density[order], 0.5), expected[order])


@pytest.mark.parametrize("arch", BATCH_LEVEL)
def test_inference_does_not_depend_on_the_batch(arch):
    coder = make(arch)
    warm_up(coder, steps=20)
    coder.eval()
    x, _ = data(seed=99)
    together = dense(coder.encode(x))
    alone = torch.cat([dense(coder.encode(x[i : i + 1])) for i in range(B)])
    shuffled = torch.randperm(B)
    torch.testing.assert_close(alone, together)
    torch.testing.assert_close(dense(coder.encode(x[shuffled])), together[shuffled])
    l0 = (together > 0).sum(1).float().mean()
    assert 0 < l0 < N / 2  # the threshold keeps a sparse code


def test_gradient_selection_uses_the_gradient():
    coder = make("gradient", beta=5.0)
    topk = make("topk")
    topk.load_state_dict(coder.state_dict())
    x, grad = data()
    selected = lambda c, **kw: set(map(tuple, (dense(c.encode(x, SelectContext(**kw))) > 0).nonzero().tolist()))
    with_grad = selected(coder, grad=grad)
    assert with_grad != selected(coder, grad=grad.flip(0))
    assert with_grad != selected(topk)
    assert selected(coder, grad=torch.zeros_like(grad)) == selected(topk)
    zero_beta = make("gradient", beta=0.0)
    zero_beta.load_state_dict(coder.state_dict())
    assert selected(zero_beta, grad=grad) == selected(topk)
    coder.eval()
    assert selected(coder) == selected(topk)  # inference without a gradient is TopK
    coder.train()
    with pytest.raises(ValueError, match="trains on gradients"):
        coder(x)


@pytest.mark.parametrize("arch", ["topk", "feature_choice"])
def test_skip_transcoder_shapes_and_round_trip(arch, tmp_path):
    coder = create_coder(arch, d_in=D, n_latents=N, k=K, hook="blocks.0.ln2.hook_normalized",
                         target_hook="blocks.0.hook_mlp_out", d_out=24, skip=True)
    x = torch.randn(B, D)
    y = torch.randn(B, 24)
    coder.fit_normalization(x, y)
    out = coder(x, y)
    assert out.x_hat.shape == (B, 24) and coder.W_skip.shape == (24, D)
    out.fvu.backward()
    assert coder.W_skip.grad.abs().sum() > 0
    coder.save(tmp_path / "tc")
    loaded = load_sae(tmp_path / "tc")
    loaded.eval(), coder.eval()
    assert torch.equal(loaded.reconstruct(x), coder.reconstruct(x))


def test_transcode_target_defaults_to_the_mlp_output():
    assert target_hook(RunConfig(hooks=["blocks.3.ln2.hook_normalized"], transcode=True)) == "blocks.3.hook_mlp_out"
    assert target_hook(RunConfig(hooks=[HOOK])) is None
    with pytest.raises(ValueError, match="--target-hook"):
        target_hook(RunConfig(hooks=[HOOK], transcode=True))
    with pytest.raises(ValueError, match="needs --transcode"):
        target_hook(RunConfig(hooks=[HOOK], skip=True))


def test_the_default_run_folder_names_model_hook_arch_and_k():
    assert default_run_folder(RunConfig()) == Path("runs/smollm2-135m-blocks.6.hook_resid_post-topk-k32")
    assert default_run_folder(RunConfig(arch="gradient", coder_options={"k": 8})).name.endswith("-gradient-k8")


def test_transcoder_splice_replaces_the_mlp_output(tiny_model):
    cfg = RunConfig(model="tiny-llama", data=DataConfig(context_size=16, model_batch=2), splice_tokens=30)
    coder = create_coder("topk", d_in=64, n_latents=64, k=4, hook="blocks.1.ln2.hook_normalized",
                         target_hook="blocks.1.hook_mlp_out")
    with torch.no_grad():
        coder.W_dec.zero_(), coder.b_dec.zero_()  # reconstructs zeros: splicing it is zero-ablating the MLP
    metrics = splice_metrics(tiny_model, coder, heldout_token_batches(tiny_model, cfg.data, 30), progress=False)
    assert metrics["loss_spliced"] == pytest.approx(metrics["loss_zero"], abs=1e-5)
    assert metrics["loss_spliced"] != pytest.approx(metrics["loss_clean"], abs=1e-4)


def test_attention_output_coder_attributes_latents_to_heads():
    coder = create_coder("topk", d_in=64, n_latents=8, k=2, hook="blocks.0.attn.hook_z")
    with torch.no_grad():
        coder.W_dec[0] = 0
        coder.W_dec[0, 32:48] = 1  # head 2 of 4 (d_head 16)
    fractions = coder.decoder_head_fractions(4)
    assert fractions.shape == (8, 4)
    torch.testing.assert_close(fractions.sum(1), torch.ones(8))
    assert fractions[0].tolist() == [0, 0, 1, 0]


@pytest.mark.parametrize(
    ("arch", "hook", "extra"),
    [
        ("gradient", "blocks.0.hook_resid_post", {}),
        ("mutual_choice", "blocks.0.ln2.hook_normalized", {"transcode": True, "skip": True}),
        ("feature_choice", "blocks.1.attn.hook_z", {}),
        ("codebook", "blocks.1.attn.hook_z", {}),
    ],
)
def test_train_run_on_the_tiny_model(arch, hook, extra, tmp_path):
    cfg = RunConfig(
        model="tiny-llama", hooks=[hook], arch=arch, coder_options={"k": 4}, expansion=2, data=DataConfig(context_size=32, model_batch=4),
        buffer_tokens=512, eval_tokens=200, splice_tokens=60, train=TrainConfig(tokens=1024, batch_size=128, eval_every=0),
        **extra,
    )
    coder, result, metrics = train_run(cfg, tmp_path / arch, progress=False)
    assert result.steps == 8 and 0 < metrics["l0"] and metrics["fvu"] < 1.5
    assert load_sae(tmp_path / arch).cfg == coder.cfg
    if extra.get("transcode"):
        assert coder.cfg.target_hook == "blocks.0.hook_mlp_out" and coder.cfg.skip


def test_saved_coders_carry_inference_state_only_and_version_1_folders_load(tmp_path):
    """Format 2 keeps the input-norm bound as a buffer and training-only state out of the folder;
    a folder written by format 1 (bound in cfg.json, training state among the weights) loads."""
    import json

    from safetensors.torch import save_file

    coder = make("mutual_choice")
    warm_up(coder)
    coder.set_max_input_norm(7.5)
    coder.eval()
    folder = coder.save(tmp_path / "v2")
    saved = json.loads((folder / "cfg.json").read_text())
    assert saved["format_version"] == 2 and "max_input_norm" not in saved["config"]
    assert "density" not in load_sae(folder).state_dict() and "threshold" in load_sae(folder).state_dict()
    x, _ = data(seed=7)
    # The same coder as format 1 wrote it.
    v1 = tmp_path / "v1"
    v1.mkdir()
    weights = {k: v for k, v in coder.state_dict().items() if k != "input_bound"} | coder.training_state()
    save_file({k: v.contiguous() for k, v in weights.items()}, v1 / "weights.safetensors")
    (v1 / "cfg.json").write_text(json.dumps({**saved, "format_version": 1, "config": {**saved["config"], "max_input_norm": 7.5}}))
    old = load_sae(v1).eval()
    assert old.max_input_norm == 7.5 and old.cfg == coder.cfg
    assert torch.equal(old.reconstruct(x), coder.reconstruct(x))


def test_the_selection_context_is_typed():
    with pytest.raises(TypeError):
        SelectContext(dead_maks=torch.zeros(3, dtype=torch.bool))
    assert not create_coder("topk", d_in=4, n_latents=8, k=2).needs_grad and REGISTRY["gradient"].needs_grad


def test_saved_settings_read_back_on_any_machine_and_old_comparisons_resume():
    from interp.run import saved_run_config

    coder = make("topk")
    coder.meta = {"run": {"model": "tiny-llama", "device": "cuda:3", "k": 4, "coder_options": {"max_input_norm": 9.0}}}
    cfg = saved_run_config(coder)
    assert cfg.device == "cpu" and cfg.coder_options == {"k": 4}
    with pytest.raises(ValueError, match="top k must be a whole number >= 1"):
        from interp.features import FeatureConfig

        FeatureConfig(top_k=0)
