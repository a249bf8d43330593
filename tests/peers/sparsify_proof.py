"""Runs inside sparsify's own environment (tests/test_interop_peers.py starts it): loads the
folders interp exported with sparsify's loader and writes what its encode/decode compute, re-saves
them with its own save, and writes folders of its own (random weights, its save_to_disk) with
their outputs, for interp to load. Usage: python sparsify_proof.py WORKDIR (WORKDIR/manifest.json
says what to do; results go to WORKDIR/sparsify/)."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

work = Path(sys.argv[1])
manifest = json.loads((work / "manifest.json").read_text())
out = work / "sparsify"
(out / "results").mkdir(parents=True, exist_ok=True)


def outputs(sae: SparseCoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dense feature activations (rows, n) from encode, and the reconstruction forward returns."""
    top_acts, top_indices, _ = sae.encode(x)
    acts = torch.zeros(len(x), sae.num_latents).scatter_(1, top_indices, top_acts)
    recon = sae.decode(top_acts, top_indices)
    if sae.W_skip is not None:
        recon = recon + x @ sae.W_skip.mT
    return {"acts": acts, "recon": recon, "forward": sae(x).sae_out}


def peer_input(spec: dict) -> torch.Tensor:
    """The case's input as the peer takes it ("peer_x": say a hook_z SAE's heads apart, or the
    MLP's input after the norm's gain), else the input interp takes."""
    inputs = load_file(spec["x"])
    return inputs.get("peer_x", inputs["x"])


with torch.no_grad():
    for case, spec in manifest["exports"].items():
        sae = SparseCoder.load_from_disk(spec["folder"])
        save_file(outputs(sae, peer_input(spec)), str(out / "results" / f"{case}.safetensors"))
        sae.save_to_disk(out / "resaved" / case)

    for case, spec in manifest["natives"].items():
        torch.manual_seed(spec["seed"])
        cfg = SparseCoderConfig(num_latents=spec["num_latents"], k=spec["k"], transcode=spec["transcode"],
                                skip_connection=spec["skip_connection"])
        sae = SparseCoder(spec["d_in"], cfg)
        for param in sae.parameters():  # every tensor random, so that none of them can be ignored unseen
            param.copy_(torch.randn_like(param) / spec["d_in"] ** 0.5)
        sae.save_to_disk(out / "native" / case / spec["hookpoint"])
        save_file(outputs(sae, peer_input(spec)), str(out / "results" / f"native-{case}.safetensors"))
print(f"sparsify: {len(manifest['exports'])} exports read, {len(manifest['natives'])} folders written")
