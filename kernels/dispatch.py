"""The one place that decides which implementation of the sparse products runs.

Order of precedence: `use_backend(...)` (innermost wins), then the environment variable
`INTERP_KERNELS`, then "auto". "auto" picks "triton" when every tensor is on CUDA and Triton
imports, else "torch". A forced choice is obeyed without fallback: forcing "triton" on CPU
tensors needs `TRITON_INTERPRET=1` set before Triton is imported (the tests do this).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
ENV_VAR = "INTERP_KERNELS"

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("interp_kernels_backend", default=None)


def _check(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown kernels backend {name!r}; expected one of {BACKENDS}")
    return name


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested() -> str:
    """The backend asked for by `use_backend` or `INTERP_KERNELS` ("auto" if neither)."""
    forced = _forced.get()
    if forced is not None:
        return forced
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def backend(*tensors: torch.Tensor) -> str:
    """Name of the implementation that runs for these tensors now: "triton", "torch" or "reference".

    Without tensors, answers for CUDA tensors if a GPU is visible, else for CPU tensors.
    """
    name = requested()
    if name != "auto":
        return name
    on_cuda = all(t.is_cuda for t in tensors) if tensors else torch.cuda.is_available()
    return "triton" if on_cuda and triton_available() else "torch"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend ("auto", "triton", "torch", "reference") inside the `with` block."""
    token = _forced.set(_check(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)
