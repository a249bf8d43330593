"""Interop proved by the peers themselves: SAE Lens and sparsify, each in its own virtual
environment (bench/peers/environment.py builds them; SAE Lens pins transformer-lens < 4), run
tests/peers/<peer>_proof.py, which
(a) loads the folders interp exported with the peer's own loader and computes its encode/decode,
(b) writes folders with the peer's own save functions (random weights), with their outputs,
(c) re-saves our exports with the peer's own save.
Here: (a) the peer's active latents equal interp's on every row and its values (interp's times
the export's feature scale) and reconstructions are within 1e-5 relative, in float32; (b) interp
loads the peer's folders and computes the same; (c) the peer's re-save holds tensors
byte-identical to ours.

CI builds the environments before the tests and sets INTERP_PEER_PROOFS=required, so a missing
one fails there; elsewhere these tests skip, saying how to build them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hooks import fitted
from test_interop import dense

from interp.atomic import write_json, write_tensors
from interp.interop import export, sparsify
from interp.interop.view import peer_view
from interp.sae import load_sae

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "peers"))
from environment import PEERS, READY, peer_python

D, ROWS, HEADS = 64, 128, 4
RTOL = 1e-5


def interpreter(name: str) -> Path:
    venv = ROOT / "bench" / ".peers" / name
    if (venv / READY).is_file():
        return venv / "bin" / "python"
    if os.environ.get("INTERP_PEER_PROOFS") == "required":
        return peer_python(name)
    pytest.skip(f"{PEERS[name]}'s own environment is not built; `python bench/peers/environment.py {name}` builds it "
                "(CI builds it before the tests)")


def nonunit(coder):
    """The coder with decoder rows of differing norms (a TopK coder keeps them on export)."""
    with torch.no_grad():
        coder.W_dec.mul_(torch.rand(coder.cfg.n_latents, 1) + 0.5)
    return coder


# name -> (interp coder, input width layout): every mapped architecture, as each format allows.
def saelens_exports():
    return {
        "topk-sae": fitted("topk"),
        "topk-nonunit-rows": nonunit(fitted("topk", seed=1)),
        "batchtopk-sae": fitted("batchtopk"),
        "mutual-choice-sae": fitted("mutual_choice"),
        "feature-choice-sae": fitted("feature_choice"),
        "jumprelu-sae": fitted("jumprelu"),
        "feature-choice-transcoder": fitted("feature_choice", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"),
        "batchtopk-skip-transcoder": fitted("batchtopk", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", skip=True),
        "batchtopk-attn-z-sae": fitted("batchtopk", "blocks.1.attn.hook_z"),
        "topk-attn-out-sae": fitted("topk", "blocks.1.hook_attn_out"),
    }


def sparsify_exports():
    return {
        "topk-sae": fitted("topk"),
        "topk-nonunit-rows": nonunit(fitted("topk", seed=1)),
        "gradient-sae": fitted("gradient"),
        "topk-transcoder": fitted("topk", "blocks.0.ln2.hook_out", "blocks.0.hook_mlp_out"),
        "topk-skip-transcoder-before-gain": fitted("topk", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", skip=True),
        "topk-attn-out-sae": fitted("topk", "blocks.1.hook_attn_out"),
    }


SAELENS_NATIVES = {
    "standard": {"arch": "standard", "hook_name": "blocks.0.hook_resid_post"},
    "standard-no-b-dec-input": {"arch": "standard", "hook_name": "blocks.0.hook_resid_post", "apply_b_dec_to_input": False},
    "jumprelu": {"arch": "jumprelu", "hook_name": "blocks.0.hook_resid_post"},
    "gated": {"arch": "gated", "hook_name": "blocks.0.hook_resid_post"},
    "topk": {"arch": "topk", "hook_name": "blocks.0.hook_resid_post", "k": 6},
    "topk-rescaled": {"arch": "topk", "hook_name": "blocks.0.hook_resid_post", "k": 6, "rescale_acts_by_decoder_norm": True},
    "topk-training-inference-save": {"arch": "topk_training", "hook_name": "blocks.0.hook_resid_post", "k": 6,
                                     "rescale_acts_by_decoder_norm": True},
    "batchtopk-training-inference-save": {"arch": "batchtopk_training", "hook_name": "blocks.0.hook_resid_post", "k": 6},
    "transcoder": {"arch": "transcoder", "hook_name": "blocks.0.ln2.hook_normalized", "hook_name_out": "blocks.0.hook_mlp_out", "d_out": D, "apply_b_dec_to_input": False},
    "skip-transcoder": {"arch": "skip_transcoder", "hook_name": "blocks.0.ln2.hook_normalized",
                        "hook_name_out": "blocks.0.hook_mlp_out", "d_out": D, "apply_b_dec_to_input": False},
    "jumprelu-skip-transcoder": {"arch": "jumprelu_skip_transcoder", "hook_name": "blocks.0.ln2.hook_normalized",
                                 "hook_name_out": "blocks.0.hook_mlp_out", "d_out": D, "apply_b_dec_to_input": False},
    "standard-attn-z": {"arch": "standard", "hook_name": "blocks.1.attn.hook_z", "reshape_activations": "hook_z"},
}
SPARSIFY_NATIVES = {
    "sae": {"hookpoint": "layers.0", "transcode": False, "skip_connection": False},
    "mlp-transcoder": {"hookpoint": "layers.0.mlp", "transcode": True, "skip_connection": False},
    "mlp-skip-transcoder": {"hookpoint": "layers.1.mlp", "transcode": True, "skip_connection": True},
    "attn-sae": {"hookpoint": "layers.1.self_attn", "transcode": False, "skip_connection": False},
}


def assert_close(ours, theirs, what):
    scale = theirs.abs().max().clamp_min(1e-12)
    rel = float((ours - theirs).abs().max() / scale)
    assert rel <= RTOL, f"{what}: max difference {rel:.2e} of the largest value (limit {RTOL:.0e})"
    return rel


def assert_same_outputs(ours_acts, ours_recon, theirs, what):
    assert torch.equal(ours_acts != 0, theirs["acts"] != 0), f"{what}: active latents differ on some row"
    assert_close(ours_acts, theirs["acts"], f"{what} feature activations")
    assert_close(ours_recon, theirs["forward"], f"{what} reconstruction")


def assert_same_tensors(ours: Path, theirs: Path):
    a, b = load_file(ours), load_file(theirs)
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].contiguous().view(torch.uint8).equal(b[key].contiguous().view(torch.uint8)), f"{key} differs"


def run_peer(name: str, work: Path, exports: dict, natives: dict) -> None:
    write_json(work / "manifest.json", {"exports": exports, "natives": natives})
    script = ROOT / "tests" / "peers" / f"{name}_proof.py"
    done = subprocess.run([str(interpreter(name)), str(script), str(work)], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{name}'s proof script failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def save_inputs(path: Path, x: torch.Tensor, peer_x: torch.Tensor | None = None) -> str:
    """x as interp takes it, and as the peer does where that differs."""
    save_file({"x": x} | ({} if peer_x is None else {"peer_x": peer_x.contiguous().clone()}), str(path))
    return str(path)


def inputs(coder, seed):
    torch.manual_seed(seed)
    return torch.randn(ROWS, coder.cfg.d_in) * 3


@pytest.fixture(scope="module")
def saelens_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("saelens")
    interpreter("saelens")
    coders, exports = saelens_exports(), {}
    for i, (case, coder) in enumerate(coders.items()):
        x = inputs(coder, i)
        folder = export(coder, "saelens", work / "ours" / case)
        peer_x = x.view(ROWS, HEADS, -1) if coder.cfg.hook.endswith("hook_z") else None
        exports[case] = {"folder": str(folder), "x": save_inputs(work / f"x-{case}.safetensors", x, peer_x)}
    natives = {}
    for i, (case, spec) in enumerate(SAELENS_NATIVES.items()):
        x = torch.randn(ROWS, D) * 3
        peer_x = x.view(ROWS, HEADS, -1) if spec.get("reshape_activations") == "hook_z" else None
        natives[case] = {**spec, "d_in": D, "d_sae": 96, "seed": i, "x": save_inputs(work / f"x-native-{case}.safetensors", x, peer_x)}
    run_peer("saelens", work, exports, natives)
    return work, coders


@pytest.fixture(scope="module")
def sparsify_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sparsify")
    interpreter("sparsify")
    coders, exports = sparsify_exports(), {}
    for i, (case, coder) in enumerate(coders.items()):
        x = inputs(coder, i)
        if coder.cfg.hook.endswith("ln2.hook_normalized"):
            # sparsify reads the MLP's input, after the norm's gain: a random gain, so that a
            # missing or inverted division shows (the tiny model's own gain is all ones).
            gain = torch.rand(D) + 0.5
            hookpoint, cfg, tensors = sparsify.to_sparsify(coder, gain)
            folder = work / "ours" / case / hookpoint
            write_tensors(folder / sparsify.WEIGHTS_FILE, tensors)
            write_json(folder / sparsify.CFG_FILE, cfg)
            peer_x = x * gain
        else:
            folder, peer_x = export(coder, "sparsify", work / "ours" / case), None
        exports[case] = {"folder": str(folder), "x": save_inputs(work / f"x-{case}.safetensors", x, peer_x)}
    natives = {}
    for i, (case, spec) in enumerate(SPARSIFY_NATIVES.items()):
        natives[case] = {**spec, "d_in": D, "num_latents": 96, "k": 6, "seed": i,
                         "x": save_inputs(work / f"x-native-{case}.safetensors", torch.randn(ROWS, D) * 3)}
    run_peer("sparsify", work, exports, natives)
    return work, coders


def check_export(work, peer, case, coder):
    x = load_file(str(work / f"x-{case}.safetensors"))["x"]
    theirs = load_file(str(work / peer / "results" / f"{case}.safetensors"))
    scale = peer_view(coder).feature_scale
    with torch.no_grad():
        assert_same_outputs(dense(coder, x) * scale, coder.reconstruct(x), theirs, f"{peer} reading our {case}")


@pytest.mark.parametrize("case", list(SAELENS_NATIVES))
def test_interp_reads_saelens_own_folders(saelens_run, case):
    work, _ = saelens_run
    x = load_file(str(work / f"x-native-{case}.safetensors"))["x"]
    coder = load_sae(work / "saelens" / "native" / case)
    assert coder.cfg.hook == SAELENS_NATIVES[case]["hook_name"]
    assert coder.cfg.target_hook == SAELENS_NATIVES[case].get("hook_name_out")
    theirs = load_file(str(work / "saelens" / "results" / f"native-{case}.safetensors"))
    with torch.no_grad():
        assert_same_outputs(dense(coder, x), coder.reconstruct(x), theirs, f"interp reading SAE Lens's {case}")


def test_saelens_reads_our_exports_and_resaves_them_identically(saelens_run):
    work, coders = saelens_run
    for case, coder in coders.items():
        check_export(work, "saelens", case, coder)
        assert_same_tensors(work / "ours" / case / "sae_weights.safetensors", work / "saelens" / "resaved" / case / "sae_weights.safetensors")
        cfg = json.loads((work / "ours" / case / "cfg.json").read_text())
        assert cfg["metadata"]["interp"]["arch"] == coder.arch


@pytest.mark.parametrize("case", list(SPARSIFY_NATIVES))
def test_interp_reads_sparsify_own_folders(sparsify_run, case):
    work, _ = sparsify_run
    x = load_file(str(work / f"x-native-{case}.safetensors"))["x"]
    spec = SPARSIFY_NATIVES[case]
    coder = load_sae(work / "sparsify" / "native" / case, hookpoint=spec["hookpoint"])
    assert (coder.cfg.hook, coder.cfg.target_hook) == sparsify.hooks_of(spec["hookpoint"], spec["transcode"])
    theirs = load_file(str(work / "sparsify" / "results" / f"native-{case}.safetensors"))
    with torch.no_grad():
        assert_same_outputs(dense(coder, x), coder.reconstruct(x), theirs, f"interp reading sparsify's {case}")
        assert_close(theirs["recon"], theirs["forward"], "sparsify's own decode against its forward")


def test_sparsify_reads_our_exports_and_resaves_them_identically(sparsify_run):
    work, coders = sparsify_run
    for case, coder in coders.items():
        check_export(work, "sparsify", case, coder)
        hookpoint = sparsify.hookpoint_of(coder.cfg.hook, coder.cfg.target_hook)
        assert_same_tensors(work / "ours" / case / hookpoint / "sae.safetensors", work / "sparsify" / "resaved" / case / "sae.safetensors")
