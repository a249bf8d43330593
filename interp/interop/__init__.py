"""Other libraries' coder folders, read and written exactly: SAE Lens (`saelens.py`), sparsify
(`sparsify.py`) and, behind an explicit import, dictionary_learning (`dictionary_learning.py`,
whose checkpoints are pickles). Each format is a pair of pure functions between its
(config, tensors) and an interp coder; this module finds the format of a folder, reads and writes
files, and converts.

    coder = load_foreign("path/to/folder")                       # SAE Lens or sparsify, detected
    coder = load_foreign("sparsify-run", hookpoint="layers.6")   # one hookpoint of a sparsify run
    export(coder, "saelens", "out/")                             # or "sparsify", "interp"
    convert("sparsify-run", "saelens", "out/", hookpoint="layers.6")
    import_dictionary_learning("dl-folder", "interp", "out/")     # the only path that opens a pickle

`interp.load_sae` reads these folders too.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from interp.atomic import write_json, write_tensors
from interp.errors import BadInput, NotFound
from interp.interop import saelens, sparsify
from interp.models import DEFAULT_MODEL, SMOLLM2_HF_NAME, hook_layer
from interp.sae import folder as folder_format
from interp.sae.base import SparseCoder

FORMATS = ("interp", "saelens", "sparsify")
# Model names as peers record them (Hugging Face names) and as interp loads them.
_HF_NAMES = {DEFAULT_MODEL: SMOLLM2_HF_NAME}


def detect_format(folder: Path) -> str:
    """'interp', 'saelens' or 'sparsify' (a hookpoint folder), from the files a folder holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a folder")
    if (folder / folder_format.CFG_FILE).exists() and (folder / folder_format.WEIGHTS_FILE).exists():
        return "interp"
    if (folder / saelens.CFG_FILE).exists() and (folder / saelens.WEIGHTS_FILE).exists():
        return "saelens"
    if (folder / sparsify.CFG_FILE).exists() and (folder / sparsify.WEIGHTS_FILE).exists():
        return "sparsify"
    hookpoints = _sparsify_hookpoints(folder)
    hint = f"; it is a sparsify run: name one of its hookpoints ({', '.join(hookpoints)})" if hookpoints else ""
    raise BadInput(f"{folder} holds no coder interp can read (an interp, SAE Lens or sparsify folder){hint}")


def is_foreign(folder: Path) -> bool:
    """Whether `folder` holds another library's coder: an SAE Lens or sparsify folder, or a sparsify run."""
    if not folder.is_dir():
        return False
    names = (saelens.WEIGHTS_FILE, sparsify.WEIGHTS_FILE)
    return any((folder / name).exists() for name in names) or bool(_sparsify_hookpoints(folder))


def _sparsify_hookpoints(run: Path) -> list[str]:
    """The hookpoint folders of a sparsify run folder."""
    return sorted(p.name for p in run.iterdir() if (p / sparsify.WEIGHTS_FILE).exists())


def load_foreign(path: str | Path, hookpoint: str | None = None, device: str = "cpu") -> SparseCoder:
    """The coder in an SAE Lens folder, a sparsify hookpoint folder, or `hookpoint` of a sparsify run."""
    folder = Path(path) / hookpoint if hookpoint else Path(path)
    fmt = detect_format(folder)
    if fmt == "interp":
        raise BadInput(f"{folder} is an interp folder: load it with interp.load_sae")
    cfg, tensors = _read_json(folder / "cfg.json"), _read_tensors(folder / (saelens.WEIGHTS_FILE if fmt == "saelens" else sparsify.WEIGHTS_FILE))
    if fmt == "saelens":
        coder = saelens.from_saelens(cfg, tensors, str(folder))
    else:
        coder = sparsify.from_sparsify(cfg, tensors, folder.name, str(folder), _sparsify_model(folder.parent))
    coder.cfg.model = _interp_name(coder.cfg.model)
    return coder.to(device)


def export(coder: SparseCoder, fmt: str, out: str | Path) -> Path:
    """Write `coder` in format `fmt` under `out`; returns the coder's folder (for sparsify,
    out/<hookpoint>, with the run's config.json naming the model beside it)."""
    check_format(fmt)
    out = Path(out)
    coder = coder.eval()
    if fmt == "interp":
        return coder.save(out)
    if fmt == "saelens":
        cfg, tensors = saelens.to_saelens(coder, _HF_NAMES.get(coder.cfg.model, coder.cfg.model))
        write_tensors(out / saelens.WEIGHTS_FILE, tensors)
        write_json(out / saelens.CFG_FILE, cfg)
        return out
    hookpoint, cfg, tensors = sparsify.to_sparsify(coder, _mlp_gain(coder))
    write_tensors(out / hookpoint / sparsify.WEIGHTS_FILE, tensors)
    write_json(out / hookpoint / sparsify.CFG_FILE, cfg)
    write_json(out / "config.json", {"model": _HF_NAMES.get(coder.cfg.model, coder.cfg.model)})
    return out / hookpoint


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise BadInput(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def convert(src: str | Path, fmt: str, out: str | Path, hookpoint: str | None = None) -> Path:
    """Read the coder in `src` (any format) and write it as `fmt` under `out`."""
    from interp.sae import load_sae

    return export(load_sae(src, hookpoint=hookpoint), check_format(fmt), out)


def import_dictionary_learning(src: str | Path, fmt: str, out: str | Path, hook: str | None = None,
                               model: str | None = None) -> Path:
    """Read the dictionary_learning folder `src` (its pickle, weights-only) and write it as `fmt` under `out`."""
    from interp.interop.dictionary_learning import read_dictionary_learning

    check_format(fmt)
    coder = read_dictionary_learning(src, hook, model)
    coder.cfg.model = _interp_name(coder.cfg.model)
    return export(coder, fmt, out)


def _mlp_gain(coder: SparseCoder):
    """The MLP norm's gain of the coder's model, for a transcoder reading ln2.hook_normalized."""
    if not coder.cfg.hook.endswith("ln2.hook_normalized"):
        return None
    from interp.models import load_hf

    layer = hook_layer(coder.cfg.hook)
    hf_model = load_hf(coder.cfg.model)[0]
    return hf_model.model.layers[layer].post_attention_layernorm.weight.detach().float()


def _interp_name(name: str) -> str:
    return {hf: ours for ours, hf in _HF_NAMES.items()}.get(name, name)


def _sparsify_model(run: Path) -> str:
    """The model a sparsify run trained on, from the run folder's config.json when there is one."""
    config = run / "config.json"
    return str(_read_json(config).get("model", "")) if config.exists() else ""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise BadInput(f"{path} does not hold a JSON object")
    return data


def _read_tensors(path: Path):
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise BadInput(f"{path} is corrupt or not a safetensors file: {err}") from err
