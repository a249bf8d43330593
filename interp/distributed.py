"""Processes started by torchrun: which rank this process is, of how many, through
torch.distributed (one process group, gloo on the CPU and NCCL on CUDA, initialised from the
environment torchrun sets). Outside torchrun there is one process, rank 0 of 1, and no group."""

from __future__ import annotations

import os

import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_and_world(device: str) -> tuple[int, int]:
    """(this process's rank, the number of processes), joining the process group first."""
    if not launched():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def local_device(device: str) -> str:
    """Under torchrun each process takes its own GPU (cuda:LOCAL_RANK); the CPU is shared."""
    if launched() and device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
