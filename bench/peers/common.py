"""Shared by the peer runners: the benchmark's shape and its timing loop.

Runners execute inside each peer's own virtual environment, so this file imports only torch.
"""

import argparse
import time

import torch


def parse_shape() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    for name in ("d", "n", "k", "tokens", "steps"):
        parser.add_argument(f"--{name}", type=int, required=True)
    return parser.parse_args()


def tokens_per_second(step, tokens: int, steps: int) -> float:
    """Median-free and simple: two warm-up steps, then the mean over `steps` timed steps."""
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - start)


def activations(tokens: int, d: int) -> torch.Tensor:
    return torch.randn(tokens, d, generator=torch.Generator().manual_seed(0))
