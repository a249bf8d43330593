"""A coder as other libraries hold one: plain matrices in the model's units, decoder rows of unit
norm where the coder's selection allows it, feature activations in the matching units.

interp's own activations are in normalised units (the coder's input scaled to E||x||^2 = d), and
`SparseCoder.model_units()` keeps them so: its decoder rows have norm 1/out_scale. Peers expect
unit decoder rows, so the view rescales each feature by its row norm r: the encoder row and bias
by r, the decoder row by 1/r, a threshold by r. A TopK selection is unchanged by one common
factor but not by per-row ones, so a TopK coder whose rows differ in norm keeps them as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from interp.sae.base import SparseCoder


class PeerView(NamedTuple):
    W_enc: torch.Tensor
    """(n_latents, d_in): pre-activations z = W_enc (x - b_dec) + b_enc for an SAE, W_enc x + b_enc for a transcoder."""
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    """(n_latents, d_out)"""
    b_dec: torch.Tensor
    W_skip: torch.Tensor | None
    """(d_out, d_in): a skip transcoder's linear term."""
    threshold: torch.Tensor | None
    """(n_latents,): a threshold coder's (or batch-level coder's inference) thresholds on z."""
    feature_scale: torch.Tensor
    """(n_latents,): a feature's activation here is its interp activation times this."""


@torch.no_grad()
def peer_view(coder: SparseCoder) -> PeerView:
    units = coder.model_units()
    norms = torch.linalg.vector_norm(units.W_dec, dim=1).clamp_min(1e-12)
    uniform = bool(torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4))
    thresholded = hasattr(coder, "threshold")
    r = norms if thresholded or uniform else torch.ones_like(norms)
    W_enc = units.W_enc * r[:, None]
    b_dec = units.b_dec
    b_enc = units.b_enc * r
    if coder.cfg.target_hook is None:
        # model_units folds the input's b_dec subtraction into b_enc; peers subtract it again.
        b_enc = b_enc + W_enc @ b_dec
    threshold = coder.threshold.expand(coder.cfg.n_latents) * r if thresholded else None
    return PeerView(
        W_enc.float(), b_enc.float(), (units.W_dec / r[:, None]).float(), b_dec.float(),
        None if units.W_skip is None else units.W_skip.float(), None if threshold is None else threshold.float(), r.float(),
    )


def uniform_scale(view: PeerView) -> float | None:
    """The factor from interp's activations to the peer's when every feature shares it (None if not)."""
    scale = view.feature_scale
    return float(scale[0]) if bool(torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-5)) else None
