"""Run the model with hooks and turn its activations into shuffled training batches.

Two layers:
- a *chunk source* yields, chunk after chunk, a dict {hook name: activations (tokens, d)} with
  BOS and padding positions already dropped. `ModelChunks` runs the model on token batches (one
  chunk per forward pass); `interp.activation_store.StoreChunks` reads shards cached on disk. A
  source restarts from its first chunk when the data runs out (a new epoch), and can start at any
  chunk index cheaply, which is what makes resuming exact.
- `ShuffleBuffer` fills a bounded buffer from a source, permutes it with a generator seeded by
  (seed, fill number), and drains it in batches. Its position is three integers (`BufferState`),
  so a killed run can rebuild the very same batches.

Several hooks come out of one forward pass, which stops after the deepest hooked block. With
`with_grads`, the pass instead runs to the next-token loss and also returns, under
`interp.hooks.grad_key(hook)`, the gradient of the summed loss with respect to each hooked
activation (for gradient SAEs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from interp.data import TokenBatch
from interp.errors import BadInput
from interp.hooks import Activations, capture
from interp.models import check_hooks

log = logging.getLogger(__name__)


class ModelChunks:
    """Activations at `hooks` for each token batch that `token_batches()` yields (see
    `interp.hooks.capture`), BOS and padding dropped."""

    def __init__(
        self,
        model,
        token_batches: Callable[[], Iterator[TokenBatch]],
        hooks: list[str],
        with_grads: bool = False,
    ):
        check_hooks(model, hooks)
        self.model = model
        self.token_batches = token_batches
        self.hooks = list(dict.fromkeys(hooks))
        self.with_grads = with_grads

    def chunks(self, start: int = 0, every: int = 1, offset: int = 0) -> Iterator[Activations]:
        """Chunks `offset + every * j` for j >= start (the model runs on no other batch)."""
        index, epoch = 0, 0
        while True:
            produced = False
            for batch in self.token_batches():
                produced = True
                if index % every == offset and index // every >= start:
                    yield capture(self.model, batch.tokens_bt, self.hooks, batch.mask_bt, self.with_grads)
                index += 1
            if not produced:
                raise BadInput(
                    "the dataset is too small for one batch of sequences; "
                    "use more text, a smaller --batch-size or a smaller --context-size"
                )
            epoch += 1
            log.warning("dataset exhausted after %d batches; starting epoch %d", index, epoch + 1)


class TensorChunks:
    """Activations already in memory ({key: (rows, d)}) as a chunk source: the whole of them is
    one chunk, and each epoch yields it again."""

    def __init__(self, acts: Activations):
        self.acts = acts

    def chunks(self, start: int = 0, every: int = 1, offset: int = 0) -> Iterator[Activations]:
        while True:
            yield self.acts


class Share:
    """One rank's share of a chunk source under data parallelism: chunks rank, rank + world,
    rank + 2 world, ...; its chunk j is the source's chunk rank + world j, so a resumed rank reads
    the same chunks again."""

    def __init__(self, source, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def chunks(self, start: int = 0) -> Iterator[Activations]:
        return self.source.chunks(start, every=self.world, offset=self.rank)


@dataclass
class BufferState:
    fill: int = 0
    """How many buffer fills were completed before the current one."""
    chunk: int = 0
    """Index of the first chunk of the current fill."""
    batch: int = 0
    """Batches already yielded from the current fill."""


class ShuffleBuffer:
    """Shuffled fixed-size batches from a chunk source, in memory bounded by `buffer_tokens`."""

    def __init__(self, source, buffer_tokens: int, batch_tokens: int, seed: int):
        if buffer_tokens < batch_tokens:
            raise BadInput(
                f"the shuffle buffer ({buffer_tokens} tokens) must hold at least one batch "
                f"({batch_tokens} tokens)"
            )
        self.source = source
        self.buffer_tokens = buffer_tokens
        self.batch_tokens = batch_tokens
        self.seed = seed
        self.state = BufferState()

    def batches(self, resume: BufferState | None = None) -> Iterator[Activations]:
        """Yield batches forever; `self.state` always says how to resume after the last one."""
        self.state = BufferState(**asdict(resume)) if resume else BufferState()
        chunks = self.source.chunks(self.state.chunk)
        while True:
            parts: list[Activations] = []
            n_tokens = used = 0
            while n_tokens < self.buffer_tokens:
                chunk = next(chunks)
                parts.append(chunk)
                n_tokens += len(next(iter(chunk.values())))
                used += 1
            buffer = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
            del parts
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.state.fill)
            order = torch.randperm(n_tokens, generator=generator)
            for j in range(self.state.batch, n_tokens // self.batch_tokens):
                rows = order[j * self.batch_tokens : (j + 1) * self.batch_tokens]
                self.state.batch = j + 1
                yield {key: acts[rows.to(acts.device)] for key, acts in buffer.items()}
            self.state = BufferState(fill=self.state.fill + 1, chunk=self.state.chunk + used, batch=0)
