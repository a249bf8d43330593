import pytest
import torch

from interp.activations import BufferState, ShuffleBuffer
from interp.data import iter_texts, iter_token_batches
from interp.hooks import capture, grad_key
from interp.models import stop_layer

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.ln2.hook_normalized", "blocks.0.attn.hook_z"]


def batches_of(model, n_seq=4, ctx=16):
    return lambda: iter_token_batches(model.tokenizer, iter_texts("builtin"), ctx, n_seq)


def test_several_hooks_in_one_pass_match_run_with_cache(tiny_model):
    batch = next(batches_of(tiny_model)())
    acts = capture(tiny_model, batch.tokens_bt, HOOKS, batch.mask_bt)
    _, cache = tiny_model.run_with_cache(batch.tokens_bt, names_filter=HOOKS)
    for hook in HOOKS:
        expected = cache[hook][batch.mask_bt].reshape(int(batch.mask_bt.sum()), -1)
        torch.testing.assert_close(acts[hook], expected)
    # BOS is excluded: 4 sequences x 15 positions.
    assert acts["blocks.0.attn.hook_z"].shape == (60, tiny_model.cfg.n_heads * tiny_model.cfg.d_head)


def test_forward_stops_after_the_deepest_hook(tiny_model):
    assert stop_layer(tiny_model, ["blocks.0.hook_resid_post"]) == 1
    ran = []
    tiny_model.hook_dict["blocks.1.hook_resid_post"].add_hook(lambda act, hook: ran.append(hook.name))
    try:
        batch = next(batches_of(tiny_model)())
        capture(tiny_model, batch.tokens_bt, ["blocks.0.hook_resid_post"], batch.mask_bt)
    finally:
        tiny_model.reset_hooks()
    assert ran == []


def test_gradients_of_the_next_token_loss(tiny_model):
    hook = "blocks.0.hook_resid_post"
    batch = next(batches_of(tiny_model)())
    acts = capture(tiny_model, batch.tokens_bt, [hook], batch.mask_bt, with_grads=True)
    # A central difference of the summed loss along a random direction must match <grad, delta>.
    delta = torch.zeros(4, 16, tiny_model.cfg.d_model)
    delta[batch.mask_bt] = 1e-3 * torch.randn(60, tiny_model.cfg.d_model)

    def loss_with(shift):
        def add(act, hook):
            return act + shift
        return tiny_model.run_with_hooks(batch.tokens_bt, fwd_hooks=[(tiny_model.hook_dict[hook].name, add)],
                                         return_type="loss", loss_per_token=True).sum()

    with torch.no_grad():
        change = (loss_with(delta) - loss_with(-delta)) / 2
    predicted = (acts[grad_key(hook)] * delta[batch.mask_bt]).sum()
    assert change.item() == pytest.approx(predicted.item(), rel=0.02)


class Counting:
    """A chunk source of numbered rows, to see exactly what the buffer yields."""

    def __init__(self, rows_per_chunk=10, n_chunks=7):
        self.rows, self.n = rows_per_chunk, n_chunks

    def chunks(self, start=0):
        index = start
        while True:
            c = index % self.n
            yield {"x": torch.arange(c * self.rows, (c + 1) * self.rows).float()[:, None]}
            index += 1


def test_shuffle_buffer_is_bounded_deterministic_and_resumable():
    buffer = ShuffleBuffer(Counting(), buffer_tokens=25, batch_tokens=8, seed=3)
    stream = buffer.batches()
    first = [next(stream)["x"] for _ in range(12)]
    assert all(len(b) == 8 for b in first)
    # One fill holds 30 rows (3 chunks): it yields 3 batches of distinct rows, then refills.
    fill = torch.cat(first[:3]).flatten()
    assert len(fill.unique()) == 24 and fill.max() < 30
    assert not torch.equal(fill, torch.sort(fill).values), "rows should be shuffled"
    again = ShuffleBuffer(Counting(), 25, 8, seed=3).batches()
    assert all(torch.equal(a, next(again)["x"]) for a in first)
    # Resume from the state after batch 7 and get batches 8.. exactly.
    replay = ShuffleBuffer(Counting(), 25, 8, seed=3)
    stream = replay.batches()
    for _ in range(7):
        next(stream)
    state = BufferState(**vars(replay.state))
    resumed = ShuffleBuffer(Counting(), 25, 8, seed=3).batches(state)
    for expected in first[7:]:
        assert torch.equal(next(resumed)["x"], expected)


def test_buffer_must_hold_a_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        ShuffleBuffer(Counting(), buffer_tokens=4, batch_tokens=8, seed=0)


@pytest.mark.parametrize("hook, message", [("blocks.0.hook_mlp_in", "set_use_hook_mlp_in"),
                                           ("blocks.0.attn.hook_result", "set_use_attn_result")])
def test_gated_off_hook_is_a_clear_error(tiny_model, hook, message):
    # TransformerLens 4 gates these hooks off; asking for one must say how to turn it on.
    batch = next(batches_of(tiny_model)())
    with pytest.raises(ValueError, match=message):
        capture(tiny_model, batch.tokens_bt, [hook], batch.mask_bt)
