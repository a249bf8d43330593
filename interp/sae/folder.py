"""A saved coder is a folder: `cfg.json` ({"format_version", "arch", "config", "meta"}) and
`weights.safetensors` (what inference needs: parameters, normalisation scales, the input-norm
bound, inference thresholds). Loading never unpickles, and rejects a folder whose files are
missing, malformed, or disagree.

Version 1 kept the input-norm bound in the config (`max_input_norm`) and training-only state
(moving averages' start flags, densities) among the weights; it is read and converted.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from interp.atomic import write_json, write_tensors
from interp.errors import BadInput, NotFound

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "weights.safetensors"


def save_coder(coder, folder: str | Path) -> Path:
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_FILE, coder.state_dict())
    write_json(
        folder / CFG_FILE,
        {"format_version": FORMAT_VERSION, "arch": coder.arch, "config": asdict(coder.cfg), "meta": coder.meta},
    )
    return folder


def read_cfg(folder: Path) -> dict:
    path = folder / CFG_FILE
    if not folder.is_dir():
        raise NotFound(f"{folder} is not a folder; a saved coder is a folder holding cfg.json and weights.safetensors")
    if not path.exists():
        raise NotFound(f"{folder} holds no cfg.json: it is not a saved sparse coder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise BadInput(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "arch" not in data or "config" not in data:
        raise BadInput(f"{path} lacks 'arch' or 'config': not a cfg.json written by interp")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise BadInput(f"{path} has format_version {version!r}; this interp reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    return data


def load_coder(cls, folder: str | Path, device: str = "cpu"):
    """The coder of class `cls` saved in `folder`."""
    folder = Path(folder)
    data = read_cfg(folder)
    values = dict(data["config"])
    bound = values.pop("max_input_norm", None) if data["format_version"] == 1 else None
    coder = cls(_build_config(cls.config_class, values, folder))
    coder.meta = data.get("meta", {})
    weights = _read_weights(folder)
    expected = coder.state_dict()
    if data["format_version"] == 1:
        weights = {k: v for k, v in weights.items() if k in expected}
        weights["input_bound"] = torch.tensor(math.inf if bound is None else float(bound))
    _check_weights(folder / WEIGHTS_FILE, weights, expected)
    coder.load_state_dict(weights)
    return coder.to(device)


def _build_config(config_class, values: dict, folder: Path):
    known = {f.name for f in fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise BadInput(f"{folder / CFG_FILE}: unknown config fields {sorted(unknown)} for {config_class.__name__}")
    try:
        return config_class(**values)
    except TypeError as err:
        raise BadInput(f"{folder / CFG_FILE}: bad config: {err}") from err


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.exists():
        raise NotFound(f"{folder} holds no {WEIGHTS_FILE}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise BadInput(f"{path} is corrupt or not a safetensors file: {err}") from err


def _check_weights(path: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        raise BadInput(f"{path} does not match cfg.json: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise BadInput(f"{path}: {name} has shape {tuple(weights[name].shape)}, cfg.json implies {tuple(tensor.shape)}")
