"""How strongly a coder's features steer the model: each of a sample of features has its unit
decoder direction added, at one fixed norm, at every position of held-out text but BOS (as
`steer` does), and the change in the next-token distribution is measured.

    kl_per_norm = mean over features and positions of KL(clean || steered) / strength
    lens_rise   = mean over features and positions of the mean rise (steered - clean) in the
                  log-probability of the feature's top `lens_tokens` logit-lens tokens

The added norm is the same for every coder compared (the caller fixes it, for example a fraction
of the hook's mean activation norm), so the figures say how much a direction of the dictionary
moves the model per unit of intervention, and whether it moves it toward what the feature's
decoder says it writes (the g-SAE paper's claim that its latents steer better). Positions are
those the data's mask keeps (not BOS, not padding); the features are drawn at random, with a
seed, from those that fire on held-out activations, so no coder is scored on a chosen few.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from interp.data import TokenBatch
from interp.errors import BadInput
from interp.features import logit_lens
from interp.hooks import output_hook
from interp.sae.base import SparseCoder
from interp.steering import add_direction, feature_direction, steer


@dataclass
class SteeringEffectConfig:
    steer_features: int = 16
    """Features sampled (among those that fire on held-out text) for the steering measure."""
    steer_strength_ratio: float = 0.5
    """Norm added along each feature's unit direction, as a fraction of the hook's mean activation norm on held-out text."""
    steer_lens_tokens: int = 10
    """Top logit-lens tokens per feature whose log-probability rise is measured."""
    steer_tokens: int = 2048
    """Held-out tokens each feature is added over."""
    steer_seed: int = 0
    """Seed of the feature sample."""

    def __post_init__(self):
        for name in ("steer_features", "steer_strength_ratio", "steer_lens_tokens", "steer_tokens"):
            if not getattr(self, name) > 0:
                raise BadInput(f"{name} must be > 0, got {getattr(self, name)}")


def live_features(coder: SparseCoder, activations: Sequence[dict[str, torch.Tensor]], count: int, seed: int) -> list[int]:
    """`count` features drawn at random (seeded) from those that fire on `activations`."""
    was_training = coder.training
    coder.eval()
    fired = torch.zeros(coder.cfg.n_latents, dtype=torch.bool)
    with torch.no_grad():
        for batch in activations:
            indices = coder.encode(batch[coder.cfg.hook]).indices_bk
            fired[indices[indices >= 0].cpu()] = True
    coder.train(was_training)
    live = fired.nonzero().flatten()
    if len(live) == 0:
        raise BadInput("no feature of the coder fires on the held-out activations; there is nothing to steer with")
    order = torch.randperm(len(live), generator=torch.Generator().manual_seed(seed))
    return live[order[:count]].tolist()


@torch.no_grad()
def steering_effect(model, coder: SparseCoder, batches: Sequence[TokenBatch], features: Sequence[int], strength: float,
                    lens_tokens: int = 10) -> dict[str, float]:
    """kl_per_norm and lens_rise (see the module docstring) of `features` added at `strength`
    (model units) over `batches`; lens_rise is nan when the coder's output space is not the
    residual stream (no logit lens)."""
    if not strength > 0:
        raise BadInput(f"the steering strength must be > 0, got {strength}")
    lens = logit_lens(model, coder, lens_tokens, features=list(features))
    lens_ids = None if lens is None else lens["lens_top_ids_nt"]
    hook = output_hook(coder)
    kl_sum = rise_sum = 0.0
    positions = 0
    for batch in batches:
        tokens = batch.tokens_bt.to(model.cfg.device)
        keep = batch.mask_bt.to(tokens.device)
        clean = F.log_softmax(model(tokens).float()[keep], dim=-1)
        for j, feature in enumerate(features):
            direction = feature_direction(coder, feature)
            with steer(model, add_direction(hook, direction / direction.norm(), strength)):
                steered = F.log_softmax(model(tokens).float()[keep], dim=-1)
            kl_sum += float((clean.exp() * (clean - steered)).sum())
            if lens_ids is not None:
                ids = lens_ids[j].to(tokens.device)
                rise_sum += float((steered[:, ids] - clean[:, ids]).mean(1).sum())
        positions += int(keep.sum())
    if positions == 0:
        raise BadInput("no text to steer on")
    per = positions * len(features)
    return {"kl_per_norm": kl_sum / per / strength, "lens_rise": rise_sum / per if lens_ids is not None else float("nan"),
            "steer_strength": strength, "steer_features": len(features)}
