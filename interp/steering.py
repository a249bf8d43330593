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
`compare_generations` take it) or a list of absolute positions. Positions are each sequence's
own, counted from its BOS: when several prompts of different lengths are generated as one
left-padded batch, "new" is each row's generated tokens, a listed position is that row's position,
and padding is never edited. While generating, the decoder in interp.generation tells the hooks
where each forward pass starts, so positions mean the same with the key-value cache as without.
`steer` edits forward passes over whole, unpadded sequences. Position 0 is never edited: it is the
BOS token, an attention sink that the coders were not trained on.

    pairs = compare_generations(model, ["The weather today", "Once upon a time"], [add_feature(coder, 123, 8.0)])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Union

import torch

from interp.errors import BadInput
from interp.generation import Window, decode
from interp.hooks import check_coder_fits, output_hook, splice
from interp.models import hook_widths
from interp.sae.base import SparseCode, SparseCoder

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

    def __post_init__(self):
        if (self.scale is None) == (self.clamp is None):
            raise BadInput("a feature edit either scales or clamps: give exactly one of scale and clamp")

    def new_values(self, values: torch.Tensor) -> torch.Tensor:
        return values * self.scale if self.clamp is None else torch.full_like(values, self.clamp)


Intervention = Union[AddDirection, FeatureEdit]


def check_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{name} must be a finite number, got {value!r}")
    return float(value)


def feature_direction(coder: SparseCoder, feature: int) -> torch.Tensor:
    """Feature `feature`'s decoder row in the model's units (at `output_hook(coder)`): what the
    coder adds to its reconstruction per unit of the feature's activation."""
    return coder.model_units().W_dec[coder.check_feature(feature)].detach()


def add_feature(coder: SparseCoder, feature: int, strength: float, hook: str | None = None) -> AddDirection:
    """Add feature `feature`'s decoder direction at `strength` (activation units). Its direction
    only means something at the hook the coder writes; any other `hook` is an error."""
    written = output_hook(coder)
    if hook is not None and hook != written:
        raise BadInput(
            f"the coder was trained on {written!r}; its feature directions cannot be added at {hook!r}"
        )
    return AddDirection(written, feature_direction(coder, feature), check_finite("strength", strength))


def add_direction(hook: str, direction_d: torch.Tensor, strength: float) -> AddDirection:
    return AddDirection(hook, torch.as_tensor(direction_d).detach(), check_finite("strength", strength))


def clamp(coder: SparseCoder, feature: int, value: float) -> FeatureEdit:
    return FeatureEdit(coder, coder.check_feature(feature), clamp=check_finite("clamp value", value))


def scale(coder: SparseCoder, feature: int, factor: float) -> FeatureEdit:
    return FeatureEdit(coder, coder.check_feature(feature), scale=check_finite("scale", factor))


def ablate(coder: SparseCoder, feature: int) -> FeatureEdit:
    return scale(coder, feature, 0.0)


def activate_code(coder: SparseCoder, code: int) -> FeatureEdit:
    """Turn a discrete coder's code on wherever it is off (Tamkin et al. activate codes so): its
    activation clamped through the coder to the code's norm, the coder's error kept."""
    if not coder.discrete:
        raise BadInput(f"only a discrete coder (codebook) has codes to activate; a {coder.arch} coder's features take --clamp VALUE")
    return clamp(coder, code, float(coder.code_norm.detach()[coder.check_feature(code)]))


def parse_positions(text: str) -> Positions:
    """'all', 'new' or comma-separated positions ('3,4,5'), as the command line gives them."""
    if text in ("all", "new"):
        return text
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise BadInput(f"positions must be 'all', 'new' or comma-separated positions like 3,4,5; got {text!r}") from None


def check_positions(positions: Positions, generating: bool) -> Positions:
    """Raise unless `positions` is "all", "new" (only while generating) or non-negative integers."""
    if isinstance(positions, str):
        if positions == "new" and not generating:
            raise BadInput(
                "positions='new' means the generated tokens: pass the interventions to generate() or "
                "compare_generations(); a forward pass under steer() takes 'all' or a list of positions"
            )
        if positions not in ("all", "new"):
            raise BadInput(f"positions must be 'all', 'new' or a list of positions, not {positions!r}")
        return positions
    if any(isinstance(p, bool) or not isinstance(p, int) or p < 0 for p in positions):
        raise BadInput(f"positions must be non-negative integers, got {list(positions)}")
    return list(positions)


def _position_mask(positions: Positions, window: Window, batch: int, seq_len: int, device) -> torch.Tensor:
    """(batch, seq_len) bool: which columns of the pass now running get edited, by each row's
    own positions; never a row's position 0 (BOS), never padding."""
    pos_bs = window.positions(batch, seq_len, device)
    if positions == "all":
        keep_bs = torch.ones_like(pos_bs, dtype=torch.bool)
    elif positions == "new":
        keep_bs = pos_bs >= window.prompt_len_b.to(device)[:, None]
    else:
        keep_bs = torch.isin(pos_bs, torch.tensor(positions, device=device, dtype=pos_bs.dtype))
    return keep_bs & (pos_bs > 0)


def check_interventions(model, interventions: Sequence[Intervention]) -> None:
    """Raise unless every intervention fits the model: known hooks, matching widths."""
    adds = [i for i in interventions if isinstance(i, AddDirection)]
    widths = hook_widths(model, [add.hook for add in adds]) if adds else {}
    for add in adds:
        if widths[add.hook] != add.direction_d.numel():
            raise BadInput(f"the direction has {add.direction_d.numel()} entries but {add.hook} has width {widths[add.hook]}")
    edits = [(id(i.coder), i.feature) for i in interventions if isinstance(i, FeatureEdit)]
    twice = sorted({f for c, f in edits if edits.count((c, f)) > 1})
    if twice:
        raise BadInput(f"feature(s) {twice} are edited twice through the same coder; give each one edit")
    for coder in {id(i.coder): i.coder for i in interventions if isinstance(i, FeatureEdit)}.values():
        check_coder_fits(model, coder)


@contextmanager
def applied(model, interventions: Sequence[Intervention], positions: Positions, window: Window) -> Iterator[None]:
    """Apply `interventions` at `positions` of every forward pass inside the block, each pass
    placed in its sequence by `window`; several compose (each feature edit reads the coder's
    clean code, and its coder is spliced in with its error kept)."""
    adds = [(model.hook_dict[i.hook].name, _add_hook(i, positions, window)) for i in interventions if isinstance(i, AddDirection)]
    edits_by_coder: dict[int, list[FeatureEdit]] = {}
    for edit in (i for i in interventions if isinstance(i, FeatureEdit)):
        edits_by_coder.setdefault(id(edit.coder), []).append(edit)
    coders = [edits[0].coder for edits in edits_by_coder.values()]

    def where(b: int, s: int, device) -> torch.Tensor:
        return _position_mask(positions, window, b, s, device)

    def edit(coder: SparseCoder, code: SparseCode) -> SparseCode:
        return _edited(code, edits_by_coder[id(coder)])

    with model.hooks(fwd_hooks=adds), splice(model, coders, keep_error=True, where=where, edit=edit):
        yield


@contextmanager
def steer(model, *interventions: Intervention, positions: Positions = "all") -> Iterator[None]:
    """Apply `interventions` to every forward pass of `model` inside the block, each pass whole,
    unpadded sequences from position 0. To steer a generation, pass them to `generate` instead."""
    positions = check_positions(positions, generating=False)
    check_interventions(model, interventions)
    with applied(model, interventions, positions, Window()):
        yield


def _add_hook(add: AddDirection, positions: Positions, window: Window):
    def hook_fn(act, hook):
        keep_bs = _position_mask(positions, window, act.shape[0], act.shape[1], act.device)
        delta = (add.strength * add.direction_d.to(act.device, act.dtype)).reshape(act.shape[2:])
        return act + keep_bs.view(*keep_bs.shape, *([1] * (act.dim() - 2))) * delta

    return hook_fn


def _edited(code: SparseCode, edits: list[FeatureEdit]) -> SparseCode:
    """The code with each edited feature's slots emptied and one slot per edit appended, holding
    the feature at its new value (its clean value summed over the slots that held it)."""
    features = torch.tensor([e.feature for e in edits], device=code.indices_bk.device)
    match_tkf = code.indices_bk[:, :, None] == features
    old_tf = (code.values_bk[:, :, None] * match_tkf).sum(1)
    new_tf = torch.stack([e.new_values(old_tf[:, j]) for j, e in enumerate(edits)], dim=1)
    kept_tk = code.values_bk.masked_fill(match_tkf.any(-1), 0.0)
    indices_tk = torch.cat([code.indices_bk, features.expand(len(new_tf), -1)], dim=1)
    return SparseCode(indices_tk, torch.cat([kept_tk, new_tf.to(kept_tk.dtype)], dim=1))


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
    positions: list[int] | str = field(default="all", metadata={"parse": parse_positions})
    """Where to steer: 'all', 'new' (generated tokens only) or comma-separated positions, counted in each prompt from its BOS (never steered)."""
    stop_at_eos: bool = True
    """End a continuation at the tokenizer's end-of-sequence token (kept as its last token)."""

    def __post_init__(self):
        if self.samples < 1 or self.max_new_tokens < 1:
            raise BadInput(f"samples and max_new_tokens must be at least 1, got {self.samples} and {self.max_new_tokens}")
        check_finite("temperature", self.temperature)


def generate(
    model, prompt: str | Sequence[str], cfg: GenerateConfig | None = None, interventions: Sequence[Intervention] = ()
) -> list[list[int]] | list[list[list[int]]]:
    """Token ids of `cfg.samples` continuations of `prompt` (sample i drawn with seed + i), with
    `interventions` applied at `cfg.positions`: exactly what a loop of full forward passes under
    the same interventions would produce (see interp.generation). Given a list of prompts, one
    such list per prompt, all generated as one batch (left-padded, each row at its own positions)."""
    cfg = cfg or GenerateConfig()
    positions = check_positions(cfg.positions, generating=True)
    check_interventions(model, interventions)
    prompts = _prompts(prompt)
    during = (lambda window: applied(model, interventions, positions, window)) if interventions else None
    out = decode(
        model, [model.to_tokens(p)[0].tolist() for p in prompts], cfg.max_new_tokens, [cfg.seed + i for i in range(cfg.samples)],
        temperature=cfg.temperature, top_k=cfg.top_k, stop_at_eos=cfg.stop_at_eos, during=during,
    )
    return out[0] if isinstance(prompt, str) else out


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise BadInput(f"give a prompt or a list of prompts (strings), got {prompt!r}")
    return prompts


def compare_generations(
    model, prompt: str | Sequence[str], interventions: Sequence[Intervention], cfg: GenerateConfig | None = None
) -> GenerationPair | list[GenerationPair]:
    """Baseline and steered continuations of `prompt`, sample by sample with the same seed, so
    any difference comes from the steering. Given a list of prompts, one pair per prompt (each
    side one batch of them all)."""
    cfg = cfg or GenerateConfig()
    prompts = _prompts(prompt)
    baseline = generate(model, prompts, cfg)
    steered = generate(model, prompts, cfg, interventions)
    decode_text = model.tokenizer.decode
    pairs = [
        GenerationPair(p, [decode_text(t) for t in base], [decode_text(t) for t in edited], base, edited)
        for p, base, edited in zip(prompts, baseline, steered)
    ]
    return pairs[0] if isinstance(prompt, str) else pairs


@dataclass
class SteerConfig:
    prompt: list[str] = field(default_factory=list)
    """Text to continue; repeat for several prompts, generated as one batch (none: continue from BOS alone)."""
    feature: list[int] = field(default_factory=list)
    """Feature to steer with; repeat for several."""
    strength: list[float] | None = None
    """Add the feature's decoder direction at this activation; one value for all features or one per --feature."""
    clamp: list[float] | None = None
    """Clamp the feature's activation to this value through the coder (its error kept); one for all or one per --feature."""
    scale: list[float] | None = None
    """Multiply the feature's activation by this through the coder; one for all or one per --feature."""
    ablate: bool = False
    """Remove the features' contributions through the coder (its error kept)."""
    activate: bool = False
    """Turn the features on through the coder, each at its code's norm (a codebook coder's codes)."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def prompts(self) -> list[str]:
        """The prompts to continue (the empty prompt if none was given)."""
        return ([self.prompt] if isinstance(self.prompt, str) else list(self.prompt)) or [""]

    def interventions(self, coder: SparseCoder) -> list[Intervention]:
        """One intervention per feature, of the one kind the settings name."""
        modes = {"--strength": self.strength, "--clamp": self.clamp, "--scale": self.scale,
                 "--ablate": [0.0] if self.ablate else None, "--activate": [0.0] if self.activate else None}
        chosen = [name for name, values in modes.items() if values]
        if len(chosen) != 1:
            raise BadInput(f"give exactly one of --strength, --clamp, --scale, --ablate, --activate (got {', '.join(chosen) or 'none'})")
        if not self.feature:
            raise BadInput("name at least one --feature to steer with")
        mode, values = chosen[0], modes[chosen[0]]
        if len(values) == 1:
            values = values * len(self.feature)
        if len(values) != len(self.feature):
            raise BadInput(f"{mode} takes one value, or one per --feature ({len(self.feature)}); got {len(values)}")
        build = {"--strength": add_feature, "--clamp": clamp, "--scale": scale, "--ablate": lambda c, f, _: ablate(c, f),
                 "--activate": lambda c, f, _: activate_code(c, f)}[mode]
        return [build(coder, f, v) for f, v in zip(self.feature, values)]

    def describe(self) -> str:
        """Which features are steered how, for a heading."""
        flag = next((m for m in ("ablate", "activate") if getattr(self, m)), None)
        mode = flag or next(m for m in ("strength", "clamp", "scale") if getattr(self, m))
        values = None if flag else getattr(self, mode)
        if values is not None and len(values) == 1:
            values = values * len(self.feature)
        return ", ".join(f"{f} ({mode}{'' if values is None else ' ' + str(v)})" for f, v in zip(self.feature, values or [None] * len(self.feature)))
