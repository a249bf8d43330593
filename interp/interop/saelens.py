"""SAE Lens folders (checked against sae-lens 6.54): `cfg.json` + `sae_weights.safetensors`, with
W_enc (d_in, d_sae), W_dec (d_sae, d_out), b_enc, b_dec, and per architecture `threshold`
(jumprelu), `W_skip` (d_out, d_in: skip transcoders), or `b_gate`, `r_mag`, `b_mag` (gated, no
b_enc). SAE Lens loads strictly (an extra tensor fails) and reads hook names from
`cfg["metadata"]`, which it keeps only when `metadata.sae_lens_version` is 6 or later.

Inference as SAE Lens computes it, and what it becomes in interp:
- standard: ReLU(z) -> a jumprelu coder with thresholds 0; jumprelu: ReLU(z) * (z > threshold);
- gated: 1[W_enc x + b_gate > 0] * ReLU(exp(r_mag) W_enc x + b_mag) -> jumprelu on the magnitude
  pre-activation with threshold b_mag - exp(r_mag) b_gate (the same test, rearranged);
- topk: the k largest z, ReLU'd -> topk; with `rescale_acts_by_decoder_norm` the selection is on
  z times the decoder row norms, folded into the encoder (as SAE Lens's own save does);
- transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder: ReLU or JumpReLU
  transcoders (SAE Lens has no TopK transcoder), reading `metadata.hook_name`, writing
  `metadata.hook_name_out`;
- hook names: `metadata.hook_name` (`hook_name_out` for transcoders), at the top level in folders
  older than SAE Lens 6, or else the Hugging Face module paths `hf_hook_name(_out)`, translated as
  sparsify's (interp.interop.sparsify);
- `apply_b_dec_to_input: false` on an SAE: b_enc absorbs W_enc b_dec;
- `normalize_activations`: "none", "expected_average_only_in" and "covariance_whitening" are the
  identity when SAE Lens runs a folder; "layer_norm" and "constant_norm_rescale" act on every
  input and are not representable. abstopk, matching_pursuit and temporal are not either.

Export writes float32, unit decoder rows (see interp.interop.view), and interp's own facts
(architecture, settings, training, the input-norm bound) under `metadata.interp`.
"""

from __future__ import annotations

import torch

from interp.errors import BadInput
from interp.interop.sparsify import hooks_of
from interp.interop.view import peer_view, uniform_scale
from interp.sae import create_coder
from interp.sae.base import SparseCoder
from interp.sae.jumprelu import gated_as_jumprelu

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
# The SAE Lens release whose format this module writes; SAE Lens drops the metadata of a folder
# whose version is missing or older than 6.
FORMAT_VERSION = "6.54.12"
TRANSCODERS = {"transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"}
READABLE = {"standard", "jumprelu", "gated", "topk", *TRANSCODERS}
IDENTITY_AT_INFERENCE = {"none", "expected_average_only_in", "covariance_whitening"}


def from_saelens(cfg: dict, tensors: dict[str, torch.Tensor], where: str) -> SparseCoder:
    """The interp coder that computes what the SAE Lens folder `where` computes."""
    arch = cfg.get("architecture")
    if arch not in READABLE:
        raise BadInput(f"{where}: SAE Lens architecture {arch!r} has no interp equivalent; readable: {', '.join(sorted(READABLE))}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in IDENTITY_AT_INFERENCE:
        raise BadInput(f"{where}: normalize_activations={norm!r} changes every input at inference, which no interp coder does")
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise BadInput(f"{where}: a scaling_factor other than 1 is not representable (fold it into the weights first)")
    # Folders older than SAE Lens 6 keep these at the top level; 6 and later under metadata.
    meta = {key: cfg[key] for key in _HOOK_KEYS if key in cfg} | (cfg.get("metadata") or {})
    hook, hook_out = _hooks(meta, arch in TRANSCODERS, where)
    if cfg.get("reshape_activations", "none") == "hook_z" and not hook.endswith("hook_z"):
        raise BadInput(f"{where}: reshape_activations='hook_z' on hook {hook!r}, which is not an attention hook_z")
    t = {k: v.float() for k, v in tensors.items()}
    expected = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "r_mag", "b_mag"} if arch == "gated" else {"b_enc"})
    expected |= {"threshold"} if arch.startswith("jumprelu") else set()
    expected |= {"W_skip"} if "skip" in arch else set()
    if set(t) != expected:
        raise BadInput(f"{where}: {arch} holds {sorted(expected)}, this folder {sorted(t)}")
    W_enc, W_dec, b_dec = t["W_enc"].T.contiguous(), t["W_dec"], t["b_dec"]
    n, d_in = W_enc.shape
    transcoder = arch in TRANSCODERS
    if arch == "gated":
        W_enc, b_enc, threshold = gated_as_jumprelu(W_enc, t["r_mag"], t["b_gate"], t["b_mag"])
    else:
        b_enc, threshold = t["b_enc"], t.get("threshold", torch.zeros(n))
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        row_norms = torch.linalg.vector_norm(W_dec, dim=1)
        W_enc, b_enc, W_dec = W_enc * row_norms[:, None], b_enc * row_norms, W_dec / row_norms[:, None]
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec  # interp's SAEs always subtract b_dec from their input
    options = {"k": int(cfg.get("k", 100))} if arch == "topk" else {}
    coder = create_coder(
        "topk" if arch == "topk" else "jumprelu", d_in=d_in, n_latents=n, hook=hook,
        target_hook=hook_out, d_out=W_dec.shape[1], skip="skip" in arch,
        model=(meta.get("interp") or {}).get("model") or meta.get("model_name") or "", **options,
    )
    with torch.no_grad():
        coder.W_enc.copy_(W_enc), coder.b_enc.copy_(b_enc), coder.W_dec.copy_(W_dec), coder.b_dec.copy_(b_dec)
        if coder.cfg.skip:
            coder.W_skip.copy_(t["W_skip"])
        if arch != "topk":
            coder.threshold.copy_(threshold)
        bound = (meta.get("interp") or {}).get("max_input_norm")
        coder.set_max_input_norm(bound)
    # An interp export carries its coder's facts (training settings, evaluation): keep them.
    ours = (meta.get("interp") or {}).get("meta") or {}
    coder.meta = {**ours, "imported": {"format": "saelens", "architecture": arch, "metadata": meta}}
    return coder.eval()


_HOOK_KEYS = ("hook_name", "hook_name_out", "hf_hook_name", "hf_hook_name_out", "model_name")


def _hooks(meta: dict, transcoder: bool, where: str) -> tuple[str, str | None]:
    """(hook read, hook written or None) in TransformerLens names: hook_name(_out), or failing
    those the Hugging Face module paths hf_hook_name(_out) (a transcoder reads its module's input)."""
    hook, hook_out = meta.get("hook_name"), meta.get("hook_name_out") if transcoder else None
    if not hook and meta.get("hf_hook_name"):
        hook = hooks_of(meta["hf_hook_name"], transcoder)[0]
    if transcoder and not hook_out and meta.get("hf_hook_name_out"):
        hook_out = hooks_of(meta["hf_hook_name_out"], False)[0]
    if not hook:
        raise BadInput(f"{where}: no metadata.hook_name or hf_hook_name says which hook the coder reads")
    if transcoder and not hook_out:
        raise BadInput(f"{where}: a transcoder without metadata.hook_name_out or hf_hook_name_out (the hook it writes)")
    return hook, hook_out


def to_saelens(coder: SparseCoder, model_name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(cfg.json, tensors) of the SAE Lens folder computing what `coder` computes (in eval mode)."""
    if coder.discrete:
        raise BadInput(f"SAE Lens has no discrete coders: a {coder.arch} coder's activations are its codes' norms, not ReLU(z)")
    transcoder = coder.cfg.target_hook is not None
    thresholded = hasattr(coder, "threshold")
    if transcoder and not thresholded:
        raise BadInput(
            f"SAE Lens has no TopK transcoder: a {coder.arch} transcoder cannot be written as one "
            "(sparsify holds TopK transcoders: --to sparsify)"
        )
    view = peer_view(coder)
    if thresholded:
        arch = ("jumprelu_skip_transcoder" if coder.cfg.skip else "jumprelu_transcoder") if transcoder else "jumprelu"
    else:
        arch = "topk"
    tensors = {"W_enc": view.W_enc.T.contiguous(), "b_enc": view.b_enc, "W_dec": view.W_dec.contiguous(), "b_dec": view.b_dec}
    if thresholded:
        tensors["threshold"] = view.threshold.contiguous()
    if view.W_skip is not None:
        tensors["W_skip"] = view.W_skip.contiguous()
    metadata = {
        "sae_lens_version": FORMAT_VERSION, "model_name": model_name, "hook_name": coder.cfg.hook,
        "interp": {
            "arch": coder.arch, "model": coder.cfg.model, "config": {k: v for k, v in vars(coder.cfg).items()},
            "max_input_norm": coder.max_input_norm, "feature_scale": uniform_scale(view),
            "meta": coder.meta,
        },
    }
    if transcoder:
        metadata["hook_name_out"] = coder.cfg.target_hook
    cfg = {
        "d_in": coder.cfg.d_in, "d_sae": coder.cfg.n_latents, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": not transcoder, "normalize_activations": "none",
        "reshape_activations": "hook_z" if coder.cfg.hook.endswith("attn.hook_z") else "none", "metadata": metadata,
    }
    if arch == "topk":
        cfg.update(k=coder.cfg.k, rescale_acts_by_decoder_norm=False)
    if transcoder:
        cfg["d_out"] = coder.cfg.d_out
    cfg["architecture"] = arch
    return cfg, tensors
