"""dictionary_learning folders (saprmarks/dictionary_learning): `ae.pt`, the trained dictionary's
state dict written by `torch.save` (a pickle), and `config.json`, {"trainer": {"dict_class",
"k", "layer", "lm_name", "submodule_name", ...}}.

A pickle can run code when it is read, so this module is the only place interp opens one: it is
reached only through `interp import-dictionary-learning` (or `read_dictionary_learning`), never
through `interp.load_sae`, and it reads with torch's weights-only unpickler, which builds
tensors and plain containers and refuses anything else.

The dictionary classes, as their `encode`/`decode` compute, and what they become in interp:
- AutoEncoder: ReLU(encoder(x - bias)), decoder(f) + bias -> jumprelu with thresholds 0; the
  decoder's columns are made unit norm as its `from_pretrained` does (load_dictionary's default);
- AutoEncoderNew: ReLU(encoder(x)), decoder(f) with the decoder's bias -> b_enc absorbs W_enc b_dec;
- GatedAutoEncoder: the gate and magnitude paths share the encoder -> jumprelu (see interp.sae.jumprelu);
- JumpReluAutoEncoder: ReLU(z * (z > threshold)) with z = x @ W_enc + b_enc (no b_dec subtraction);
- AutoEncoderTopK: the k largest of ReLU(encoder(x - b_dec)) -> topk;
- BatchTopKSAE, MatryoshkaBatchTopKSAE: at inference ReLU(z) * (ReLU(z) > threshold), one scalar
  threshold -> jumprelu with it broadcast (a threshold never set, -1, keeps every positive z).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch

from interp.errors import BadInput, NotFound
from interp.sae import create_coder
from interp.sae.base import SparseCoder
from interp.sae.jumprelu import gated_as_jumprelu

WEIGHTS_FILE, CONFIG_FILE = "ae.pt", "config.json"
# Module names as dictionary_learning's users and its released dictionaries write them
# (resid_out_layer3, mlp_out_layer1, attn_3, embed), and the hook each one reads.
_SUBMODULE = re.compile(r"(resid|mlp|attn)(?:_(?:out|post))?_?(?:layer)?_?(\d+)")
_HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}


def hook_of_submodule(name: str) -> str | None:
    """The TransformerLens hook of a dictionary_learning submodule name, or None if it is not one of the known forms."""
    if name == "embed":
        return "hook_embed"
    match = _SUBMODULE.fullmatch(name)
    return f"blocks.{int(match.group(2))}.{_HOOKS[match.group(1)]}" if match else None


def read_dictionary_learning(folder: str | Path, hook: str | None = None, model: str | None = None) -> SparseCoder:
    """The interp coder computing what the dictionary in `folder` computes. `hook` and `model`
    default to what its config.json (or the folder's name) says."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise NotFound(f"{folder} holds no {WEIGHTS_FILE} (a dictionary_learning folder holds ae.pt and config.json)")
    trainer = _trainer_config(folder)
    state = _load_state(folder / WEIGHTS_FILE)
    dict_class = trainer.get("dict_class") or _guess_class(state)
    hook = hook or _hook(folder, trainer)
    model = model or str(trainer.get("lm_name") or "")
    coder = _coder(dict_class, {k: v.float() for k, v in state.items()}, hook, model, str(folder))
    coder.meta = {"imported": {"format": "dictionary_learning", "dict_class": dict_class, "trainer": trainer}}
    return coder.eval()


def _trainer_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path} is not valid JSON: {err}") from err
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return trainer if isinstance(trainer, dict) else {}


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise BadInput(f"{path} is not a state dict torch's weights-only loader accepts (it reads tensors only): {err}") from err
    if isinstance(state, dict) and "ae" in state and "optimizer" in state:
        raise BadInput(f"{path} is a training backup of an unfinished run (its biases are in normalised units); "
                       "dictionary_learning writes the trained dictionary's ae.pt when training ends")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"{path} does not hold a state dict (a dict of tensors)")
    return state


def _guess_class(state: dict) -> str:
    """The dictionary class of a folder without config.json, from the tensors it holds."""
    keys = set(state)
    for dict_class, expected in _TENSORS.items():
        if keys == expected:
            return dict_class
    raise BadInput(f"no config.json names the dictionary class, and the tensors {sorted(keys)} match none of "
                   f"{', '.join(_TENSORS)}")


def _hook(folder: Path, trainer: dict) -> str:
    for name in (trainer.get("submodule_name"), folder.name, folder.parent.name):
        hook = hook_of_submodule(str(name)) if name else None
        if hook:
            return hook
    raise BadInput(f"{folder}: the submodule {trainer.get('submodule_name')!r} has no TransformerLens hook interp knows "
                   "(known: resid_N, mlp_N, attn_N, with _out/_layer forms, and embed); name it with --hook")


_LINEAR = {"encoder.weight", "encoder.bias", "decoder.weight"}
_TENSORS = {
    "AutoEncoder": _LINEAR | {"bias"},
    "AutoEncoderNew": _LINEAR | {"decoder.bias"},
    "GatedAutoEncoder": {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"},
    "JumpReluAutoEncoder": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "AutoEncoderTopK": _LINEAR | {"b_dec", "k", "threshold"},
    "BatchTopKSAE": _LINEAR | {"b_dec", "k", "threshold"},
    "MatryoshkaBatchTopKSAE": {"W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"},
}


def _coder(dict_class: str, t: dict[str, torch.Tensor], hook: str, model: str, where: str) -> SparseCoder:
    """(W_enc (n, d), b_enc, W_dec (n, d), b_dec, threshold or None for topk) in interp's form:
    z = W_enc (x - b_dec) + b_enc."""
    if dict_class not in _TENSORS:
        raise BadInput(f"{where}: dictionary class {dict_class!r} has no interp equivalent; readable: {', '.join(_TENSORS)}")
    if set(t) != _TENSORS[dict_class]:
        raise BadInput(f"{where}: a {dict_class} holds {sorted(_TENSORS[dict_class])}, this ae.pt {sorted(t)}")
    k = None
    if dict_class == "AutoEncoder":
        W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].T, t["bias"]
        norms = torch.linalg.vector_norm(W_dec, dim=1).clamp_min(1e-12)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        threshold = torch.zeros(len(b_enc))
    elif dict_class == "AutoEncoderNew":
        W_enc, W_dec, b_dec = t["encoder.weight"], t["decoder.weight"].T, t["decoder.bias"]
        b_enc, threshold = t["encoder.bias"] + W_enc @ b_dec, torch.zeros(len(W_enc))
    elif dict_class == "GatedAutoEncoder":
        W_enc, b_enc, threshold = gated_as_jumprelu(t["encoder.weight"], t["r_mag"], t["gate_bias"], t["mag_bias"])
        W_dec, b_dec = t["decoder.weight"].T, t["decoder_bias"]
    elif dict_class == "JumpReluAutoEncoder":
        W_enc, W_dec, b_dec, threshold = t["W_enc"].T, t["W_dec"], t["b_dec"], t["threshold"]
        b_enc = t["b_enc"] + W_enc @ b_dec
    elif dict_class == "AutoEncoderTopK":
        W_enc, b_enc, W_dec, b_dec = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"].T, t["b_dec"]
        threshold, k = None, int(t["k"])
    else:
        linear = dict_class == "BatchTopKSAE"
        W_enc = t["encoder.weight"] if linear else t["W_enc"].T
        b_enc = t["encoder.bias"] if linear else t["b_enc"]
        W_dec = t["decoder.weight"].T if linear else t["W_dec"]
        b_dec, threshold = t["b_dec"], t["threshold"].expand(len(b_enc))
    n, d = W_enc.shape
    coder = create_coder("topk" if k else "jumprelu", d_in=d, n_latents=n, hook=hook, model=model, **({"k": k} if k else {}))
    with torch.no_grad():
        coder.W_enc.copy_(W_enc), coder.b_enc.copy_(b_enc), coder.W_dec.copy_(W_dec), coder.b_dec.copy_(b_dec)
        if threshold is not None:
            coder.threshold.copy_(threshold)
    return coder
