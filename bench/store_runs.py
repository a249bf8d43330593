"""What the recipe benchmarks share: a store's activations at one hook, read once in one shuffled
order; its held-out activations; and a coder trained one pass over them by interp's Trainer step,
batch j being rows [j B, (j+1) B), so that every contender sees the same batches in the same
order."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from interp.activation_store import StoreChunks
from interp.data import DataConfig
from interp.models import ModelConfig
from interp.run import heldout_activations
from interp.sae.base import SparseCoder
from interp.train import TrainConfig, Trainer


def training_activations(store: Path, hook: str, seed: int, tokens: int | None) -> torch.Tensor:
    """The store's first `tokens` tokens at `hook` (all: None), in corpus order, each once, in
    one shuffled order."""
    return training_columns(store, [hook], seed, tokens)[hook]


def training_columns(store: Path, keys: list[str], seed: int, tokens: int | None) -> dict[str, torch.Tensor]:
    """`training_activations` for several of the store's keys (a hook and its gradient), rows
    shuffled alike."""
    source = StoreChunks(store, keys)
    every_shard = source.chunks()
    chunks = [next(every_shard) for _ in source.manifest.shards]
    columns = {key: torch.cat([chunk[key] for chunk in chunks])[:tokens].float() for key in keys}
    order = torch.randperm(len(columns[keys[0]]), generator=torch.Generator().manual_seed(seed))
    return {key: column[order] for key, column in columns.items()}


def heldout(store: Path, hook: str, n_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Held-out activations at `hook` from the store's model and text (interp's held-out split)."""
    model, data = store_model(store, hook)
    return heldout_activations(model, data, [hook], n_tokens)


def store_model(store: Path, hook: str):
    """The store's model and text settings."""
    manifest = StoreChunks(store, [hook]).manifest
    return ModelConfig(manifest.model).load(), DataConfig(dataset=manifest.dataset, context_size=manifest.context_size)


def train_one_pass(coder: SparseCoder, x_nd: torch.Tensor | dict[str, torch.Tensor], cfg: TrainConfig,
                   after_step: Callable[[Trainer, dict], None] | None = None,
                   after_init: Callable[[Trainer, dict], None] | None = None, name: str = "") -> Trainer:
    """Train `coder` on cfg.steps batches of x_nd (the hook's activations, or `training_columns`)
    in order; `after_init(trainer, batch)` runs after the first batch's initialisation,
    `after_step(trainer, stats)` after every step."""
    columns = x_nd if isinstance(x_nd, dict) else {coder.cfg.hook: x_nd}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(coder, None, cfg, run_dir)
        for step in range(cfg.steps):
            batch = {key: column[step * cfg.batch_size:(step + 1) * cfg.batch_size] for key, column in columns.items()}
            if step == 0:
                trainer.initialize(batch)
                if after_init:
                    after_init(trainer, batch)
            stats = trainer.train_step(batch)
            if after_step:
                after_step(trainer, stats)
            if step % 50 == 0 or step == cfg.steps - 1:
                print(f"  {name} step {step + 1}/{cfg.steps}: fvu {stats['fvu']:.4f} dead {stats['dead_frac']:.4f}",
                      file=sys.stderr, flush=True)
    return trainer
