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
`grad_key(hook)`, the gradient of the summed loss with respect to each hooked activation (for
gradient SAEs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

from interp.data import TokenBatch
from interp.models import check_hooks, stop_layer

log = logging.getLogger(__name__)

Activations = dict[str, torch.Tensor]


def grad_key(hook: str) -> str:
    return f"{hook}:grad"


class ModelChunks:
    """Activations at `hooks` for each token batch that `token_batches()` yields."""

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
        self.stop_at_layer = None if with_grads else stop_layer(model, self.hooks)

    def chunks(self, start: int = 0) -> Iterator[Activations]:
        index, epoch = 0, 0
        while True:
            produced = False
            for batch in self.token_batches():
                produced = True
                if index >= start:
                    yield self.run(batch)
                index += 1
            if not produced:
                raise ValueError(
                    "the dataset is too small for one batch of sequences; "
                    "use more text, a smaller --batch-size or a smaller --context-size"
                )
            epoch += 1
            log.warning("dataset exhausted after %d batches; starting epoch %d", index, epoch + 1)

    def run(self, batch: TokenBatch) -> Activations:
        device = self.model.cfg.device
        tokens = batch.tokens_bt.to(device)
        mask = batch.mask_bt.to(device)
        captured: dict[str, torch.Tensor] = {}

        def capture(act, hook):
            if self.with_grads:
                act = act.detach().requires_grad_(True)
                captured[hook.name] = act
                return act
            captured[hook.name] = act.detach()
            return act

        names = {h: self.model.hook_dict[h].name for h in self.hooks}
        fwd_hooks = [(name, capture) for name in set(names.values())]
        if self.with_grads:
            with torch.enable_grad():
                loss = self.model.run_with_hooks(
                    tokens, fwd_hooks=fwd_hooks, return_type="loss", loss_per_token=True
                )
                loss.sum().backward()
        else:
            with torch.no_grad():
                self.model.run_with_hooks(
                    tokens, fwd_hooks=fwd_hooks, return_type=None, stop_at_layer=self.stop_at_layer
                )
        out: Activations = {}
        for hook, name in names.items():
            act = captured[name]
            out[hook] = flatten_positions(act.detach(), mask)
            if self.with_grads:
                out[grad_key(hook)] = flatten_positions(act.grad, mask)
        return out


def flatten_positions(act: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """(batch, pos, *feature dims) -> (kept positions, prod(feature dims)); heads of hook_z are
    concatenated."""
    return act[mask_bt].reshape(int(mask_bt.sum()), -1)


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
            raise ValueError(
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
