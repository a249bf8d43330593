"""Keep memory in the process on the CPU, so a training step does not page-fault: glibc told to
keep freed blocks, and a workspace that large per-step buffers reuse.

Every CPU training step allocates and frees the same tensors (gradients, activations' copies:
tens of MB each). glibc's malloc hands blocks that large to the system on free (mmap, or a
trim of the heap's top), so the next step gets fresh pages that the kernel zeroes on first
touch: thousands of page faults a step (bench/train_step.py measures the step). Raising the mmap and trim thresholds keeps those blocks in the heap for reuse. The memory kept
is bounded by the step's peak; it is only returned when the process ends.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform

import torch

log = logging.getLogger("interp.allocator")

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit systems
_TRIM_THRESHOLD = 1 << 30  # mallopt takes a C int


@functools.cache
def retain_freed_memory() -> bool:
    """Set glibc's thresholds once per process; False (nothing changed) where malloc is not glibc's."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    done = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("glibc mallopt: mmap threshold %d, trim threshold %d: %s", _MMAP_THRESHOLD_MAX, _TRIM_THRESHOLD, done)
    return done


class Workspace:
    """A (rows, cols) CPU buffer that a computation reuses call after call instead of allocating
    a fresh one, whose pages the kernel would zero on first touch. Nothing outlives the call that
    fills it. On other devices there is none: their allocators already reuse memory."""

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def get(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        if device.type != "cpu":
            return None
        buffer = self._buffer
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != cols or buffer.dtype != dtype:
            buffer = self._buffer = torch.empty(rows, cols, dtype=dtype)
        return buffer[:rows]
