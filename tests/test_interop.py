"""Interop without the peers installed: dictionary_learning folders against the formulas of its
dictionary classes (written out here from its source), sparsify's module paths against the
modules of the plain Hugging Face model, round trips through every format, the errors for what
a format cannot hold, and the CLI. tests/test_interop_peers.py checks SAE Lens and sparsify with
their own code."""

import json

import pytest
import torch
from interp.cli.main import app
from interp.kernels.reference import densify
from safetensors.torch import load_file, save_file
from test_hooks import fitted
from typer.testing import CliRunner

from interp.errors import BadInput
from interp.interop import convert, export
from interp.interop.dictionary_learning import (
    hook_of_submodule,
    read_dictionary_learning,
)
from interp.interop.sparsify import hookpoint_of, hooks_of
from interp.interop.view import peer_view
from interp.models import TINY_MODEL, load_hf
from interp.sae import load_sae

D, N = 64, 96
torch.manual_seed(0)


def dense(coder, x):
    code = coder.encode(x)
    return densify(code.indices_bk, code.values_bk.detach(), coder.cfg.n_latents)


def topk_dense(pre, k):
    top = pre.relu().topk(k, dim=1)
    return torch.zeros_like(pre).scatter_(1, top.indices, top.values)


# --- dictionary_learning: each class's encode/decode, as its source computes them -----------

def r(*shape):
    return torch.randn(*shape) / D**0.5


def dl_state(dict_class):
    """A random state dict of `dict_class` and the (features, reconstruction) its encode/decode compute."""
    if dict_class == "AutoEncoder":
        s = {"encoder.weight": r(N, D), "encoder.bias": r(N), "decoder.weight": r(D, N), "bias": r(D)}
        # load_dictionary's from_pretrained makes the decoder's columns unit norm, scaling the encoder
        norms = s["decoder.weight"].norm(dim=0)
        f = lambda x: torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"]) * norms
        dec = lambda f: (f / norms) @ s["decoder.weight"].T + s["bias"]
    elif dict_class == "AutoEncoderNew":
        s = {"encoder.weight": r(N, D), "encoder.bias": r(N), "decoder.weight": r(D, N), "decoder.bias": r(D)}
        f = lambda x: torch.relu(x @ s["encoder.weight"].T + s["encoder.bias"])
        dec = lambda f: f @ s["decoder.weight"].T + s["decoder.bias"]
    elif dict_class == "GatedAutoEncoder":
        s = {"encoder.weight": r(N, D), "decoder.weight": r(D, N), "decoder_bias": r(D), "r_mag": r(N),
             "gate_bias": r(N), "mag_bias": r(N)}

        def f(x):
            x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
            return (x_enc + s["gate_bias"] > 0) * torch.relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
        dec = lambda f: f @ s["decoder.weight"].T + s["decoder_bias"]
    elif dict_class == "JumpReluAutoEncoder":
        s = {"W_enc": r(D, N), "b_enc": r(N), "W_dec": r(N, D), "b_dec": r(D), "threshold": torch.rand(N) * 0.5}

        def f(x):
            pre = x @ s["W_enc"] + s["b_enc"]
            return torch.relu(pre * (pre > s["threshold"]))
        dec = lambda f: f @ s["W_dec"] + s["b_dec"]
    elif dict_class == "AutoEncoderTopK":
        s = {"encoder.weight": r(N, D), "encoder.bias": r(N), "decoder.weight": r(D, N), "b_dec": r(D),
             "k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(-1.0)}
        f = lambda x: topk_dense((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"], 6)
        dec = lambda f: f @ s["decoder.weight"].T + s["b_dec"]
    else:
        linear = dict_class == "BatchTopKSAE"
        s = {"b_dec": r(D), "k": torch.tensor(6, dtype=torch.int), "threshold": torch.tensor(0.4)}
        s |= ({"encoder.weight": r(N, D), "encoder.bias": r(N), "decoder.weight": r(D, N)} if linear
              else {"W_enc": r(D, N), "b_enc": r(N), "W_dec": r(N, D), "group_sizes": torch.tensor([32, 64])})
        W_enc = s["encoder.weight"].T if linear else s["W_enc"]
        b_enc = s["encoder.bias"] if linear else s["b_enc"]
        W_dec = s["decoder.weight"].T if linear else s["W_dec"]

        def f(x):
            post = torch.relu((x - s["b_dec"]) @ W_enc + b_enc)
            return post * (post > s["threshold"])
        dec = lambda f: f @ W_dec + s["b_dec"]
    return s, f, dec


DL_CLASSES = ["AutoEncoder", "AutoEncoderNew", "GatedAutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK",
              "BatchTopKSAE", "MatryoshkaBatchTopKSAE"]


@pytest.mark.parametrize("dict_class", DL_CLASSES)
def test_dictionary_learning_folders_compute_what_their_classes_compute(dict_class, tmp_path):
    state, encode, decode = dl_state(dict_class)
    folder = tmp_path / "resid_out_layer1"
    folder.mkdir()
    torch.save(state, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": dict_class, "lm_name": TINY_MODEL}}))
    coder = read_dictionary_learning(folder)
    assert coder.cfg.hook == "blocks.1.hook_resid_post" and coder.cfg.model == TINY_MODEL
    x = torch.randn(200, D)
    with torch.no_grad():
        acts = encode(x)
        assert torch.equal(dense(coder, x) != 0, acts != 0)
        torch.testing.assert_close(dense(coder, x), acts, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(coder.reconstruct(x), decode(acts), rtol=1e-5, atol=1e-5)


def test_dictionary_learning_class_is_guessed_without_config(tmp_path):
    state, encode, _ = dl_state("GatedAutoEncoder")
    torch.save(state, tmp_path / "ae.pt")
    coder = read_dictionary_learning(tmp_path, hook="blocks.0.hook_mlp_out")
    x = torch.randn(50, D)
    torch.testing.assert_close(dense(coder, x), encode(x), rtol=1e-5, atol=1e-5)


class Executes:
    """An object whose unpickling would run code: the weights-only loader must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_dictionary_learning_reads_with_the_weights_only_loader(tmp_path, capsys):
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": Executes()}, tmp_path / "ae.pt")
    with pytest.raises(BadInput, match="weights-only"):
        read_dictionary_learning(tmp_path, hook="blocks.0.hook_resid_post")
    assert "unpickled!" not in capsys.readouterr().out


def test_load_sae_never_opens_a_pickle(tmp_path, monkeypatch):
    state, _, _ = dl_state("AutoEncoder")
    torch.save(state, tmp_path / "ae.pt")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("load_sae called torch.load"))
    with pytest.raises(Exception, match="cfg.json|no coder"):
        load_sae(tmp_path)


def test_dictionary_learning_errors(tmp_path):
    state, _, _ = dl_state("AutoEncoder")
    torch.save({"step": 3, "ae": state, "optimizer": {}, "norm_factor": 2.0}, tmp_path / "ae.pt")
    with pytest.raises(BadInput, match="training backup"):
        read_dictionary_learning(tmp_path, hook="blocks.0.hook_resid_post")
    torch.save(state, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "submodule_name": "layer3"}}))
    with pytest.raises(BadInput, match="--hook"):
        read_dictionary_learning(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    with pytest.raises(BadInput, match="AutoEncoderTopK holds"):
        read_dictionary_learning(tmp_path, hook="blocks.0.hook_resid_post")


@pytest.mark.parametrize("name, hook", [("resid_out_layer3", "blocks.3.hook_resid_post"), ("mlp_out_layer1", "blocks.1.hook_mlp_out"),
                                        ("attn_2", "blocks.2.hook_attn_out"), ("resid_post_layer_12", "blocks.12.hook_resid_post"),
                                        ("embed", "hook_embed"), ("layer3", None)])
def test_dictionary_learning_submodule_names(name, hook):
    assert hook_of_submodule(name) == hook


# --- sparsify's module paths are the hooks they name ---------------------------------------

def test_sparsify_hookpoints_read_and_write_the_modules_they_name(tiny_model):
    """A hookpoint's module input and output in the plain HF model equal the TransformerLens hooks
    interp maps them to (the MLP's input is after the norm's gain)."""
    hf_model = load_hf(TINY_MODEL)[0]
    tokens = tiny_model.to_tokens(["Module paths must meet the hooks they name."])
    seen = {}

    def keep(name):
        def hook(module, args, output):
            seen[name] = (args[0] if args else None, output[0] if isinstance(output, tuple) else output)
        return hook

    cases = [("layers.1", False), ("layers.1.mlp", True), ("layers.0.self_attn", False), ("layers.0.mlp", False), ("embed_tokens", False)]
    handles = [hf_model.get_submodule("model." + point).register_forward_hook(keep(point)) for point, _ in cases]
    with torch.no_grad():
        hf_model(tokens)
        _, cache = tiny_model.run_with_cache(tokens)
    for handle in handles:
        handle.remove()
    for point, transcode in cases:
        read, write = hooks_of(point, transcode)
        module_in, module_out = seen[point]
        if transcode:
            torch.testing.assert_close(cache[read], module_in, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache[write], module_out, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(cache[read], module_out, rtol=1e-5, atol=1e-5)
        assert hookpoint_of(read, write) == point


def test_sparsify_has_no_hookpoint_for_other_hooks():
    with pytest.raises(BadInput, match="no hookpoint"):
        hookpoint_of("blocks.0.hook_resid_mid", "blocks.0.hook_resid_post")
    with pytest.raises(BadInput, match="no TransformerLens name"):
        hooks_of("transformer.h.0", False)


# --- round trips and what each format cannot hold ------------------------------------------

ROUND_TRIPS = [
    ("saelens", fitted("topk")), ("saelens", fitted("batchtopk")), ("saelens", fitted("feature_choice")),
    ("saelens", fitted("mutual_choice", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", skip=True)),
    ("sparsify", fitted("topk")), ("sparsify", fitted("gradient", "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out", skip=True)),
    ("interp", fitted("jumprelu")),
]


@pytest.mark.parametrize("fmt, coder", ROUND_TRIPS, ids=[f"{f}-{c.arch}" for f, c in ROUND_TRIPS])
def test_round_trip_through_every_format(fmt, coder, tmp_path):
    """Out to `fmt`, on to the other formats and back to interp: the same features (in the
    exported units) and the same reconstruction."""
    x = torch.randn(200, coder.cfg.d_in) * 2
    scale = peer_view(coder).feature_scale if fmt != "interp" else torch.ones(coder.cfg.n_latents)
    first = export(coder, fmt, tmp_path / "a")
    again = load_sae(first)
    if fmt == "saelens" and again.arch == "topk":
        again = load_sae(convert(first, "sparsify", tmp_path / "b"))
    elif fmt == "sparsify":
        again = load_sae(convert(first, "saelens", tmp_path / "b")) if coder.cfg.target_hook is None else again
    again = load_sae(convert(again.save(tmp_path / "c"), "interp", tmp_path / "d"))
    assert (again.cfg.hook, again.cfg.target_hook, again.cfg.skip) == (coder.cfg.hook, coder.cfg.target_hook, coder.cfg.skip)
    with torch.no_grad():
        ours = dense(coder, x) * scale
        assert torch.equal(dense(again, x) != 0, ours != 0)
        torch.testing.assert_close(dense(again, x), ours, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.reconstruct(x), coder.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_saelens_export_is_unit_rows_and_carries_interp_facts(tmp_path):
    coder = fitted("batchtopk")
    coder.set_max_input_norm(12.5)
    folder = export(coder, "saelens", tmp_path)
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(folder / "sae_weights.safetensors")
    torch.testing.assert_close(weights["W_dec"].norm(dim=1), torch.ones(N))
    assert cfg["architecture"] == "jumprelu" and weights["threshold"].shape == (N,)
    assert cfg["metadata"]["hook_name"] == coder.cfg.hook
    assert cfg["metadata"]["interp"]["arch"] == "batchtopk" and cfg["metadata"]["interp"]["max_input_norm"] == 12.5
    assert load_sae(folder).max_input_norm == 12.5


def test_what_a_format_cannot_hold_is_a_clear_error(tmp_path):
    with pytest.raises(BadInput, match="no TopK transcoder"):
        export(fitted("topk", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"), "saelens", tmp_path / "a")
    with pytest.raises(BadInput, match="only TopK"):
        export(fitted("batchtopk"), "sparsify", tmp_path / "b")
    with pytest.raises(BadInput, match="no hookpoint"):
        export(fitted("topk", "blocks.0.hook_resid_pre"), "sparsify", tmp_path / "c")
    with pytest.raises(BadInput, match="unknown format"):
        export(fitted("topk"), "neuronpedia", tmp_path / "d")
    for fmt in ("saelens", "sparsify"):
        with pytest.raises(BadInput, match="codes' norms"):
            export(fitted("codebook"), fmt, tmp_path / fmt)


def saelens_folder(tmp_path, **changes):
    folder = export(fitted("jumprelu"), "saelens", tmp_path / "src")
    cfg = json.loads((folder / "cfg.json").read_text())
    weights = load_file(folder / "sae_weights.safetensors")
    for key, value in changes.items():
        if key in weights or isinstance(value, torch.Tensor):
            weights[key] = value
        else:
            cfg[key] = value
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
    ({"architecture": "abstopk"}, "architecture 'abstopk'"),
    ({"extra": torch.zeros(3)}, "holds"),
    ({"scaling_factor": torch.tensor(2.0)}, "scaling_factor"),
])
def test_unrepresentable_saelens_fields_are_named(tmp_path, changes, message):
    with pytest.raises(BadInput, match=message):
        load_sae(saelens_folder(tmp_path, **changes))


def test_saelens_hook_names_from_any_place_they_are_kept(tmp_path):
    """metadata.hook_name, the top-level hook_name of folders older than SAE Lens 6, or the
    Hugging Face module paths hf_hook_name(_out)."""
    sae = export(fitted("jumprelu"), "saelens", tmp_path / "sae")
    transcoder = export(fitted("jumprelu", "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out"), "saelens", tmp_path / "tc")

    def with_metadata(folder, top=None, **metadata):
        cfg = json.loads((folder / "cfg.json").read_text())
        cfg = {k: v for k, v in cfg.items() if k != "hook_name"} | (top or {})
        cfg["metadata"] = {"sae_lens_version": "6.54.12", **metadata}
        (folder / "cfg.json").write_text(json.dumps(cfg))
        return load_sae(folder)

    assert with_metadata(sae, hf_hook_name="model.layers.1.mlp").cfg.hook == "blocks.1.hook_mlp_out"
    assert with_metadata(sae, top={"hook_name": "blocks.1.hook_resid_pre"}).cfg.hook == "blocks.1.hook_resid_pre"
    loaded = with_metadata(transcoder, hf_hook_name="model.layers.0.mlp", hf_hook_name_out="model.layers.0.mlp")
    assert (loaded.cfg.hook, loaded.cfg.target_hook) == ("blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out")
    with pytest.raises(BadInput, match="hook_name_out"):
        with_metadata(transcoder, hook_name="blocks.0.ln2.hook_out")
    with pytest.raises(BadInput, match="hf_hook_name"):
        with_metadata(sae)


def test_sparsify_run_folder_needs_a_hookpoint(tmp_path):
    export(fitted("topk"), "sparsify", tmp_path)
    with pytest.raises(BadInput, match=r"name one of its hookpoints \(layers.0\)"):
        load_sae(tmp_path)
    assert load_sae(tmp_path, hookpoint="layers.0").cfg.hook == "blocks.0.hook_resid_post"
    (tmp_path / "layers.0" / "cfg.json").write_text(json.dumps({"activation": "groupmax", "k": 6}))
    with pytest.raises(BadInput, match="groupmax"):
        load_sae(tmp_path, hookpoint="layers.0")


# --- the CLI -------------------------------------------------------------------------------

def test_cli_export_convert_and_import(tmp_path):
    runner = CliRunner()
    run = fitted("topk").save(tmp_path / "run")
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "sparsify"), "--to", "sparsify"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["convert", str(tmp_path / "sparsify"), str(tmp_path / "saelens"), "--to", "saelens",
                                 "--hookpoint", "layers.0"])
    assert result.exit_code == 0, result.output
    assert load_sae(tmp_path / "saelens").cfg.hook == "blocks.0.hook_resid_post"
    result = runner.invoke(app, ["export", str(tmp_path / "saelens"), str(tmp_path / "x"), "--to", "sparsify"])
    assert result.exit_code == 2 and "not an interp folder" in result.output
    result = runner.invoke(app, ["export", str(run), str(tmp_path / "x"), "--to", "hub"])
    assert result.exit_code == 2 and "unknown format 'hub'" in result.output

    state, _, _ = dl_state("AutoEncoderTopK")
    (tmp_path / "dl").mkdir()
    torch.save(state, tmp_path / "dl" / "ae.pt")
    result = runner.invoke(app, ["import-dictionary-learning", str(tmp_path / "dl"), str(tmp_path / "imported")])
    assert result.exit_code == 2 and "--hook" in result.output
    result = runner.invoke(app, ["import-dictionary-learning", str(tmp_path / "dl"), str(tmp_path / "imported"),
                                 "--hook", "blocks.1.hook_mlp_out", "--to", "saelens"])
    assert result.exit_code == 0, result.output
    assert load_sae(tmp_path / "imported").cfg.hook == "blocks.1.hook_mlp_out"
