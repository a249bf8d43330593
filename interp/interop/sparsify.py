"""sparsify folders (checked against eai-sparsify 1.3.3): one folder per hookpoint, named by the
module path it hooks (`layers.6`, `layers.6.mlp`), with `cfg.json` (SparseCoderConfig's fields
and d_in) and `sae.safetensors`: encoder.weight (n, d), encoder.bias (n), W_dec (n, d), b_dec (d)
and, with skip_connection, W_skip (d, d). sparsify loads strictly.

Its coders are TopK: z = encoder(x - b_dec) (x itself for a transcoder), the k largest of ReLU(z),
x_hat = acts @ W_dec + b_dec (+ x @ W_skip.T). An SAE reads a module's output; a transcoder
reads the module's input and reconstructs its output, at the same width. In TransformerLens
names, for the Llama-style models interp loads:

    layers.L             output blocks.L.hook_resid_post   input blocks.L.hook_resid_pre
    layers.L.mlp         output blocks.L.hook_mlp_out      input blocks.L.ln2.hook_out
    layers.L.self_attn   output blocks.L.hook_attn_out     input blocks.L.ln1.hook_out
    embed_tokens         output hook_embed

The MLP's input is the norm's output after its elementwise gain (ln2.hook_out). A transcoder
that reads blocks.L.ln2.hook_normalized (before the gain, interp's default) is exported with the
gain divided out of its encoder and skip columns, which needs the model's gain. groupmax
activations and thresholds are not representable; multi_topk changes only sparsify's training loss.
"""

from __future__ import annotations

import re

import torch

from interp.errors import BadInput
from interp.interop.view import peer_view
from interp.sae import create_coder
from interp.sae.base import SparseCoder

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"
_MODULES = {"": ("hook_resid_pre", "hook_resid_post"), ".mlp": ("ln2.hook_out", "hook_mlp_out"),
            ".self_attn": ("ln1.hook_out", "hook_attn_out")}
_HOOKPOINT = re.compile(r"(?:model\.)?layers\.(\d+)(\.mlp|\.self_attn)?")


def hooks_of(hookpoint: str, transcode: bool) -> tuple[str, str | None]:
    """(hook read, hook written or None for an SAE) in TransformerLens names."""
    if hookpoint in ("embed_tokens", "model.embed_tokens") and not transcode:
        return "hook_embed", None
    match = _HOOKPOINT.fullmatch(hookpoint)
    if not match:
        raise BadInput(
            f"module path {hookpoint!r} (a sparsify hookpoint or Hugging Face module) has no TransformerLens name interp knows; "
            "known: layers.L, layers.L.mlp, layers.L.self_attn, embed_tokens"
        )
    layer, module = match.group(1), match.group(2) or ""
    read, write = (f"blocks.{layer}.{h}" for h in _MODULES[module])
    return (read, write) if transcode else (write, None)


def hookpoint_of(read: str, write: str | None) -> str:
    """The sparsify hookpoint of a coder reading `read` and writing `write` (None: an SAE)."""
    if write is None and read == "hook_embed":
        return "embed_tokens"
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", write or read)
    if match:
        layer, written = match.groups()
        for module, (module_in, module_out) in _MODULES.items():
            inputs = {f"blocks.{layer}.{module_in}"} | ({f"blocks.{layer}.ln2.hook_normalized"} if module == ".mlp" else set())
            if written == module_out and (write is None or read in inputs):
                return f"layers.{layer}{module}"
    raise BadInput(
        f"sparsify has no hookpoint for a coder reading {read!r}" + (f" and writing {write!r}" if write else "")
        + "; it holds SAEs on module outputs (resid_post, mlp_out, attn_out, embed) and transcoders from a module's input to its output"
    )


def from_sparsify(cfg: dict, tensors: dict[str, torch.Tensor], hookpoint: str, where: str, model: str = "") -> SparseCoder:
    """The interp coder computing what the sparsify coder in `where` (at `hookpoint`) computes."""
    if cfg.get("activation", "topk") != "topk":
        raise BadInput(f"{where}: activation={cfg['activation']!r} is not representable (interp reads TopK sparsify coders)")
    t = {k: v.float() for k, v in tensors.items()}
    skip = bool(cfg.get("skip_connection"))
    expected = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} | ({"W_skip"} if skip else set())
    if set(t) != expected:
        raise BadInput(f"{where}: expected tensors {sorted(expected)}, found {sorted(t)}")
    transcode = bool(cfg.get("transcode"))
    read, write = hooks_of(hookpoint, transcode)
    n, d = t["encoder.weight"].shape
    coder = create_coder("topk", d_in=d, n_latents=n, k=int(cfg["k"]), hook=read, target_hook=write, skip=skip, model=model)
    with torch.no_grad():
        coder.W_enc.copy_(t["encoder.weight"]), coder.b_enc.copy_(t["encoder.bias"])
        coder.W_dec.copy_(t["W_dec"]), coder.b_dec.copy_(t["b_dec"])
        if skip:
            coder.W_skip.copy_(t["W_skip"])
    coder.meta = {"imported": {"format": "sparsify", "hookpoint": hookpoint, "config": cfg}}
    return coder.eval()


def to_sparsify(coder: SparseCoder, gain: torch.Tensor | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(hookpoint, cfg.json, tensors) of the sparsify coder computing what `coder` computes.
    `gain` is the MLP norm's elementwise gain, needed for a transcoder reading ln2.hook_normalized."""
    if coder.discrete:
        raise BadInput(f"sparsify holds only TopK coders; a {coder.arch} coder's activations are its codes' norms, not ReLU(z)")
    if hasattr(coder, "threshold") or coder.arch not in ("topk", "gradient"):
        raise BadInput(f"sparsify holds only TopK coders; a {coder.arch} coder selects by threshold (--to saelens writes it as jumprelu)")
    transcoder = coder.cfg.target_hook is not None
    if transcoder and coder.cfg.d_out != coder.cfg.d_in:
        raise BadInput(f"sparsify transcoders keep their width; this one maps {coder.cfg.d_in} to {coder.cfg.d_out}")
    hookpoint = hookpoint_of(coder.cfg.hook, coder.cfg.target_hook)
    view = peer_view(coder)
    W_enc, W_skip = view.W_enc, view.W_skip
    if coder.cfg.hook.endswith("ln2.hook_normalized"):
        if gain is None:
            raise BadInput("this transcoder reads the MLP input before the norm's gain; exporting it needs the model's gain")
        W_enc = W_enc / gain[None, :]
        W_skip = None if W_skip is None else W_skip / gain[None, :]
    tensors = {"encoder.weight": W_enc.contiguous(), "encoder.bias": view.b_enc.contiguous(),
               "W_dec": view.W_dec.contiguous(), "b_dec": view.b_dec.contiguous()}
    if W_skip is not None:
        tensors["W_skip"] = W_skip.contiguous()
    cfg = {
        "activation": "topk", "expansion_factor": max(1, coder.cfg.n_latents // coder.cfg.d_in), "normalize_decoder": True,
        "num_latents": coder.cfg.n_latents, "k": coder.cfg.k, "multi_topk": False, "skip_connection": coder.cfg.skip,
        "transcode": transcoder, "d_in": coder.cfg.d_in,
    }
    return hookpoint, cfg, tensors
