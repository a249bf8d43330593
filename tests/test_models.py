import time

import pytest
import torch

from interp.models import check_hooks, hook_shapes, load_model, stop_layer


def test_tiny_model_hook_shapes(tiny_model):
    shapes = hook_shapes(tiny_model)
    d = tiny_model.cfg.d_model
    assert shapes["blocks.1.hook_resid_post"] == (d,)
    assert shapes["blocks.0.ln2.hook_normalized"] == (d,)
    assert shapes["blocks.1.attn.hook_z"] == (tiny_model.cfg.n_heads, tiny_model.cfg.d_head)
    # Gated-off hooks never fire, so they are not offered.
    assert "blocks.0.hook_mlp_in" not in shapes


def test_unknown_hook_lists_close_ones(tiny_model):
    with pytest.raises(ValueError, match="did you mean blocks.1.hook_resid_post"):
        check_hooks(tiny_model, ["blocks.1.hook_resid_pst"])
    check_hooks(tiny_model, ["blocks.1.hook_resid_post"])


def test_stop_layer_is_past_the_deepest_hook(smollm2, tiny_model):
    assert stop_layer(smollm2, ["blocks.3.hook_resid_post", "blocks.6.hook_mlp_out"]) == 7
    assert stop_layer(tiny_model, ["blocks.1.hook_resid_post"]) is None  # the last block: whole model
    assert stop_layer(smollm2, ["ln_final.hook_normalized"]) is None


def test_tiny_model_is_deterministic():
    a, b = load_model("tiny-llama"), load_model("tiny-llama")
    tokens = a.to_tokens("same weights")
    assert torch.equal(a(tokens), b(tokens))


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(RuntimeError, match="Offline, use 'smollm2-135m'"):
        load_model("no-such-org/no-such-model")


def test_local_config_folder(tmp_path, tiny_model):
    tiny_model.original_model.config.to_json_file(tmp_path / "config.json")
    model = load_model(str(tmp_path))
    assert model.cfg.d_model == tiny_model.cfg.d_model


def test_embedded_model_loads_from_cache(smollm2):
    start = time.perf_counter()
    again = load_model("smollm2-135m")
    assert time.perf_counter() - start < 15, "the dequantized weights should be cached"
    assert again.cfg.n_layers == 30 and again.cfg.d_model == 576 and again.cfg.d_vocab == 49152
