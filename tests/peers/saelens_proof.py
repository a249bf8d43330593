"""Runs inside SAE Lens's own environment (tests/test_interop_peers.py starts it): loads the
folders interp exported with SAE Lens's loader and writes what its encode/decode/forward compute,
re-saves them with its own save, and writes folders of its own (random weights; save_model, and
save_inference_model for its training SAEs) with their outputs, for interp to load.
Usage: python saelens_proof.py WORKDIR (WORKDIR/manifest.json says what to do; results go to
WORKDIR/saelens/)."""

import json
import sys
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE
from sae_lens.saes.sae import SAEMetadata
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
manifest = json.loads((work / "manifest.json").read_text())
out = work / "saelens"
(out / "results").mkdir(parents=True, exist_ok=True)

# architecture -> (class, its config class, whether the folder is written by save_inference_model)
CLASSES = {
    "standard": ("StandardSAE", False), "jumprelu": ("JumpReLUSAE", False), "gated": ("GatedSAE", False),
    "topk": ("TopKSAE", False), "transcoder": ("Transcoder", False), "skip_transcoder": ("SkipTranscoder", False),
    "jumprelu_transcoder": ("JumpReLUTranscoder", False), "jumprelu_skip_transcoder": ("JumpReLUSkipTranscoder", False),
    "topk_training": ("TopKTrainingSAE", True), "batchtopk_training": ("BatchTopKTrainingSAE", True),
}


def outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Feature activations (encode), their reconstruction (decode) and forward's output, with a
    hook_z SAE's heads flattened."""
    acts = sae.encode(x)
    flat = lambda t: t.reshape(len(t), -1)
    return {"acts": acts, "recon": flat(sae.decode(acts)), "forward": flat(sae(x))}


def native(spec: dict) -> SAE:
    name, _ = CLASSES[spec["arch"]]
    cls, cfg_cls = getattr(sae_lens, name), getattr(sae_lens, name + "Config")
    metadata = SAEMetadata(model_name="tiny", hook_name=spec["hook_name"])
    options = {key: spec[key] for key in ("k", "rescale_acts_by_decoder_norm", "apply_b_dec_to_input",
                                          "reshape_activations", "d_out") if key in spec}
    sae = cls(cfg_cls(d_in=spec["d_in"], d_sae=spec["d_sae"], metadata=metadata, **options))
    if "hook_name_out" in spec:
        sae.cfg.metadata.hook_name_out = spec["hook_name_out"]
    torch.manual_seed(spec["seed"])
    for param_name, param in sae.named_parameters():  # every tensor random, so none can be ignored unseen
        if param_name == "threshold":
            param.copy_(torch.rand_like(param))
        else:
            param.copy_(torch.randn_like(param) / spec["d_in"] ** 0.5)
    if spec["arch"] == "batchtopk_training":
        sae.topk_threshold.fill_(0.3)
    return sae


def peer_input(spec: dict) -> torch.Tensor:
    """The case's input as the peer takes it ("peer_x": say a hook_z SAE's heads apart, or the
    MLP's input after the norm's gain), else the input interp takes."""
    inputs = load_file(spec["x"])
    return inputs.get("peer_x", inputs["x"])


with torch.no_grad():
    for case, spec in manifest["exports"].items():
        sae = SAE.load_from_disk(spec["folder"])
        save_file(outputs(sae, peer_input(spec)), str(out / "results" / f"{case}.safetensors"))
        sae.save_model(out / "resaved" / case)

    for case, spec in manifest["natives"].items():
        sae = native(spec)
        folder = out / "native" / case
        sae.save_inference_model(folder) if CLASSES[spec["arch"]][1] else sae.save_model(folder)
        saved = SAE.load_from_disk(folder)  # what a user of SAE Lens gets from the folder
        save_file(outputs(saved, peer_input(spec)), str(out / "results" / f"native-{case}.safetensors"))
print(f"saelens {sae_lens.__version__}: {len(manifest['exports'])} exports read, {len(manifest['natives'])} folders written")
