"""The hook-and-splice layer: several coders in the model at once, checked against the model's own
computation (error kept: nothing changes), against activations edited by hand (error dropped: the
reconstruction replaces the activation), and for gradients against plain autograd through the
decoder; and each coder's model-unit matrices against its own outputs."""

import pytest
import torch

from interp.hooks import capture, coder_hooks, grad_key, output_hook, splice
from interp.sae import REGISTRY, SelectContext, create_coder

D = 64
TEXT = ["The splice must leave the model exactly as it was.", "A second row, of another length!!"]


def fitted(arch="topk", hook="blocks.0.hook_resid_post", target=None, d_in=D, d_out=None, skip=False, seed=0, data=None):
    """A coder with normalisation and decoder bias fitted to `data` ({hook: (tokens, width)}, the
    model's own activations, or random ones for a coder never spliced), trained for one step so
    batch-level coders have thresholds, in eval mode."""
    torch.manual_seed(seed)
    sized = {"k": 6} if arch != "jumprelu" else {}
    coder = create_coder(arch, d_in=d_in, n_latents=96, hook=hook, target_hook=target, d_out=d_out, skip=skip, **sized)
    x = data[hook] if data else torch.randn(256, d_in)
    y = (data[target] if data else torch.randn(256, d_out or d_in)) if target else None
    with torch.no_grad():
        coder.fit_normalization(x, y)
        coder.init_from_data(x if y is None else y)
        if skip:
            coder.W_skip.normal_(0, 0.1)
        if arch == "jumprelu":
            coder.threshold.uniform_(0.0, 1.0)
        ctx = SelectContext(grad=torch.randn(len(x), d_out or d_in)) if coder.needs_grad else SelectContext()
        coder(x, y, ctx)
    return coder.eval()


def several(model):
    """Coders at different layers and hooks at once: an SAE, a skip transcoder, an attention-output
    SAE and a BatchTopK SAE, fitted to the model's activations."""
    hooks = ["blocks.0.hook_resid_post", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.1.hook_resid_post"]
    data = capture(model, model.to_tokens(TEXT * 8), hooks)
    return [
        fitted(hook="blocks.0.hook_resid_post", seed=1, data=data),
        fitted(hook="blocks.1.ln2.hook_normalized", target="blocks.1.hook_mlp_out", skip=True, seed=2, data=data),
        fitted(hook="blocks.1.attn.hook_z", seed=3, data=data),
        fitted("batchtopk", hook="blocks.1.hook_resid_post", seed=4, data=data),
    ]


def tokens_of(model):
    return model.to_tokens(TEXT)


def test_splicing_with_the_error_kept_reproduces_the_clean_model(tiny_model):
    tokens = tokens_of(tiny_model)
    with torch.no_grad():
        clean = tiny_model(tokens)
        with splice(tiny_model, several(tiny_model), keep_error=True) as spliced:
            logits = tiny_model(tokens)
        with splice(tiny_model, several(tiny_model)):
            replaced = tiny_model(tokens)
    torch.testing.assert_close(logits, clean, atol=1e-5, rtol=1e-5)
    assert all(s.code is not None and s.error_td is not None for s in spliced)
    assert (replaced - clean).abs().max() > 1e-2, "without the error the reconstruction must change the model"


def test_replacing_equals_editing_the_activations_by_hand(tiny_model):
    """Each coder reads what the model computes with the upstream coders already in, and its
    reconstruction replaces what it writes at the allowed positions only."""
    coders = several(tiny_model)
    tokens = tokens_of(tiny_model)
    where = torch.ones_like(tokens, dtype=torch.bool)
    where[:, 0] = False
    where[1, 3:6] = False

    def by_hand():
        hooks = []
        for coder in coders:
            seen = {}
            read, write = (tiny_model.hook_dict[h].name for h in (coder.cfg.hook, output_hook(coder)))

            def grab(act, hook, seen=seen):
                seen["x"] = act.reshape(*act.shape[:2], -1)
                return act

            def put(act, hook, coder=coder, seen=seen, same=read == write):
                flat = act.reshape(*act.shape[:2], -1).clone()
                x = flat if same else seen["x"]
                flat[where] = coder.reconstruct(x[where]).to(flat.dtype)
                return flat.reshape(act.shape)

            hooks.append((write, put))
            if read != write:
                hooks.append((read, grab))
        # Reads after writes at the same point, so a coder reads its upstream neighbour's output.
        ordered = [h for h in hooks if h[1].__name__ == "put"] + [h for h in hooks if h[1].__name__ == "grab"]
        return tiny_model.run_with_hooks(tokens, fwd_hooks=ordered)

    with torch.no_grad():
        expected = by_hand()
        with splice(tiny_model, coders, where=where) as spliced:
            got = tiny_model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(int(s.mask_bt.sum()) == int(where.sum()) for s in spliced)


def test_gradients_reach_features_and_errors(tiny_model):
    coders = several(tiny_model)
    tokens = tokens_of(tiny_model)
    with splice(tiny_model, coders, keep_error=True, expose=True) as spliced:
        loss = tiny_model(tokens, return_type="loss")
    loss.backward()
    for s in spliced:
        assert s.code.values_bk.grad is not None and s.error_td.grad is not None
        assert s.error_td.grad.abs().max() > 0 and s.code.values_bk.grad.abs().max() > 0
    # The deepest coder writes blocks.1.hook_resid_post: the loss sees its output directly, so its
    # error's gradient is the clean model's gradient there, and each feature's is that gradient
    # read along the feature's decoder direction (model units).
    deepest = spliced[-1]
    captured = capture(tiny_model, tokens, ["blocks.1.hook_resid_post"], with_grads=True)
    n_predicted = tokens[:, 1:].numel()
    grad_td = captured["blocks.1.hook_resid_post:grad"][deepest.mask_bt.flatten()] / n_predicted
    torch.testing.assert_close(deepest.error_td.grad, grad_td, atol=1e-6, rtol=1e-4)
    rows = deepest.coder.model_units().W_dec[deepest.code.indices_bk.clamp(min=0)]
    expected = torch.einsum("tkd,td->tk", rows, grad_td) * (deepest.code.indices_bk >= 0)
    torch.testing.assert_close(deepest.code.values_bk.grad, expected, atol=1e-6, rtol=1e-4)
    # Upstream coders get gradient through the downstream coders' features.
    first = spliced[0]
    assert first.code.values_bk.grad.abs().sum() > 0


def test_gradients_at_several_hooks_are_each_the_total_derivative(tiny_model):
    """A later hooked activation must not cut the graph: every gradient equals the one captured
    at that hook alone, for the loss and for an objective on the logits."""
    tokens = tiny_model.to_tokens(TEXT[:1])
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    objective = lambda logits: logits[:, -1, 5] - logits[:, -1, 7]  # noqa: E731
    for goal in (None, objective):
        together = capture(tiny_model, tokens, hooks, with_grads=True, objective=goal)
        for hook in hooks:
            alone = capture(tiny_model, tokens, [hook], with_grads=True, objective=goal)
            assert alone[grad_key(hook)].abs().max() > 0
            torch.testing.assert_close(together[grad_key(hook)], alone[grad_key(hook)], atol=1e-7, rtol=1e-5)


def test_bad_splices_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="write the same hook"):
        with splice(tiny_model, [fitted(seed=1), fitted(seed=2)]):
            pass
    wide = fitted(d_in=32)
    with pytest.raises(ValueError, match="reads width 32"):
        with torch.no_grad(), splice(tiny_model, [wide]):
            tiny_model(tokens_of(tiny_model))


@pytest.mark.parametrize(
    "arch,kind",
    [(arch, kind) for arch in sorted(REGISTRY) for kind in ("sae", "transcoder", "skip")
     if kind == "sae" or not REGISTRY[arch].discrete],
)
def test_model_units_reproduce_the_coder(arch, kind):
    target = None if kind == "sae" else "t"
    coder = fitted(arch, hook="h", target=target, d_out=48 if target else None, skip=kind == "skip")
    with torch.no_grad():
        if coder.discrete:  # codes of different norms, no bias
            coder.code_norm.uniform_(0.5, 2.0)
        else:
            coder.b_enc.normal_(0, 0.1)
    x = torch.randn(40, D) * 3
    units = coder.model_units()
    with torch.no_grad():
        pre = x @ units.W_enc.T + units.b_enc
        torch.testing.assert_close(pre, coder.preacts(coder.encoder_input(coder.normalized_input(x))), atol=1e-4, rtol=1e-4)
        code = coder.encode(x)
        # A code's value is its norm, a threshold family's ReLU(z); either way decoding below is the check.
        values = coder.code_norm[code.indices_bk] if coder.discrete else torch.relu(pre).gather(1, code.indices_bk.clamp(min=0))
        torch.testing.assert_close(values * (code.indices_bk >= 0), code.values_bk, atol=1e-4, rtol=1e-4)
        dense = torch.zeros(40, coder.cfg.n_latents).scatter_add_(1, code.indices_bk.clamp(min=0), code.values_bk)
        x_hat = dense @ units.W_dec + units.b_dec
        if units.W_skip is not None:
            x_hat = x_hat + x @ units.W_skip.T
        torch.testing.assert_close(x_hat, coder.reconstruct(x), atol=1e-4, rtol=1e-4)
    assert coder_hooks(coder) == (["h"] if target is None else ["h", "t"])


def test_splice_leaves_bos_alone_by_default(tiny_model):
    coders = several(tiny_model)[:1]
    tokens = tokens_of(tiny_model)
    seen = {}

    def record(act, hook):
        seen["act"] = act.detach().clone()
        return act

    name = tiny_model.hook_dict["blocks.0.hook_resid_post"].name
    with torch.no_grad():
        tiny_model.run_with_hooks(tokens, fwd_hooks=[(name, record)])
        clean = seen["act"]
        with splice(tiny_model, coders) as (spliced,):
            tiny_model.run_with_hooks(tokens, fwd_hooks=[(name, record)])
    assert torch.equal(seen["act"][:, 0], clean[:, 0]) and not torch.equal(seen["act"][:, 1:], clean[:, 1:])
    assert not spliced.mask_bt[:, 0].any() and spliced.mask_bt[:, 1:].all()
