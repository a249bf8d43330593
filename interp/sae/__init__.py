"""Sparse coders: one class per family, one registry from architecture name to class."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from interp.errors import BadInput
from interp.sae.base import (
    CoderConfig,
    CoderOutput,
    ModelUnits,
    SelectContext,
    SparseCode,
    SparseCoder,
)
from interp.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from interp.sae.codebook import CodebookConfig, CodebookSAE
from interp.sae.choice import (
    FeatureChoiceConfig,
    FeatureChoiceSAE,
    MutualChoiceConfig,
    MutualChoiceSAE,
)
from interp.sae.folder import read_cfg
from interp.sae.gradient import GradientConfig, GradientSAE
from interp.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from interp.sae.topk import TopKConfig, TopKSAE

REGISTRY: dict[str, type[SparseCoder]] = {
    cls.arch: cls for cls in (TopKSAE, BatchTopKSAE, MutualChoiceSAE, FeatureChoiceSAE, GradientSAE, CodebookSAE, JumpReLUSAE)
}


def coder_class(arch: str) -> type[SparseCoder]:
    if arch not in REGISTRY:
        raise BadInput(f"unknown architecture {arch!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[arch]


def create_coder(arch: str, **config) -> SparseCoder:
    cls = coder_class(arch)
    known = {f.name for f in fields(cls.config_class)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise BadInput(f"{', '.join(unknown)} do not apply to architecture {arch!r}; its settings: {', '.join(sorted(known))}")
    return cls(cls.config_class(**config))


def load_sae(folder: str | Path, device: str = "cpu", hookpoint: str | None = None) -> SparseCoder:
    """Load a coder: an interp folder (`SparseCoder.save`), or an SAE Lens or sparsify folder
    (`hookpoint` names one of a sparsify run's), read by interp.interop."""
    # imported here: interp.interop builds its coders with this package
    from interp.interop import is_foreign, load_foreign

    folder = Path(folder)
    if hookpoint is not None or is_foreign(folder):
        return load_foreign(folder, hookpoint, device)
    arch = read_cfg(folder)["arch"]
    return coder_class(arch).from_folder(folder, device=device)


__all__ = [
    "REGISTRY", "BatchTopKConfig", "BatchTopKSAE", "CodebookConfig", "CodebookSAE", "CoderConfig", "CoderOutput", "FeatureChoiceConfig",
    "FeatureChoiceSAE", "GradientConfig", "GradientSAE", "JumpReLUConfig", "JumpReLUSAE", "ModelUnits", "MutualChoiceConfig", "MutualChoiceSAE",
    "SelectContext", "SparseCode", "SparseCoder", "TopKConfig", "TopKSAE", "coder_class", "create_coder", "load_sae",
]
