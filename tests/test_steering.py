"""Steering: exact edits on the tiny model (SAE and transcoder), position selection during cached
generation, bad input, and a measured effect on the real embedded model."""

import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from interp.data import DataConfig
from interp.features import logit_lens
from interp.generation import decode
from interp.hooks import output_hook
from interp.run import RunConfig, train_run
from interp.sae import create_coder, load_sae
from interp.steering import (
    GenerateConfig,
    ablate,
    add_direction,
    add_feature,
    applied,
    clamp,
    compare_generations,
    feature_direction,
    scale,
    steer,
)
from interp.train import TrainConfig

SAE_HOOKS = {"sae": ("blocks.0.hook_resid_post", None), "transcoder": ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")}


def tiny_coder(kind="sae", n_latents=128, k=8):
    hook, target = SAE_HOOKS[kind]
    coder = create_coder("topk", d_in=64, n_latents=n_latents, k=k, hook=hook, target_hook=target, model="tiny-llama")
    with torch.no_grad():
        coder.in_scale.fill_(3.0)
        coder.out_scale.fill_(2.0)
    return coder.eval()


def capture(model, tokens, hook, *interventions, positions="all"):
    """The activation at `hook` as the rest of the model sees it, with the interventions on."""
    seen = {}

    def record(act, hook):
        seen["act"] = act.detach().clone()
        return act

    with torch.no_grad(), steer(model, *interventions, positions=positions):
        # run_with_hooks adds its hook after the steering hook on the same point, so it sees the edit.
        logits = model.run_with_hooks(tokens, fwd_hooks=[(model.hook_dict[hook].name, record)])
    return seen["act"], logits


def feature_values(coder, x_btd, feature):
    code = coder.encode(x_btd.reshape(-1, x_btd.shape[-1]))
    return ((code.indices_bk == feature) * code.values_bk).sum(1).reshape(x_btd.shape[:2])


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_ablation_removes_exactly_the_feature(tiny_model, kind):
    coder = tiny_coder(kind)
    tokens = tiny_model.to_tokens("The cat sat on the mat and looked around.")
    read, write = coder.cfg.hook, output_hook(coder)
    x_in, _ = capture(tiny_model, tokens, read)
    clean, _ = capture(tiny_model, tokens, write)
    # Pick the feature that fires on most tokens so the check is not vacuous.
    fired = torch.stack([(feature_values(coder, x_in, f) > 0).sum() for f in range(coder.cfg.n_latents)])
    feature = int(fired.argmax())
    values_bt = feature_values(coder, x_in, feature)
    values_bt[:, 0] = 0  # BOS is never edited
    assert (values_bt > 0).sum() >= 2
    edited, _ = capture(tiny_model, tokens, write, ablate(coder, feature))
    # The clean activation minus this feature's decoded contribution: the coder's error and every
    # other feature's contribution are kept.
    expected = clean - values_bt[..., None] * feature_direction(coder, feature)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)


def test_clamp_scale_and_several_features(tiny_model):
    coder = tiny_coder()
    tokens = tiny_model.to_tokens("Several features at once.")
    x, _ = capture(tiny_model, tokens, coder.cfg.hook)
    edited, _ = capture(tiny_model, tokens, coder.cfg.hook, clamp(coder, 3, 5.0), scale(coder, 7, 2.0))
    v3, v7 = feature_values(coder, x, 3), feature_values(coder, x, 7)
    delta = (5.0 - v3)[..., None] * feature_direction(coder, 3) + v7[..., None] * feature_direction(coder, 7)
    delta[:, 0] = 0
    torch.testing.assert_close(edited, x + delta, atol=1e-5, rtol=1e-5)


def test_add_direction_at_chosen_positions(tiny_model):
    coder = tiny_coder()
    tokens = tiny_model.to_tokens("Steer here only")
    x, _ = capture(tiny_model, tokens, coder.cfg.hook)
    edited, _ = capture(tiny_model, tokens, coder.cfg.hook, add_feature(coder, 5, 3.0), positions=[0, 2, 4])
    moved = (edited - x).norm(dim=-1)[0] > 1e-6
    assert moved.tolist() == [p in (2, 4) for p in range(tokens.shape[1])]  # 0 is BOS: never steered
    torch.testing.assert_close((edited - x)[0, 2], 3.0 * feature_direction(coder, 5))


def test_new_positions_only_steer_generated_tokens(tiny_model):
    direction = torch.randn(64)
    tokens = tiny_model.to_tokens("Prompt text")
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[hook])
    steps = []

    def log_step(act, hook):
        steps.append(act.detach().clone())
        return act

    @contextmanager
    def during(window):
        with applied(tiny_model, [add_direction(hook, direction, 10.0)], "new", window):
            with tiny_model.hooks(fwd_hooks=[(tiny_model.hook_dict[hook].name, log_step)]):
                yield

    decode(tiny_model, tokens[0].tolist(), 3, [0], during=during, use_cache=True)
    # The prompt pass is untouched; each cached one-token pass carries the direction.
    torch.testing.assert_close(steps[0], cache[hook])
    assert len(steps) == 3 and all(s.shape[1] == 1 for s in steps[1:])
    with torch.no_grad():
        for step in steps[1:]:
            assert float((step[0, 0] @ direction) / direction.norm()) > 5.0


def test_side_by_side_generations_share_seeds(tiny_model):
    coder = tiny_coder()
    cfg = GenerateConfig(max_new_tokens=6, samples=2, seed=3, stop_at_eos=False)
    same = compare_generations(tiny_model, "Hello", [add_feature(coder, 1, 0.0)], cfg)
    assert same.baseline_tokens == same.steered_tokens and len(same.baseline_tokens) == 2
    assert len(same.baseline_tokens[0]) == 6 and same.baseline_tokens[0] != same.baseline_tokens[1]
    changed = compare_generations(tiny_model, "Hello", [add_feature(coder, 1, 200.0)], cfg)
    assert changed.baseline_tokens == same.baseline_tokens and changed.steered_tokens != changed.baseline_tokens


def test_bad_input(tiny_model):
    coder = tiny_coder()
    with pytest.raises(ValueError, match="out of range: the coder has 128 latents"):
        add_feature(coder, 128, 1.0)
    with pytest.raises(ValueError, match="out of range"):
        ablate(coder, -1)
    with pytest.raises(ValueError, match="finite"):
        add_feature(coder, 1, math.nan)
    with pytest.raises(ValueError, match="finite"):
        clamp(coder, 1, math.inf)
    with pytest.raises(ValueError, match="trained on 'blocks.0.hook_resid_post'"):
        add_feature(coder, 1, 1.0, hook="blocks.1.hook_resid_post")
    wrong = create_coder("topk", d_in=64, n_latents=16, k=2, hook="blocks.9.hook_resid_post", model="other")
    with pytest.raises(ValueError, match="trained on other: unknown hook 'blocks.9.hook_resid_post'"):
        with steer(tiny_model, ablate(wrong, 0)):
            pass
    with pytest.raises(ValueError, match="positions"):
        with steer(tiny_model, ablate(coder, 0), positions="everywhere"):
            pass


def small_smollm2_run(base: Path) -> Path:
    """A small TopK SAE on layer 6 of the embedded model, trained once per test session (the
    notebooks use the same one); the settings match the notebooks' own."""
    run = base / "smollm2-l6"
    if not (run / "cfg.json").exists():
        cfg = RunConfig(
            model="smollm2-135m", hooks=["blocks.6.hook_resid_post"], coder_options={"k": 16}, latents=1152,
            data=DataConfig(context_size=64), buffer_tokens=8192, eval_tokens=1008, splice_tokens=1008,
            train=TrainConfig(tokens=16_384, batch_size=1024, warmup_steps=2, eval_every=0, checkpoint_every=16),
        )
        train_run(cfg, run, progress=False)
    return run


@pytest.fixture(scope="module")
def smollm2_coder(tmp_path_factory):
    return load_sae(small_smollm2_run(tmp_path_factory.getbasetemp()))


def generated_batch(model, prompt, continuations):
    prompt_ids = model.to_tokens(prompt)[0].tolist()
    return torch.tensor([prompt_ids + c for c in continuations]), len(prompt_ids)


@pytest.mark.slow
def test_steering_raises_the_features_tokens_and_activation(smollm2, smollm2_coder):
    model, coder = smollm2, smollm2_coder
    lens = logit_lens(model, coder, n_tokens=10)
    feature = int(lens["lens_top_values_nt"][:, 0].argmax())
    lens_ids = lens["lens_top_ids_nt"][feature]
    prompt = "My favourite thing to do on the weekend is"
    add = add_feature(coder, feature, 100.0)
    pair = compare_generations(model, prompt, [add], GenerateConfig(max_new_tokens=8, samples=3, seed=0))

    def lens_mass(continuations, *interventions):
        tokens, start = generated_batch(model, prompt, continuations)
        with torch.no_grad(), steer(model, *interventions):
            probs = model(tokens)[:, start - 1 : -1].softmax(-1)
        return probs[..., lens_ids].sum(-1).mean(1)

    def activation(continuations, *interventions):
        # The feature as the coder reads the activation the rest of the model sees on the generated text.
        tokens, start = generated_batch(model, prompt, continuations)
        x, _ = capture(model, tokens, coder.cfg.hook, *interventions)
        return feature_values(coder, x[:, start:], feature).mean(1)

    base_mass, steered_mass = lens_mass(pair.baseline_tokens), lens_mass(pair.steered_tokens, add)
    # Beyond seed noise: every steered sample above every baseline sample.
    assert steered_mass.min() > base_mass.max(), (base_mass, steered_mass)
    base_act, steered_act = activation(pair.baseline_tokens), activation(pair.steered_tokens, add)
    assert steered_act.min() > base_act.max(), (base_act, steered_act)


@pytest.mark.slow
def test_ablation_through_the_sae_on_smollm2(smollm2, smollm2_coder):
    model, coder = smollm2, smollm2_coder
    tokens = model.to_tokens("The capital of France is Paris, and the river Seine runs through it.")
    clean, clean_logits = capture(model, tokens, coder.cfg.hook)
    values = torch.stack([feature_values(coder, clean, f) for f in range(coder.cfg.n_latents)])  # (n, 1, pos)
    values[:, :, 0] = 0
    feature = int((values > 0).sum((1, 2)).argmax())
    edited, edited_logits = capture(model, tokens, coder.cfg.hook, ablate(coder, feature))
    expected = clean - values[feature][..., None] * feature_direction(coder, feature)
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(edited_logits, clean_logits)


def test_one_edit_per_feature_and_kind():
    coder = tiny_coder()
    from interp.steering import FeatureEdit, check_interventions

    with pytest.raises(ValueError, match="edited twice"):
        check_interventions(None, [clamp(coder, 3, 1.0), scale(coder, 3, 2.0)])
    with pytest.raises(ValueError, match="exactly one of scale and clamp"):
        FeatureEdit(coder, 3)
