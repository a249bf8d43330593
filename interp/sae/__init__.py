"""Sparse coders: one class per family, one registry from architecture name to class."""

from __future__ import annotations

from pathlib import Path

from interp.sae.base import CoderConfig, CoderOutput, SparseCode, SparseCoder, read_cfg
from interp.sae.topk import TopKConfig, TopKSAE

REGISTRY: dict[str, type[SparseCoder]] = {cls.arch: cls for cls in (TopKSAE,)}


def coder_class(arch: str) -> type[SparseCoder]:
    if arch not in REGISTRY:
        raise ValueError(f"unknown architecture {arch!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]


def create_coder(arch: str, **config) -> SparseCoder:
    cls = coder_class(arch)
    return cls(cls.config_class(**config))


def load_sae(folder: str | Path, device: str = "cpu") -> SparseCoder:
    """Load a coder saved by `SparseCoder.save` (cfg.json + weights.safetensors)."""
    arch = read_cfg(Path(folder))["arch"]
    return coder_class(arch).from_folder(folder, device=device)


__all__ = [
    "REGISTRY", "CoderConfig", "CoderOutput", "SparseCode", "SparseCoder", "TopKConfig", "TopKSAE",
    "coder_class", "create_coder", "load_sae",
]
