"""Processes started by torchrun: which rank this process is, of how many, through
torch.distributed (one process group, gloo on the CPU and NCCL on CUDA, initialised from the
environment torchrun sets), and the reductions data-parallel training needs. Outside torchrun
there is one process, rank 0 of 1, no group, and every reduction is the identity.

Data parallelism: each rank holds a share of every global batch. Inside `batch_across_ranks()`
a batch statistic (the FVU's total variance) is taken over the union of the shares, so that
each rank's loss is its share of the global batch's loss and the sum of the ranks' gradients
is the global batch's gradient.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_across = False


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world(device: str) -> tuple[int, int]:
    """(this process's rank, the number of processes), joining the process group first."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        # A group left to the interpreter's shutdown can abort the process ("terminate called
        # without an active exception": gloo's worker threads outlive the interpreter; pytorch#190489).
        atexit.register(_leave_group)
    return dist.get_rank(), dist.get_world_size()


def _leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_device(device: str) -> str:
    """Under torchrun each process takes its own GPU (cuda:LOCAL_RANK); the CPU is shared."""
    if launched() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def batch_across_ranks(on: bool = True) -> Iterator[None]:
    """Inside, batch statistics reduce over every rank's share of the batch (with a process group)."""
    global _across
    before, _across = _across, on and dist.is_initialized()
    try:
        yield
    finally:
        _across = before


def across_ranks() -> bool:
    return _across


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over the ranks (in place) inside `batch_across_ranks`; `t` itself elsewhere."""
    if _across:
        dist.all_reduce(t)
    return t


def total_over_ranks(count: int, device) -> int:
    """A count (of tokens, of matches) summed over the ranks inside `batch_across_ranks`; `count` elsewhere."""
    return int(sum_over_ranks(torch.tensor(count, device=device)))


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t`'s maximum over the ranks (in place) inside `batch_across_ranks`; `t` itself elsewhere."""
    if _across:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on each), concatenated along the rows in rank order."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
