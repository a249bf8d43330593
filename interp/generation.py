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

Every sample of every prompt is one row of one batch, each row with its own generator seeded by
its sample's seed, so sample i of a prompt is the same whether it is drawn alone or with others.
Prompts of different lengths are left-padded to a common width; an attention mask keeps every
row from attending to padding and each row's position ids count from its own BOS, so a row is
decoded as if it were alone. The bridge hands both to the Hugging Face model (`attention_mask`
as given, `position_ids` as a keyword it passes through), for full passes and cached steps
alike; the padded batch is used only where `padding_exact` finds it gives each row's logits
alone (else each prompt is its own batch), and the cache with padding only where
`kv_cache_exact(model, padded=True)` does.

Interventions that must know where they are in the sequence (steering at chosen positions) come
as `during`, a context manager built from a `Window` that `decode` keeps current: before each
forward pass, `start` is the batch column where the pass begins, and the window turns columns
into each row's own positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from interp.errors import BadInput

log = logging.getLogger(__name__)

# A fixed probe for the checks: enough positions that a cache which drops earlier keys, or
# offsets positions, changes the logits; its second row is shorter by _PROBE_PAD, so in a batch
# it is left-padded.
_PROBE_PREFIX, _PROBE_STEPS, _PROBE_PAD = 5, 3, 2
# Largest difference between cached and full-pass logits, relative to their scale, that the check
# accepts: float rounding in a different order of operations (~1e-6 in float32) passes, a wrong
# cache (differences of the order of the logits) does not.
_CACHE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8}
_HALF_TOLERANCE = 3e-2


@dataclass
class Window:
    """Where the pass now running sits in the sequences being decoded: a batch whose rows are
    left-padded to a common width, each row's positions counted from its own BOS."""

    prompt_len_b: torch.Tensor | None = None
    """(batch,) tokens of each row's prompt (BOS included); a row's positions from here on are generated. None: no prompt (a plain forward pass)."""
    pad_b: torch.Tensor | None = None
    """(batch,) padding columns at the left of each row. None: no row is padded."""
    start: int = 0
    """Batch column where the current forward pass begins."""

    def positions(self, batch: int, seq_len: int, device) -> torch.Tensor:
        """(batch, seq_len) each column of the current pass as a position in its own row
        (negative on padding)."""
        cols = torch.arange(self.start, self.start + seq_len, device=device)
        pad_b = torch.zeros(1, dtype=cols.dtype, device=device) if self.pad_b is None else self.pad_b.to(device)
        return (cols[None] - pad_b[:, None]).expand(batch, seq_len)


During = Callable[[Window], AbstractContextManager]
"""Builds what is active on the model while decoding (hooks that read the window)."""


def decode(
    model,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]],
    max_new_tokens: int,
    seeds: Sequence[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_at_eos: bool = True,
    during: During | None = None,
    use_cache: bool | None = None,
) -> list[list[int]] | list[list[list[int]]]:
    """One continuation of `prompt_ids` per seed (token ids after the prompt; with `stop_at_eos`
    each ends at, and includes, the first EOS token). Given several prompts (a sequence of token
    id sequences), one such list per prompt, all decoded as one batch. `use_cache` None decides
    by the check."""
    if max_new_tokens < 1 or not seeds:
        raise BadInput("max_new_tokens and the number of samples must be at least 1")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise BadInput(f"temperature must be >= 0 and top_k >= 1, got {temperature} and {top_k}")
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    one = not prompt_ids or not isinstance(prompt_ids[0], (Sequence, torch.Tensor))
    prompts = [list(prompt_ids)] if one else [list(p.tolist() if isinstance(p, torch.Tensor) else p) for p in prompt_ids]
    if not prompts or not all(prompts):
        raise BadInput("the prompt has no tokens" if one else "every prompt needs tokens, and there must be at least one")
    padded = len({len(p) for p in prompts}) > 1
    if padded and not padding_exact(model):
        log.warning(
            "this model's logits change when a batch is left-padded with an attention mask; decoding each prompt as its own batch"
        )
        return [decode(model, p, max_new_tokens, seeds, temperature, top_k, stop_at_eos, during, use_cache) for p in prompts]
    cached = cache_usable(model, padded) if use_cache is None else use_cache
    log.debug("decoding %d prompt(s) %s", len(prompts), "with the key-value cache" if cached else "by full forward passes")
    rows = _decode_rows(model, prompts, max_new_tokens, seeds, temperature, top_k, stop_at_eos, during, cached)
    by_prompt = [rows[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(prompts))]
    return by_prompt[0] if one else by_prompt


def _decode_rows(model, prompts: list[list[int]], max_new_tokens: int, seeds: Sequence[int], temperature: float,
                 top_k: int | None, stop_at_eos: bool, during: During | None, cached: bool) -> list[list[int]]:
    """The continuation of every row, a row per (prompt, seed), prompt-major."""
    device = model.cfg.device
    width = max(len(p) for p in prompts)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    rows = [p for p in prompts for _ in seeds]
    tokens_bt = torch.tensor([[pad_id] * (width - len(p)) + p for p in rows], device=device)
    pad_b = torch.tensor([width - len(p) for p in rows], device=device)
    mask_bt = (torch.arange(width, device=device)[None] >= pad_b[:, None]).long()
    pos_bt = (torch.arange(width, device=device)[None] - pad_b[:, None]).clamp_min(0)
    generators = [torch.Generator().manual_seed(int(s)) for _ in prompts for s in seeds]
    window = Window(prompt_len_b=torch.tensor([len(p) for p in rows], device=device), pad_b=pad_b)
    eos = model.tokenizer.eos_token_id if stop_at_eos else None
    done = [False] * len(rows)
    out: list[list[int]] = [[] for _ in rows]
    cache = None
    with torch.no_grad(), during(window) if during else nullcontext():
        for _ in range(max_new_tokens):
            if cached:
                window.start = 0 if cache is None else tokens_bt.shape[1] - 1
                step = slice(window.start, None)
                logits, cache = model(tokens_bt[:, step], return_type="logits_and_cache", use_cache=True, past_key_values=cache,
                                      attention_mask=mask_bt, position_ids=pos_bt[:, step])
            else:
                window.start = 0
                logits = model(tokens_bt, attention_mask=mask_bt, position_ids=pos_bt)
            next_ids = sample_next(logits[:, -1].float(), temperature, top_k, generators)
            for row, token in enumerate(next_ids.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = token == eos
            if all(done):
                break
            tokens_bt = torch.cat([tokens_bt, next_ids.to(device)[:, None]], dim=1)
            mask_bt = torch.cat([mask_bt, torch.ones_like(mask_bt[:, -1:])], dim=1)
            pos_bt = torch.cat([pos_bt, pos_bt[:, -1:] + 1], dim=1)
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


def cache_usable(model, padded: bool = False) -> bool:
    """Whether `decode` may use the key-value cache (for a left-padded batch if `padded`): no hooks
    of anyone else's are on the model (they expect whole sequences) and the cache gives the logits
    of full forward passes."""
    if foreign_hooks(model):
        log.debug("hooks are active on the model: decoding by full forward passes")
        return False
    if not kv_cache_exact(model, padded):
        log.warning(
            "this model's key-value-cached decoding%s disagrees with full forward passes (a transformers or "
            "TransformerLens version interp was not tested with?); decoding by full forward passes, which is slower",
            " of a padded batch" if padded else "",
        )
        return False
    return True


def foreign_hooks(model) -> bool:
    """Whether any forward hook is registered on the model's hook points right now."""
    return any(point.fwd_hooks for point in {id(p): p for p in model.hook_dict.values()}.values())


def _probe(model, padded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(tokens, attention mask, position ids) of the probe batch, and each row's full-pass logits
    when the model reads that row alone, unpadded. With `padded` a second, shorter row is added,
    left-padded."""
    vocab, device = model.cfg.d_vocab, model.cfg.device
    n = _PROBE_PREFIX + _PROBE_STEPS
    rows = [torch.arange(1, n + 1, device=device) * 7919 % vocab]
    if padded:
        rows.append(torch.arange(1, n - _PROBE_PAD + 1, device=device) * 104729 % vocab)
    pad_b = torch.tensor([n - len(r) for r in rows], device=device)
    tokens_bt = torch.stack([torch.cat([r.new_zeros(n - len(r)), r]) for r in rows])
    cols = torch.arange(n, device=device)[None]
    alone = [model(r[None])[0] for r in rows]
    return tokens_bt, (cols >= pad_b[:, None]).long(), (cols - pad_b[:, None]).clamp_min(0), alone


def _agrees(got_bsv: torch.Tensor, alone: list[torch.Tensor]) -> bool:
    """Whether each row's last len(got) positions of logits are those of the row read alone."""
    reference = torch.stack([a[-got_bsv.shape[1] :] for a in alone]).float()
    tolerance = _CACHE_TOLERANCE.get(alone[0].dtype, _HALF_TOLERANCE)
    scale = reference.abs().max().clamp_min(1.0)
    return bool(((got_bsv.float() - reference).abs().max() / scale) <= tolerance)


@torch.no_grad()
def padding_exact(model) -> bool:
    """Read a fixed probe batch with one row left-padded, under the attention mask and each row's
    own position ids, and compare every row's logits on its real tokens with those of the row
    read alone."""
    tokens_bt, mask_bt, pos_bt, alone = _probe(model, padded=True)
    logits = model(tokens_bt, attention_mask=mask_bt, position_ids=pos_bt)
    return all(_agrees(logits[row : row + 1, -len(a) :], [a]) for row, a in enumerate(alone))


@torch.no_grad()
def kv_cache_exact(model, padded: bool = False) -> bool:
    """Decode a fixed probe twice, by full forward passes and by the bridge's key-value cache, and
    compare the logits of every cached step with those of the full pass at the same position.
    With `padded` the probe is a batch with a left-padded row, decoded under the attention mask
    and each row's own position ids as `decode` does, each row compared with itself alone."""
    tokens_bt, mask_bt, pos_bt, alone = _probe(model, padded)
    logits, cache = model(tokens_bt[:, :_PROBE_PREFIX], return_type="logits_and_cache", use_cache=True,
                          attention_mask=mask_bt[:, :_PROBE_PREFIX], position_ids=pos_bt[:, :_PROBE_PREFIX])
    steps = [logits[:, -1]]
    for col in range(_PROBE_PREFIX, _PROBE_PREFIX + _PROBE_STEPS):
        logits, cache = model(tokens_bt[:, col : col + 1], return_type="logits_and_cache", past_key_values=cache,
                              attention_mask=mask_bt[:, : col + 1], position_ids=pos_bt[:, col : col + 1])
        steps.append(logits[:, -1])
    return _agrees(torch.stack(steps, dim=1), alone)
