"""Decode text from a model, exactly as a loop of full forward passes would.

The reference is the plain loop: run the model on the whole sequence, take the last position's
logits, pick the next token (argmax at temperature 0; otherwise a draw from softmax(logits / T),
restricted to the top k, with the sample's own seeded generator), append, repeat. `decode`
produces exactly those tokens. It gets there faster by a key-value cache (each step then runs one
new position), but only where the cache is known to be right: `kv_cache_exact` checks the
bridge's cached decode against full forward passes before it is used, because a transformers
release can break it silently (transformers 5.24 renamed the cache argument that TransformerLens
4.3's attention reads, so every cached step attended to itself alone and text came out as
garbage). Hooks that someone else put on the model also turn the cache off: they expect to see
whole sequences, as in any forward pass.

"Exactly" is up to floating-point rounding: cached and batched passes multiply matrices of other
shapes, so logits that tie to within rounding could break differently (the check's tolerance is
that rounding); the tests find every token the same.

Samples of one prompt run as one batch (the rows need no padding), each with its own generator
seeded by its seed, so sample i is the same whether it is drawn alone or with others.

Interventions that must know where they are in the sequence (steering at chosen positions) come
as `during`, a context manager built from a `Window` that `decode` keeps current: before each
forward pass, `start` is the absolute position of the pass's first column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from interp.errors import BadInput

log = logging.getLogger(__name__)

# A fixed probe for the cache check: enough positions that a cache which drops earlier keys, or
# offsets positions, changes the logits.
_PROBE_PREFIX, _PROBE_STEPS = 5, 3
# Largest difference between cached and full-pass logits, relative to their scale, that the check
# accepts: float rounding in a different order of operations (~1e-6 in float32) passes, a wrong
# cache (differences of the order of the logits) does not.
_CACHE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 3e-2


@dataclass
class Window:
    """Where the pass now running sits in the sequence being decoded."""

    prompt_len: int
    """Tokens of the prompt (BOS included); positions from here on are generated."""
    start: int = 0
    """Absolute position of the first column of the current forward pass."""


During = Callable[[Window], AbstractContextManager]
"""Builds what is active on the model while decoding (hooks that read the window)."""


def decode(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    seeds: Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    during: During | None = None,
    use_cache: bool | None = None,
) -> list[list[int]]:
    """One continuation of `prompt_ids` per seed (token ids after the prompt; with `stop_at_eos`
    each ends at, and includes, the first EOS token). `use_cache` None decides by the check."""
    if max_new_tokens < 1 or not seeds:
        raise BadInput("max_new_tokens and the number of samples must be at least 1")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise BadInput(f"temperature must be >= 0 and top_k >= 1, got {temperature} and {top_k}")
    if not prompt_ids:
        raise BadInput("the prompt has no tokens")
    cached = cache_usable(model) if use_cache is None else use_cache
    log.debug("decoding %s", "with the key-value cache" if cached else "by full forward passes")
    device = model.cfg.device
    tokens = torch.tensor([list(prompt_ids)] * len(seeds), device=device)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    window = Window(prompt_len=tokens.shape[1])
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    done = [False] * len(seeds)
    out: list[list[int]] = [[] for _ in seeds]
    cache = None
    with torch.no_grad(), during(window) if during else nullcontext():
        for _ in range(max_new_tokens):
            if cached:
                window.start = 0 if cache is None else tokens.shape[1] - 1
                step_in = tokens if cache is None else tokens[:, -1:]
                logits, cache = model(step_in, return_type="logits_and_cache", use_cache=True, past_key_values=cache)
            else:
                window.start = 0
                logits = model(tokens)
            next_ids = sample_next(logits[:, -1].float(), temperature, top_k, generators)
            for row, token in enumerate(next_ids.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = token == eos
            if all(done):
                break
            tokens = torch.cat([tokens, next_ids.to(device)[:, None]], dim=1)
    return out


def sample_next(
    logits_bv: torch.Tensor, temperature: float, top_k: int | None, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """(batch,) next tokens: argmax at temperature 0, else one draw per row from softmax(logits /
    T) over the logits at least as large as the k-th largest, using that row's generator."""
    if temperature == 0:
        return logits_bv.argmax(-1).cpu()
    scores = logits_bv / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(-1).cpu()
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def cache_usable(model) -> bool:
    """Whether `decode` may use the key-value cache: no hooks of anyone else's are on the model
    (they expect whole sequences) and the cache gives the logits of full forward passes."""
    if foreign_hooks(model):
        log.debug("hooks are active on the model: decoding by full forward passes")
        return False
    if not kv_cache_exact(model):
        log.warning(
            "this model's key-value-cached decoding disagrees with full forward passes (a transformers or "
            "TransformerLens version interp was not tested with?); decoding by full forward passes, which is slower"
        )
        return False
    return True


def foreign_hooks(model) -> bool:
    """Whether any forward hook is registered on the model's hook points right now."""
    return any(point.fwd_hooks for point in {id(p): p for p in model.hook_dict.values()}.values())


@torch.no_grad()
def kv_cache_exact(model) -> bool:
    """Decode a fixed probe twice, by full forward passes and by the bridge's key-value cache, and
    compare the logits of every cached step with those of the full pass at the same position."""
    vocab = model.cfg.d_vocab
    probe = torch.arange(1, _PROBE_PREFIX + _PROBE_STEPS + 1, device=model.cfg.device)[None] * 7919 % vocab
    full = model(probe)
    tolerance = _CACHE_TOLERANCE.get(full.dtype, _HALF_TOLERANCE)
    full = full.float()
    logits, cache = model(probe[:, :_PROBE_PREFIX], return_type="logits_and_cache", use_cache=True)
    steps = [logits[:, -1].float()]
    for pos in range(_PROBE_PREFIX, _PROBE_PREFIX + _PROBE_STEPS):
        logits, cache = model(probe[:, pos : pos + 1], return_type="logits_and_cache", past_key_values=cache)
        steps.append(logits[:, -1].float())
    cached = torch.stack(steps, dim=1)
    reference = full[:, _PROBE_PREFIX - 1 :]
    scale = reference.abs().max().clamp_min(1.0)
    return bool(((cached - reference).abs().max() / scale) <= tolerance)
