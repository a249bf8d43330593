"""What the benchmarks share: a wall-clock timer."""

from __future__ import annotations

import time


def timed(fn):
    """(fn(), seconds it took)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
