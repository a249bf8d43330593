"""An on-disk cache of activations, so that one model pass feeds many training runs.

A store is a folder of safetensors shards, each holding {hook: (tokens, d)} (and gradients under
`grad_key(hook)` when asked for), plus `manifest.json` recording the model, hooks, widths,
dataset, context size, token counts and the shard list. Each shard and each manifest update is
written atomically, and the manifest only lists finished shards: a killed `interp cache` run
resumes after the last shard it finished, and reproduces exactly what an uninterrupted run writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from interp.activations import ModelChunks
from interp.atomic import write_json, write_tensors
from interp.errors import BadInput, NotFound
from interp.hooks import Activations, grad_key

MANIFEST = "manifest.json"
STORE_VERSION = 1


@dataclass
class StoreManifest:
    model: str
    hooks: list[str]
    dataset: str
    context_size: int
    batch_size: int
    """Sequences per model forward pass (one chunk)."""
    chunks_per_shard: int
    target_tokens: int
    """Tokens the store is asked to hold (it stops at the first shard boundary past it)."""
    with_grads: bool = False
    widths: dict[str, int] = field(default_factory=dict)
    dtype: str = "float32"
    shards: list[dict] = field(default_factory=list)
    """Finished shards, in order: {"file", "tokens"}."""
    format_version: int = STORE_VERSION

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)

    @property
    def complete(self) -> bool:
        return self.tokens >= self.target_tokens

    def settings(self) -> dict:
        """What must agree for a resumed run to continue this store."""
        keep = ("model", "hooks", "dataset", "context_size", "batch_size", "chunks_per_shard", "with_grads", "target_tokens")
        return {k: getattr(self, k) for k in keep}


def read_manifest(folder: Path) -> StoreManifest:
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise NotFound(f"{folder} is not an activation store: it has no {MANIFEST} (write one with `interp cache`)")
    try:
        data = json.loads(path.read_text())
        manifest = StoreManifest(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise BadInput(f"{path} is malformed: {err}") from err
    if manifest.format_version != STORE_VERSION:
        raise BadInput(f"{path} has format_version {manifest.format_version}; this interp reads {STORE_VERSION}")
    return manifest


def write_store(folder: str | Path, source: ModelChunks, manifest: StoreManifest, progress: bool = True) -> StoreManifest:
    """Fill `folder` with shards from `source` until `manifest.target_tokens`, resuming a store
    that a killed run left behind (its settings must match)."""
    folder = Path(folder)
    if (folder / MANIFEST).exists():
        existing = read_manifest(folder)
        if existing.settings() != manifest.settings():
            raise BadInput(
                f"{folder} already holds a store with other settings {existing.settings()}; "
                f"choose another --out or repeat the original settings to resume it"
            )
        manifest = existing
    folder.mkdir(parents=True, exist_ok=True)
    chunks = source.chunks(start=len(manifest.shards) * manifest.chunks_per_shard)
    bar = tqdm(total=manifest.target_tokens, initial=manifest.tokens, unit="tok", unit_scale=True, desc="cache", disable=not progress)
    with bar:
        while not manifest.complete:
            parts = []
            for _ in range(manifest.chunks_per_shard):
                parts.append(next(chunks))
                # Per chunk, not per shard: a shard of model passes with gradients takes minutes.
                bar.update(len(parts[-1][manifest.hooks[0]]))
            shard = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            name = f"shard_{len(manifest.shards):05d}.safetensors"
            write_tensors(folder / name, shard)
            n_tokens = len(shard[manifest.hooks[0]])
            manifest.widths = {key: int(v.shape[1]) for key, v in shard.items()}
            manifest.dtype = str(shard[manifest.hooks[0]].dtype).removeprefix("torch.")
            manifest.shards.append({"file": name, "tokens": n_tokens})
            write_json(folder / MANIFEST, asdict(manifest))
    return manifest


class StoreChunks:
    """A chunk source over a finished store: one chunk per shard, restarting at the end."""

    def __init__(self, folder: str | Path, keys: list[str]):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest.complete:
            raise BadInput(
                f"{self.folder} is unfinished ({self.manifest.tokens} of {self.manifest.target_tokens} tokens); "
                f"run the same `interp cache` command again to finish it"
            )
        available = list(self.manifest.widths)
        missing = [k for k in keys if k not in available]
        if missing:
            hint = " (gradients are stored only by `interp cache --with-grads`)" if any(k.endswith(":grad") for k in missing) else ""
            raise BadInput(f"{self.folder} does not hold {missing}{hint}; it holds {available}")
        self.keys = keys

    def chunks(self, start: int = 0, every: int = 1, offset: int = 0) -> Iterator[Activations]:
        """Shards `offset + every * j` for j >= start (and round again at the end)."""
        shards = self.manifest.shards
        index = offset + every * start
        while True:
            shard = shards[index % len(shards)]
            path = self.folder / shard["file"]
            try:
                tensors = load_file(path)
            except (SafetensorError, OSError) as err:
                raise BadInput(f"{path} is corrupt or missing: {err}; re-run `interp cache` into a new folder") from err
            yield {key: tensors[key] for key in self.keys}
            index += every


def store_keys(hooks: list[str], with_grads: bool) -> list[str]:
    return [key for hook in hooks for key in ([hook, grad_key(hook)] if with_grads else [hook])]
