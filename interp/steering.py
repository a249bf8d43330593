"""Change what the model does by editing activations at a hook: add a direction (a feature's
decoder row or any vector) times a strength, or scale, clamp or ablate features through a sparse
coder while keeping its reconstruction error, so every feature left alone stays exactly as it was.

    with steer(model, add_feature(coder, 123, strength=8.0)):
        model.generate("The weather today", max_new_tokens=20)

    pair = compare_generations(model, "The weather today", [ablate(coder, 123)], seed=0)

Units: a feature's strength, clamp value and activation are all in the coder's activation units
(what `coder.encode` returns), so adding a feature at strength s adds exactly what the coder's
decoder would add if the feature fired at s. A raw direction is added as given, times strength.

Positions: `steer` tracks the absolute position of each column a hook sees, including during
KV-cached generation, where the first forward pass holds the whole prompt and each later pass one
new token. `positions` is "all", "new" (only positions past the prompt: the first pass seen since
the context was entered is the prompt), or a list of positions. Position 0 is never edited: it is
the BOS token, an attention sink that the coders were not trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch

from interp.models import check_hooks, hook_shapes
from interp.sae.base import SparseCoder

Positions = Union[str, Sequence[int]]


@dataclass
class AddDirection:
    """Add `strength * direction_d` to the activation at `hook`."""

    hook: str
    direction_d: torch.Tensor
    strength: float


@dataclass
class FeatureEdit:
    """Rewrite one feature's activation through `coder`: the activation at the coder's output hook
    becomes x + (new - old) * decoder row, so the coder's reconstruction error and every other
    feature are untouched."""

    coder: SparseCoder
    feature: int
    scale: float | None = None
    """Multiply the feature's activation by this (0 ablates it)."""
    clamp: float | None = None
    """Set the feature's activation to this value wherever the edit applies, fired or not."""

    def new_values(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.scale if self.clamp is None else torch.full_like(values, self.clamp)


Intervention = Union[AddDirection, FeatureEdit]


def check_feature(coder: SparseCoder, feature: int) -> int:
    n = coder.cfg.n_latents
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n:
        raise ValueError(f"feature {feature!r} is out of range: the coder has {n} latents (0 to {n - 1})")
    return feature


def check_finite(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def output_hook(coder: SparseCoder) -> str:
    """The hook a coder writes: its target for a transcoder, else the hook it reads."""
    return coder.cfg.target_hook or coder.cfg.hook


def feature_direction(coder: SparseCoder, feature: int) -> torch.Tensor:
    """Feature `feature`'s decoder row in the model's units (at `output_hook(coder)`): what the
    coder adds to its reconstruction per unit of the feature's activation."""
    check_feature(coder, feature)
    return (coder.W_dec[feature] / coder.out_scale).detach()


def add_feature(coder: SparseCoder, feature: int, strength: float, hook: str | None = None) -> AddDirection:
    """Add feature `feature`'s decoder direction at `strength` (activation units). Its direction
    only means something at the hook the coder writes; any other `hook` is an error."""
    written = output_hook(coder)
    if hook is not None and hook != written:
        raise ValueError(
            f"the coder was trained on {written!r}; its feature directions cannot be added at {hook!r}"
        )
    return AddDirection(written, feature_direction(coder, feature), check_finite("strength", strength))


def add_direction(hook: str, direction_d: torch.Tensor, strength: float) -> AddDirection:
    return AddDirection(hook, torch.as_tensor(direction_d).detach(), check_finite("strength", strength))


def clamp(coder: SparseCoder, feature: int, value: float) -> FeatureEdit:
    return FeatureEdit(coder, check_feature(coder, feature), clamp=check_finite("clamp value", value))


def scale(coder: SparseCoder, feature: int, factor: float) -> FeatureEdit:
    return FeatureEdit(coder, check_feature(coder, feature), scale=check_finite("scale", factor))


def ablate(coder: SparseCoder, feature: int) -> FeatureEdit:
    return scale(coder, feature, 0.0)


class _PositionTracker:
    """The absolute positions of the columns one hook point sees, pass after pass."""

    def __init__(self, positions: Positions):
        if isinstance(positions, str) and positions not in ("all", "new"):
            raise ValueError(f"positions must be 'all', 'new' or a list of positions, not {positions!r}")
        if not isinstance(positions, str) and any(not isinstance(p, int) or p < 0 for p in positions):
            raise ValueError(f"positions must be non-negative integers, got {list(positions)}")
        self.positions = positions
        self.next = 0
        self.prompt_len: int | None = None

    def mask(self, seq_len: int, device) -> torch.Tensor:
        # A one-column pass after an earlier pass continues a KV-cached generation; any other pass
        # starts a sequence at position 0.
        start = self.next if seq_len == 1 and self.next > 0 else 0
        if self.prompt_len is None:
            self.prompt_len = seq_len
        self.next = start + seq_len
        pos = torch.arange(start, start + seq_len, device=device)
        if self.positions == "all":
            keep = torch.ones_like(pos, dtype=torch.bool)
        elif self.positions == "new":
            keep = pos >= self.prompt_len
        else:
            keep = torch.isin(pos, torch.tensor(list(self.positions), device=device, dtype=pos.dtype))
        return keep & (pos > 0)


def _flat(act: torch.Tensor) -> torch.Tensor:
    """(batch, pos, *dims) -> (batch, pos, features): hook_z heads concatenated."""
    return act.reshape(*act.shape[:2], -1)


def check_coder_fits(model, coder: SparseCoder) -> None:
    """Raise unless the model has the coder's hooks, at the widths the coder was trained on."""
    hooks = list(dict.fromkeys([coder.cfg.hook, output_hook(coder)]))
    try:
        check_hooks(model, hooks)
    except ValueError as err:
        raise ValueError(f"the coder was trained on {coder.cfg.model or 'another model'}: {err}") from None
    shapes = hook_shapes(model)
    for hook, width in ((coder.cfg.hook, coder.cfg.d_in), (output_hook(coder), coder.cfg.d_out)):
        if math.prod(shapes[hook]) != width:
            raise ValueError(
                f"the coder expects width {width} at {hook}, but this model's {hook} has shape {shapes[hook]}; "
                f"was the coder trained on this model ({coder.cfg.model or 'unknown'})?"
            )


@contextmanager
def steer(model, *interventions: Intervention, positions: Positions = "all") -> Iterator[None]:
    """Apply `interventions` to every forward pass (and `generate` call) of `model` inside the
    block; several at once compose (each feature edit reads the coder's clean code)."""
    fwd_hooks = []
    hook_widths = None
    for add in (i for i in interventions if isinstance(i, AddDirection)):
        hook_widths = hook_widths or hook_shapes(model)
        check_hooks(model, [add.hook])
        if math.prod(hook_widths[add.hook]) != add.direction_d.numel():
            raise ValueError(
                f"the direction has {add.direction_d.numel()} entries but {add.hook} has shape {hook_widths[add.hook]}"
            )
        fwd_hooks.append((model.hook_dict[add.hook].name, _add_hook(add, _PositionTracker(positions))))
    edits_by_coder: dict[int, list[FeatureEdit]] = {}
    for edit in (i for i in interventions if isinstance(i, FeatureEdit)):
        edits_by_coder.setdefault(id(edit.coder), []).append(edit)
    for edits in edits_by_coder.values():
        check_coder_fits(model, edits[0].coder)
        fwd_hooks.extend(_edit_hooks(model, edits, _PositionTracker(positions)))
    with model.hooks(fwd_hooks=fwd_hooks):
        yield


def _add_hook(add: AddDirection, tracker: _PositionTracker):
    def hook_fn(act, hook):
        keep = tracker.mask(act.shape[1], act.device)
        delta = (add.strength * add.direction_d.to(act.device, act.dtype)).reshape(act.shape[2:])
        return act + keep.view(1, -1, *([1] * (act.dim() - 2))) * delta

    return hook_fn


def _edit_hooks(model, edits: list[FeatureEdit], tracker: _PositionTracker) -> list:
    coder = edits[0].coder
    read_name = model.hook_dict[coder.cfg.hook].name
    write_name = model.hook_dict[output_hook(coder)].name
    features = torch.tensor([e.feature for e in edits], device=coder.W_dec.device)
    rows_fd = coder.W_dec[features].detach() / coder.out_scale
    seen: dict[str, torch.Tensor] = {}

    def read(act, hook):
        seen["x"] = _flat(act)
        return act

    def write(act, hook):
        x_bsd = _flat(act) if read_name == write_name else seen.pop("x")
        b, s = x_bsd.shape[:2]
        keep_s = tracker.mask(s, act.device)
        with torch.no_grad():
            code = coder.encode(x_bsd.reshape(b * s, -1).to(coder.W_dec.device))
        # The clean activation of each edited feature per token: sum over the slots holding it.
        match_tkf = code.indices_bk[:, :, None] == features
        old_tf = (code.values_bk[:, :, None] * match_tkf).sum(1)
        new_tf = torch.stack([e.new_values(old_tf[:, j]) for j, e in enumerate(edits)], dim=1)
        delta_td = (new_tf - old_tf) @ rows_fd
        delta_bsd = delta_td.reshape(b, s, -1).to(act.device, act.dtype) * keep_s[None, :, None]
        return (_flat(act) + delta_bsd).reshape(act.shape)

    hooks = [(write_name, write)]
    if read_name != write_name:
        hooks.insert(0, (read_name, read))
    return hooks


class GenerationPair(NamedTuple):
    prompt: str
    baseline: list[str]
    """Unsteered continuations (new text only), one per sample."""
    steered: list[str]
    """Steered continuations, sampled with the same seeds."""
    baseline_tokens: list[list[int]]
    """Token ids of the unsteered continuations."""
    steered_tokens: list[list[int]]
    """Token ids of the steered continuations."""


@dataclass
class GenerateConfig:
    max_new_tokens: int = 40
    """Tokens to generate after the prompt."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_k: int | None = None
    """Sample only among the k likeliest tokens."""
    samples: int = 1
    """Continuations per side, sample i of both sides drawn with seed + i."""
    seed: int = 0
    """Seed of the first sample."""
    positions: list[int] | str = field(default="all")
    """Where to steer: 'all', 'new' (generated tokens only) or a list of positions (BOS is never steered)."""


def generate(model, prompt: str, cfg: GenerateConfig, seed: int) -> list[int]:
    """The token ids of one continuation of `prompt`, reproducible from `seed`."""
    tokens = model.to_tokens(prompt)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            tokens, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
            temperature=cfg.temperature if cfg.temperature > 0 else 1.0, top_k=cfg.top_k,
            stop_at_eos=False, verbose=False, return_type="tokens",
        )
    return out[0, tokens.shape[1]:].tolist()


def compare_generations(
    model, prompt: str, interventions: Sequence[Intervention], cfg: GenerateConfig | None = None
) -> GenerationPair:
    """Baseline and steered continuations of `prompt`, sample by sample with the same seed, so
    any difference comes from the steering."""
    cfg = cfg or GenerateConfig()
    if cfg.samples < 1 or cfg.max_new_tokens < 1:
        raise ValueError("samples and max_new_tokens must be at least 1")
    check_finite("temperature", cfg.temperature)
    seeds = [cfg.seed + i for i in range(cfg.samples)]
    baseline = [generate(model, prompt, cfg, s) for s in seeds]
    steered = []
    for s in seeds:
        # A fresh context per sample: its position tracking starts at the new prompt.
        with steer(model, *interventions, positions=cfg.positions):
            steered.append(generate(model, prompt, cfg, s))
    decode = model.tokenizer.decode
    return GenerationPair(prompt, [decode(t) for t in baseline], [decode(t) for t in steered], baseline, steered)
