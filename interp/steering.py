"""Change what the model does by editing activations at a hook: add a direction (a feature's
decoder row or any vector) times a strength, or scale, clamp or ablate features through a sparse
coder while keeping its reconstruction error, so every feature left alone stays exactly as it was.

    tokens = generate(model, "The weather today", GenerateConfig(max_new_tokens=20), [add_feature(coder, 123, 8.0)])
    pair = compare_generations(model, "The weather today", [ablate(coder, 123)])
    with steer(model, ablate(coder, 123)):
        logits = model(tokens)

Units: a feature's strength, clamp value and activation are all in the coder's activation units
(what `coder.encode` returns), so adding a feature at strength s adds exactly what the coder's
decoder would add if the feature fired at s. A raw direction is added as given, times strength.

Positions: "all", "new" (the generated tokens only: a generation's business, so `generate` and
`compare_generations` take it) or a list of absolute positions. While generating, the decoder in
interp.generation tells the hooks where each forward pass starts, so positions mean the same with
the key-value cache as without. `steer` edits forward passes over whole sequences. Position 0 is
never edited: it is the BOS token, an attention sink that the coders were not trained on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch

from interp.generation import Window, decode
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


def check_positions(positions: Positions, generating: bool) -> Positions:
    """Raise unless `positions` is "all", "new" (only while generating) or non-negative integers."""
    if isinstance(positions, str):
        if positions == "new" and not generating:
            raise ValueError(
                "positions='new' means the generated tokens: pass the interventions to generate() or "
                "compare_generations(); a forward pass under steer() takes 'all' or a list of positions"
            )
        if positions not in ("all", "new"):
            raise ValueError(f"positions must be 'all', 'new' or a list of positions, not {positions!r}")
        return positions
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
        raise ValueError(f"positions must be non-negative integers, got {list(positions)}")
    return list(positions)


def _position_mask(positions: Positions, window: Window, seq_len: int, device) -> torch.Tensor:
    """(seq_len,) bool: which columns of the pass now running get edited; never position 0 (BOS)."""
    pos = torch.arange(window.start, window.start + seq_len, device=device)
    if positions == "all":
        keep = torch.ones_like(pos, dtype=torch.bool)
    elif positions == "new":
        keep = pos >= window.prompt_len
    else:
        keep = torch.isin(pos, torch.tensor(positions, device=device, dtype=pos.dtype))
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


def check_interventions(model, interventions: Sequence[Intervention]) -> None:
    """Raise unless every intervention fits the model: known hooks, matching widths."""
    hook_widths = None
    for add in (i for i in interventions if isinstance(i, AddDirection)):
        hook_widths = hook_widths or hook_shapes(model)
        check_hooks(model, [add.hook])
        if math.prod(hook_widths[add.hook]) != add.direction_d.numel():
            raise ValueError(
                f"the direction has {add.direction_d.numel()} entries but {add.hook} has shape {hook_widths[add.hook]}"
            )
    for coder in {id(i.coder): i.coder for i in interventions if isinstance(i, FeatureEdit)}.values():
        check_coder_fits(model, coder)


def intervention_hooks(model, interventions: Sequence[Intervention], positions: Positions, window: Window) -> list:
    """(hook name, function) pairs applying `interventions` at `positions` of the pass that
    `window` describes; several compose (each feature edit reads the coder's clean code)."""
    fwd_hooks = [(model.hook_dict[i.hook].name, _add_hook(i, positions, window)) for i in interventions if isinstance(i, AddDirection)]
    edits_by_coder: dict[int, list[FeatureEdit]] = {}
    for edit in (i for i in interventions if isinstance(i, FeatureEdit)):
        edits_by_coder.setdefault(id(edit.coder), []).append(edit)
    for edits in edits_by_coder.values():
        fwd_hooks.extend(_edit_hooks(model, edits, positions, window))
    return fwd_hooks


@contextmanager
def steer(model, *interventions: Intervention, positions: Positions = "all") -> Iterator[None]:
    """Apply `interventions` to every forward pass of `model` inside the block, each pass a whole
    sequence from position 0. To steer a generation, pass them to `generate` instead."""
    positions = check_positions(positions, generating=False)
    check_interventions(model, interventions)
    with model.hooks(fwd_hooks=intervention_hooks(model, interventions, positions, Window(prompt_len=0))):
        yield


def _add_hook(add: AddDirection, positions: Positions, window: Window):
    def hook_fn(act, hook):
        keep = _position_mask(positions, window, act.shape[1], act.device)
        delta = (add.strength * add.direction_d.to(act.device, act.dtype)).reshape(act.shape[2:])
        return act + keep.view(1, -1, *([1] * (act.dim() - 2))) * delta

    return hook_fn


def _edit_hooks(model, edits: list[FeatureEdit], positions: Positions, window: Window) -> list:
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
        keep_s = _position_mask(positions, window, s, act.device)
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
    stop_at_eos: bool = True
    """End a continuation at the tokenizer's end-of-sequence token (kept as its last token)."""


def generate(model, prompt: str, cfg: GenerateConfig | None = None, interventions: Sequence[Intervention] = ()) -> list[list[int]]:
    """Token ids of `cfg.samples` continuations of `prompt` (sample i drawn with seed + i), with
    `interventions` applied at `cfg.positions`: exactly what a loop of full forward passes under
    the same interventions would produce (see interp.generation)."""
    cfg = cfg or GenerateConfig()
    if cfg.samples < 1 or cfg.max_new_tokens < 1:
        raise ValueError("samples and max_new_tokens must be at least 1")
    temperature = check_finite("temperature", cfg.temperature)
    positions = check_positions(cfg.positions, generating=True)
    check_interventions(model, interventions)
    hooks = (lambda window: intervention_hooks(model, interventions, positions, window)) if interventions else None
    return decode(
        model, model.to_tokens(prompt)[0].tolist(), cfg.max_new_tokens, [cfg.seed + i for i in range(cfg.samples)],
        temperature=temperature, top_k=cfg.top_k, stop_at_eos=cfg.stop_at_eos, hooks=hooks,
    )


def compare_generations(
    model, prompt: str, interventions: Sequence[Intervention], cfg: GenerateConfig | None = None
) -> GenerationPair:
    """Baseline and steered continuations of `prompt`, sample by sample with the same seed, so
    any difference comes from the steering."""
    cfg = cfg or GenerateConfig()
    baseline = generate(model, prompt, cfg)
    steered = generate(model, prompt, cfg, interventions)
    decode_text = model.tokenizer.decode
    return GenerationPair(prompt, [decode_text(t) for t in baseline], [decode_text(t) for t in steered], baseline, steered)
