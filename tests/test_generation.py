"""Generation against references that share nothing with interp's decoder: a loop of full
forward passes written here, and the Hugging Face model's own `generate` on the same weights (a
copy the bridge never wrapped, with steering done by a plain torch hook on its decoder layer).
Each runs with the key-value cache forced on, forced off, and chosen by the check; a broken cache
(the transformers 5.24 failure) must be detected and routed around. Prompts of different lengths
decoded as one left-padded batch must give each prompt's tokens decoded alone by the reference
loop, steered or not; a batch whose padding leaks must be detected and decoded prompt by prompt."""

import pytest
import torch
from transformer_lens.model_bridge.generalized_components.attention import (
    AttentionBridge,
)
from transformers.cache_utils import DynamicCache

from interp.generation import cache_usable, decode, kv_cache_exact, padding_exact
from interp.models import load_hf
from interp.sae import create_coder
from interp.steering import (
    GenerateConfig,
    ablate,
    add_direction,
    add_feature,
    clamp,
    compare_generations,
    generate,
    steer,
)

PROMPTS = ["Hi", "The cat sat on the mat and looked", "A much longer prompt, so that the cache holds many positions before the first step."]
HOOK = "blocks.0.hook_resid_post"


def reference_decode(model, prompt_ids, cfg: GenerateConfig, seed, interventions=()):
    """Full forward pass per token, one sample at a time; steering at absolute positions."""
    generator = torch.Generator().manual_seed(seed)
    tokens, out = list(prompt_ids), []
    for _ in range(cfg.max_new_tokens):
        if cfg.positions == "new":
            where = list(range(len(prompt_ids), len(tokens)))
        else:
            where = cfg.positions
        with torch.no_grad(), steer(model, *interventions, positions=where):
            logits = model(torch.tensor([tokens]))[0, -1].float()
        if cfg.temperature == 0:
            token = int(logits.argmax())
        else:
            scores = logits / cfg.temperature
            if cfg.top_k is not None:
                scores[scores < scores.sort(descending=True).values[cfg.top_k - 1]] = float("-inf")
            token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
        out.append(token)
        tokens.append(token)
        if cfg.stop_at_eos and token == model.tokenizer.eos_token_id:
            break
    return out


def hf_generate(hf_model, prompt_ids, cfg: GenerateConfig, seed, eos_token_id, layer=None, direction=None, positions="all"):
    """The Hugging Face model's own generate (cached), optionally adding `direction` to the output
    of decoder layer `layer` at the steered positions, read from the layer's position ids."""
    handle = None
    if layer is not None:
        prompt_len = len(prompt_ids)

        def add(module, args, kwargs, output):
            pos = kwargs["position_ids"][0]
            keep = (pos > 0) & ((pos >= prompt_len) if positions == "new" else torch.ones_like(pos, dtype=torch.bool))
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden + keep[None, :, None] * direction
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = hf_model.model.layers[layer].register_forward_hook(add, with_kwargs=True)
    sampling = {"do_sample": True, "temperature": cfg.temperature, "top_k": cfg.top_k or 0, "top_p": 1.0} if cfg.temperature else {"do_sample": False}
    try:
        torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.max_new_tokens,
                eos_token_id=eos_token_id, pad_token_id=eos_token_id, **sampling,
            )
    finally:
        if handle is not None:
            handle.remove()
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def tiny_hf():
    return load_hf("tiny-llama")[0]


def tiny_sae():
    coder = create_coder("topk", d_in=64, n_latents=128, k=8, hook=HOOK, model="tiny-llama")
    with torch.no_grad():
        coder.in_scale.fill_(3.0)
        coder.out_scale.fill_(2.0)
    return coder.eval()


def test_the_cache_check_passes_on_the_tested_versions(tiny_model):
    assert kv_cache_exact(tiny_model)


@pytest.mark.parametrize("use_cache", [True, False, None])
# The tiny random model's logits are nearly flat (std ~0.17), so only a low temperature makes the
# sampled tokens depend on them.
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.1, "top_k": 20}, {"temperature": 0.3}])
def test_decode_equals_full_forward_passes(tiny_model, use_cache, sampling):
    cfg = GenerateConfig(max_new_tokens=12, samples=3, seed=5, stop_at_eos=False, **sampling)
    seeds = [cfg.seed + i for i in range(cfg.samples)]
    firsts = set()
    for prompt in PROMPTS:
        ids = tiny_model.to_tokens(prompt)[0].tolist()
        got = decode(tiny_model, ids, cfg.max_new_tokens, seeds, cfg.temperature, cfg.top_k, stop_at_eos=False, use_cache=use_cache)
        assert got == [reference_decode(tiny_model, ids, cfg, s) for s in seeds]
        if cfg.temperature:
            assert len({tuple(t) for t in got}) > 1, "the samples should differ"
        firsts.add(tuple(got[0]))
    assert len(firsts) == len(PROMPTS), "each prompt should be continued differently"


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.1, "top_k": 30}])
def test_decode_equals_the_hugging_face_generate(tiny_model, tiny_hf, sampling):
    cfg = GenerateConfig(max_new_tokens=15, samples=2, seed=11, **sampling)
    eos = tiny_model.tokenizer.eos_token_id
    for prompt in PROMPTS:
        ids = tiny_model.to_tokens(prompt)[0].tolist()
        got = generate(tiny_model, prompt, cfg)
        assert got == [hf_generate(tiny_hf, ids, cfg, cfg.seed + i, eos) for i in range(cfg.samples)]


@pytest.mark.parametrize("positions", ["all", "new", "list"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_steered_decode_equals_steered_full_forward_passes(tiny_model, positions, use_cache):
    coder = tiny_sae()
    steering = [
        [add_direction(HOOK, torch.randn(64), 30.0)],
        [ablate(coder, 3), clamp(coder, 7, 60.0)],
        [add_feature(coder, 5, 80.0), ablate(coder, 9)],
    ]
    for prompt, interventions in zip(PROMPTS, steering):
        ids = tiny_model.to_tokens(prompt)[0].tolist()
        # A list: two prompt positions and two generated ones.
        where = [1, 2, len(ids) + 1, len(ids) + 4] if positions == "list" else positions
        cfg = GenerateConfig(max_new_tokens=10, samples=2, seed=1, temperature=0.1, positions=where, stop_at_eos=False)
        expected = [reference_decode(tiny_model, ids, cfg, cfg.seed + i, interventions) for i in range(cfg.samples)]
        if use_cache:
            assert generate(tiny_model, prompt, cfg, interventions) == expected
        else:
            # A hook of someone else's on the model: the cache must be off.
            with tiny_model.hooks(fwd_hooks=[(HOOK, lambda act, hook: act)]):
                assert not cache_usable(tiny_model)
                assert generate(tiny_model, prompt, cfg, interventions) == expected
        assert expected != [reference_decode(tiny_model, ids, cfg, cfg.seed + i) for i in range(cfg.samples)]


@pytest.mark.parametrize("positions", ["all", "new"])
def test_steered_decode_equals_the_hooked_hugging_face_generate(tiny_model, tiny_hf, positions):
    direction = torch.randn(64) * 3
    cfg = GenerateConfig(max_new_tokens=12, samples=2, seed=2, temperature=0.0, positions=positions)
    prompt = PROMPTS[1]
    ids = tiny_model.to_tokens(prompt)[0].tolist()
    eos = tiny_model.tokenizer.eos_token_id
    got = generate(tiny_model, prompt, cfg, [add_direction(HOOK, direction, 1.0)])
    expected = hf_generate(tiny_hf, ids, cfg, 0, eos, layer=0, direction=direction, positions=positions)
    assert got == [expected, expected]


def test_a_broken_cache_is_detected_and_avoided(tiny_model, monkeypatch):
    """Break the cache as transformers 5.24 did (each step sees only its own keys and values):
    the check must fail and decoding must fall back to full passes, still exact."""
    monkeypatch.setattr(DynamicCache, "update", lambda self, k, v, layer_idx, *args, **kwargs: (k, v))
    assert not kv_cache_exact(tiny_model)
    cfg = GenerateConfig(max_new_tokens=10, samples=1, seed=0, temperature=0.0, stop_at_eos=False)
    ids = tiny_model.to_tokens(PROMPTS[2])[0].tolist()
    expected = [reference_decode(tiny_model, ids, cfg, 0)]
    assert decode(tiny_model, ids, 10, [0], use_cache=True) != expected, "the injected fault should break cached decoding"
    assert generate(tiny_model, PROMPTS[2], cfg) == expected
    assert not kv_cache_exact(tiny_model, padded=True)
    assert generate(tiny_model, PROMPTS, cfg) == [[reference_decode(tiny_model, tiny_model.to_tokens(p)[0].tolist(), cfg, 0)] for p in PROMPTS]


@pytest.mark.parametrize("use_cache", [True, False, None])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.1, "top_k": 20}, {"temperature": 0.3}])
def test_prompts_of_different_lengths_decode_as_one_batch(tiny_model, use_cache, sampling):
    """3, 34 and 84 tokens in one batch: each row left-padded, each prompt's samples those of the
    prompt decoded alone by the reference loop."""
    cfg = GenerateConfig(max_new_tokens=12, samples=2, seed=5, stop_at_eos=False, **sampling)
    seeds = [cfg.seed + i for i in range(cfg.samples)]
    ids = [tiny_model.to_tokens(p)[0].tolist() for p in PROMPTS]
    assert len({len(i) for i in ids}) == len(PROMPTS)
    got = decode(tiny_model, ids, cfg.max_new_tokens, seeds, cfg.temperature, cfg.top_k, stop_at_eos=False, use_cache=use_cache)
    assert got == [[reference_decode(tiny_model, i, cfg, s) for s in seeds] for i in ids]
    if use_cache is None:
        assert generate(tiny_model, PROMPTS, cfg) == got
        assert generate(tiny_model, PROMPTS[:1], cfg) == [generate(tiny_model, PROMPTS[0], cfg)] == got[:1]


@pytest.mark.parametrize("positions", ["all", "new", "list"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_steered_prompts_of_different_lengths_decode_as_one_batch(tiny_model, positions, use_cache):
    """Steering a left-padded batch edits each row at its own positions: "new" its own generated
    tokens, a listed position counted from its own BOS (here 5 is generated for the 3-token
    prompt and in the prompt of the others, 40 generated only for the 34-token one)."""
    coder = tiny_sae()
    interventions = [add_feature(coder, 5, 80.0), ablate(coder, 9)]
    where = [1, 2, 5, 40, 90] if positions == "list" else positions
    cfg = GenerateConfig(max_new_tokens=10, samples=2, seed=1, temperature=0.1, positions=where, stop_at_eos=False)
    ids = [tiny_model.to_tokens(p)[0].tolist() for p in PROMPTS]
    expected = [[reference_decode(tiny_model, i, cfg, cfg.seed + s, interventions) for s in range(cfg.samples)] for i in ids]
    if use_cache:
        assert cache_usable(tiny_model, padded=True)
        assert generate(tiny_model, PROMPTS, cfg, interventions) == expected
    else:
        with tiny_model.hooks(fwd_hooks=[(HOOK, lambda act, hook: act)]):
            assert generate(tiny_model, PROMPTS, cfg, interventions) == expected
    unsteered = [[reference_decode(tiny_model, i, cfg, cfg.seed + s) for s in range(cfg.samples)] for i in ids]
    assert all(e != u for e, u in zip(expected, unsteered)), "the steering should change every prompt's text"


def test_leaking_padding_is_detected_and_avoided(tiny_model, monkeypatch):
    """Make the bridge's attention drop the attention mask (padding attended to, as if no mask
    were passed): the padding check must fail and each prompt must be decoded as its own batch,
    still exact."""
    def unmasked(self, attn_scores, attention_mask, seq_len, q_seq_len=None):
        return original(self, attn_scores, None, seq_len, q_seq_len)

    original = AttentionBridge._apply_reconstruct_attention_mask
    assert padding_exact(tiny_model) and kv_cache_exact(tiny_model, padded=True)
    monkeypatch.setattr(AttentionBridge, "_apply_reconstruct_attention_mask", unmasked)
    assert not padding_exact(tiny_model) and not kv_cache_exact(tiny_model, padded=True)
    cfg = GenerateConfig(max_new_tokens=8, samples=1, seed=0, temperature=0.0, stop_at_eos=False)
    assert generate(tiny_model, PROMPTS, cfg) == [[reference_decode(tiny_model, tiny_model.to_tokens(p)[0].tolist(), cfg, 0)] for p in PROMPTS]


def test_generation_stops_at_eos(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id
    # A direction along the EOS token's unembedding makes it the likeliest token at once.
    direction = tiny_model.W_U[:, eos] * 1e3
    cfg = GenerateConfig(max_new_tokens=8, temperature=0.0, positions="all")
    out = generate(tiny_model, "Stop", cfg, [add_direction("blocks.1.hook_resid_post", direction, 1.0)])
    assert out == [[eos]]
    assert len(generate(tiny_model, "Stop", GenerateConfig(max_new_tokens=8, stop_at_eos=False), [add_direction("blocks.1.hook_resid_post", direction, 1.0)])[0]) == 8


def test_bad_generation_input(tiny_model):
    with pytest.raises(ValueError, match="at least 1"):
        generate(tiny_model, "x", GenerateConfig(max_new_tokens=0))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(tiny_model, "x", GenerateConfig(temperature=-1.0))
    with pytest.raises(ValueError, match="finite"):
        generate(tiny_model, "x", GenerateConfig(temperature=float("nan")))
    with pytest.raises(ValueError, match="positions='new' means the generated tokens"):
        with steer(tiny_model, positions="new"):
            pass
    with pytest.raises(ValueError, match="every prompt needs tokens"):
        decode(tiny_model, [[0, 5], []], 3, [0])
    with pytest.raises(ValueError, match="a list of prompts"):
        generate(tiny_model, [])


@pytest.fixture(scope="module")
def smollm2_hf():
    return load_hf("smollm2-135m")[0]


@pytest.mark.slow
def test_smollm2_greedy_generation_is_right(smollm2, smollm2_hf):
    prompt = "My favourite thing to do on weekends is"
    ids = smollm2.to_tokens(prompt)[0].tolist()
    cfg = GenerateConfig(max_new_tokens=20, temperature=0.0)
    got = generate(smollm2, prompt, cfg)[0]
    assert got == reference_decode(smollm2, ids, cfg, 0)
    assert got == hf_generate(smollm2_hf, ids, cfg, 0, smollm2.tokenizer.eos_token_id)
    assert smollm2.tokenizer.decode(got).startswith(" to have a party.")
    # With a shorter prompt in the same batch (left-padded, cached: the check passes on SmolLM2).
    assert cache_usable(smollm2, padded=True)
    other = "The capital of France is"
    batch = generate(smollm2, [prompt, other], cfg)
    assert batch == [[got], [reference_decode(smollm2, smollm2.to_tokens(other)[0].tolist(), cfg, 0)]]
    assert "Paris" in smollm2.tokenizer.decode(generate(smollm2, "The capital of France is", GenerateConfig(max_new_tokens=3, temperature=0.0))[0])


@pytest.mark.slow
def test_smollm2_sampled_and_steered_generation_is_right(smollm2, smollm2_hf):
    prompt = "The weather today is"
    ids = smollm2.to_tokens(prompt)[0].tolist()
    eos = smollm2.tokenizer.eos_token_id
    cfg = GenerateConfig(max_new_tokens=12, temperature=0.8, top_k=40, samples=2, seed=3)
    got = generate(smollm2, prompt, cfg)
    assert got == [hf_generate(smollm2_hf, ids, cfg, cfg.seed + i, eos) for i in range(cfg.samples)]
    assert got == [reference_decode(smollm2, ids, cfg, cfg.seed + i) for i in range(cfg.samples)]
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0)) * 4
    steered_cfg = GenerateConfig(max_new_tokens=12, temperature=0.0, positions="new")
    steered = generate(smollm2, prompt, steered_cfg, [add_direction("blocks.6.hook_resid_post", direction, 1.0)])[0]
    assert steered == hf_generate(smollm2_hf, ids, steered_cfg, 0, eos, layer=6, direction=direction, positions="new")
    assert steered != generate(smollm2, prompt, steered_cfg)[0]


@pytest.mark.slow
def test_compare_generations_on_smollm2_is_coherent(smollm2):
    """The unsteered side of a comparison is the model's own text: its tokens are those of the
    full-forward reference, and the model finds them about as likely as its greedy text."""
    prompt = "My favourite thing to do on weekends is"
    cfg = GenerateConfig(max_new_tokens=16, samples=2, seed=0, temperature=0.7)
    direction = torch.zeros(576)
    pair = compare_generations(smollm2, prompt, [add_direction("blocks.6.hook_resid_post", direction, 1.0)], cfg)
    ids = smollm2.to_tokens(prompt)[0].tolist()
    assert pair.baseline_tokens == pair.steered_tokens == [reference_decode(smollm2, ids, cfg, i) for i in range(2)]
