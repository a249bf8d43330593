"""The steering-effect measure against a reference built from plain hooked forward passes, the
unembedding read directly and torch's own KL divergence."""

import pytest
import torch
import torch.nn.functional as F

from interp.data import TokenBatch
from interp.errors import BadInput
from interp.sae import create_coder
from interp.steering_effect import live_features, steering_effect

HOOK = "blocks.0.hook_resid_post"


def coder_and_batches(model):
    coder = create_coder("topk", d_in=64, n_latents=96, k=6, hook=HOOK, model="tiny-llama").eval()
    tokens = torch.stack([model.to_tokens(text)[0, :9] for text in ("The cat sat on the mat and looked", "A dog ran to the park in the early")])
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False  # BOS is not measured
    mask[1, -2:] = False  # nor padding
    return coder, [TokenBatch(tokens, mask)]


def reference(model, coder, batch, features, strength, n_lens):
    W_dec = coder.W_dec.detach() / coder.out_scale
    name = model.hook_dict[HOOK].name
    with torch.no_grad():
        clean = F.log_softmax(model(batch.tokens_bt).float(), -1)[batch.mask_bt]
        zero = model.unembed(model.ln_final(torch.zeros(1, 1, 64)))[0, 0]
        kls, rises = [], []
        for feature in features:
            unit = W_dec[feature] / W_dec[feature].norm()

            def add(act, hook, unit=unit):  # every position but BOS, as steering does
                return torch.cat([act[:, :1], act[:, 1:] + strength * unit], dim=1)

            steered_logits = model.run_with_hooks(batch.tokens_bt, fwd_hooks=[(name, add)])
            steered = F.log_softmax(steered_logits.float(), -1)[batch.mask_bt]
            kls.append(F.kl_div(steered, clean, log_target=True, reduction="batchmean").item())
            lens = model.unembed(model.ln_final(W_dec[feature].view(1, 1, -1)))[0, 0] - zero
            ids = lens.topk(n_lens).indices
            rises.append((steered[:, ids] - clean[:, ids]).mean().item())
    return sum(kls) / len(kls) / strength, sum(rises) / len(rises)


def test_steering_effect_matches_plain_hooked_passes(tiny_model):
    coder, batches = coder_and_batches(tiny_model)
    features, strength = [3, 40, 77], 4.0
    got = steering_effect(tiny_model, coder, batches, features, strength, lens_tokens=5)
    kl, rise = reference(tiny_model, coder, batches[0], features, strength, 5)
    assert got["kl_per_norm"] > 0 and got["kl_per_norm"] == pytest.approx(kl, rel=1e-4)
    assert got["lens_rise"] == pytest.approx(rise, rel=1e-4, abs=1e-6)
    assert got["steer_features"] == 3 and got["steer_strength"] == strength


def test_live_features_are_a_seeded_sample_of_the_fired_ones(tiny_model):
    coder, _ = coder_and_batches(tiny_model)
    x = torch.randn(200, 64)
    code = coder.encode(x).indices_bk
    fired = set(code[code >= 0].tolist())
    chosen = live_features(coder, [{HOOK: x}], 10, seed=1)
    assert len(chosen) == 10 == len(set(chosen)) and set(chosen) <= fired
    assert chosen == live_features(coder, [{HOOK: x}], 10, seed=1) != live_features(coder, [{HOOK: x}], 10, seed=2)
    assert set(live_features(coder, [{HOOK: x}], 10_000, seed=0)) == fired


def test_a_strength_that_is_not_positive_is_refused(tiny_model):
    coder, batches = coder_and_batches(tiny_model)
    with pytest.raises(BadInput, match="strength must be > 0"):
        steering_effect(tiny_model, coder, batches, [1], 0.0)
