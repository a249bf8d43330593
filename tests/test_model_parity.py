"""What interp takes from TransformerLens's bridge, checked against the Hugging Face model it wraps
(a separate copy with the same weights, which the bridge never touched, read by plain torch
hooks). A transformers or TransformerLens release that changes any of these fails here: the
logits, every hook point interp reads or writes, editing an activation in place, the gradient
of the loss at a hook, and stopping early (test_generation.py checks decoding against it)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from interp.data import TokenBatch
from interp.hooks import capture, grad_key
from interp.metrics import splice_metrics
from interp.models import load_hf, stop_layer
from interp.sae import create_coder

TEXT = "The quick brown fox jumps over the lazy dog. It was not amused, and it said so twice."


def hf_points(hf_model, tokens, layer):
    """The activations at layer `layer` that interp's hook names stand for, from the plain model."""
    seen = {}
    block = hf_model.model.layers[layer]
    handles = [
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__("resid_pre", kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True),
        block.self_attn.register_forward_hook(lambda m, args, out: seen.__setitem__("attn_out", out[0])),
        block.self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0])),
        block.post_attention_layernorm.register_forward_hook(lambda m, args, out: seen.__setitem__("ln2", out)),
        block.mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("mlp_out", out)),
        block.register_forward_hook(lambda m, args, out: seen.__setitem__("resid_post", out[0] if isinstance(out, tuple) else out)),
        hf_model.model.norm.register_forward_hook(lambda m, args, out: seen.__setitem__("ln_final", out)),
    ]
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    n_heads = hf_model.config.num_attention_heads
    # TransformerLens's hook_normalized is the norm's output before its elementwise gain; its
    # hook_out, after it, is what the MLP reads.
    ln2_gain = block.post_attention_layernorm.weight
    return logits, {
        f"blocks.{layer}.hook_resid_pre": seen["resid_pre"],
        f"blocks.{layer}.hook_resid_mid": seen["resid_pre"] + seen["attn_out"],
        f"blocks.{layer}.attn.hook_z": seen["z"].reshape(*seen["z"].shape[:2], n_heads, -1),
        f"blocks.{layer}.ln2.hook_normalized": seen["ln2"] / ln2_gain,
        f"blocks.{layer}.ln2.hook_out": seen["ln2"],
        f"blocks.{layer}.hook_mlp_out": seen["mlp_out"],
        f"blocks.{layer}.hook_resid_post": seen["resid_post"],
        "ln_final.hook_normalized": seen["ln_final"] / hf_model.model.norm.weight,
    }


def check_hooks_match(model, hf_model, layer, atol):
    tokens = model.to_tokens(TEXT)
    logits, expected = hf_points(hf_model, tokens, layer)
    with torch.no_grad():
        bridge_logits, cache = model.run_with_cache(tokens, names_filter=list(expected))
    torch.testing.assert_close(bridge_logits, logits, atol=atol, rtol=1e-4)
    for name, act in expected.items():
        torch.testing.assert_close(cache[name], act, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def hf_loss_with_mlp_zeroed(hf_model, tokens, layer):
    """Next-token loss with layer `layer`'s MLP output set to zero at every position but BOS."""

    def zero(module, args, out):
        out = out.clone()
        out[:, 1:] = 0
        return out

    handle = hf_model.model.layers[layer].mlp.register_forward_hook(zero)
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits
    finally:
        handle.remove()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def hf_resid_grad(hf_model, tokens, layer):
    """Gradient of the summed next-token loss with respect to layer `layer`'s output."""
    kept = {}

    def keep(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = hidden.detach().requires_grad_(True)
        kept["h"] = hidden
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = hf_model.model.layers[layer].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = hf_model(tokens).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").backward()
    finally:
        handle.remove()
    return kept["h"].grad


@pytest.fixture(scope="module")
def tiny_hf():
    return load_hf("tiny-llama")[0]


@pytest.fixture(scope="module")
def tiny_with_gains():
    """(bridge, plain HF model) of the tiny model with random norm gains: freshly initialised
    gains are all 1, which would hide where a hook sits relative to them."""
    hf_model, tokenizer = load_hf("tiny-llama")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if "norm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=copy.deepcopy(hf_model), tokenizer=tokenizer)
    return bridge.eval(), hf_model


@pytest.mark.parametrize("layer", [0, 1])
def test_tiny_bridge_hooks_are_the_hf_models_activations(tiny_with_gains, layer):
    check_hooks_match(*tiny_with_gains, layer, atol=1e-5)


def test_captured_activations_and_gradients_match_the_hf_model(tiny_model, tiny_hf):
    tokens = tiny_model.to_tokens(TEXT)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    batch = TokenBatch(tokens, mask)
    _, expected = hf_points(tiny_hf, tokens, 0)
    # Stopped after block 0, as interp's activation pass does.
    stopped = capture(tiny_model, batch.tokens_bt, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"], batch.mask_bt)
    assert stop_layer(tiny_model, ["blocks.0.hook_resid_post"]) == 1
    for name in ("blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"):
        torch.testing.assert_close(stopped[name], expected[name][0, 1:], atol=1e-5, rtol=1e-4)
    with_grads = capture(tiny_model, batch.tokens_bt, ["blocks.0.hook_resid_post"], batch.mask_bt, with_grads=True)
    grad = hf_resid_grad(tiny_hf, tokens, 0)
    torch.testing.assert_close(with_grads[grad_key("blocks.0.hook_resid_post")], grad[0, 1:], atol=1e-5, rtol=1e-4)
    assert grad[0, 1:].abs().max() > 0


def test_splicing_at_a_hook_edits_the_hf_models_computation(tiny_model, tiny_hf):
    """A transcoder that reconstructs zeros, spliced at blocks.1.hook_mlp_out, is the HF model
    with that MLP's output zeroed (the test that once failed on transformers 5.17)."""
    coder = create_coder("topk", d_in=64, n_latents=64, k=4, hook="blocks.1.ln2.hook_normalized", target_hook="blocks.1.hook_mlp_out")
    with torch.no_grad():
        coder.W_dec.zero_(), coder.b_dec.zero_()
    tokens = tiny_model.to_tokens([TEXT, TEXT[::-1]])[:, :24]
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    metrics = splice_metrics(tiny_model, coder, [TokenBatch(tokens, mask)], progress=False)
    assert metrics["loss_spliced"] == pytest.approx(hf_loss_with_mlp_zeroed(tiny_hf, tokens, 1), abs=1e-5)
    with torch.no_grad():
        clean = tiny_hf(tokens).logits
    assert metrics["loss_clean"] == pytest.approx(F.cross_entropy(clean[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item(), abs=1e-5)
    assert metrics["loss_spliced"] != pytest.approx(metrics["loss_clean"], abs=1e-4)


@pytest.fixture(scope="module")
def smollm2_hf():
    return load_hf("smollm2-135m")[0]


@pytest.mark.slow
def test_smollm2_bridge_matches_the_hf_model(smollm2, smollm2_hf):
    check_hooks_match(smollm2, smollm2_hf, 6, atol=1e-4)
    tokens = smollm2.to_tokens(TEXT)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    batch = TokenBatch(tokens, mask)
    captured = capture(smollm2, batch.tokens_bt, ["blocks.6.hook_resid_post"], batch.mask_bt, with_grads=True)
    grad = hf_resid_grad(smollm2_hf, tokens, 6)
    torch.testing.assert_close(captured[grad_key("blocks.6.hook_resid_post")], grad[0, 1:], atol=1e-4, rtol=1e-3)
