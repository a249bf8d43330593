"""Threshold coders: a latent fires when its pre-activation exceeds its own threshold,

    z = W_enc (x - b_dec) + b_enc,     f_i = ReLU(z_i) * 1[z_i > theta_i],     x_hat = W_dec f + b_dec

JumpReLU SAEs (Rajamanoharan et al. 2024) are this rule; so are plain ReLU SAEs (theta = 0) and
gated SAEs (Rajamanoharan et al. 2024, with tied gate and magnitude encoders: the gate
W_enc x + b_gate > 0 is the magnitude pre-activation exceeding b_mag - exp(r_mag) b_gate). interp
reads them from other libraries (interp.interop) and runs them, splices them, explores and
steers them like any coder; it does not train them (their sparsity comes from a penalty with a
straight-through estimator that interp's trainer does not implement), and `interp train --arch
jumprelu` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from interp.sae.allocation import select_above
from interp.sae.base import CoderConfig, SelectContext, SparseCoder


@dataclass
class JumpReLUConfig(CoderConfig):
    pass


class JumpReLUSAE(SparseCoder):
    arch = "jumprelu"
    config_class = JumpReLUConfig
    trainable: ClassVar[bool] = False

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        # One threshold per latent, on pre-activations in normalised units.
        self.register_buffer("threshold", torch.zeros(cfg.n_latents))

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        return select_above(pre_bn, self.threshold)


def gated_as_jumprelu(W_enc: torch.Tensor, r_mag: torch.Tensor, b_gate: torch.Tensor, b_mag: torch.Tensor):
    """(W_enc, b_enc, threshold) of the JumpReLU computing a gated SAE with tied encoders
    (W_enc (n, d) applied to x - b_dec): the magnitude pre-activation exp(r_mag) W_enc x + b_mag
    exceeds b_mag - exp(r_mag) b_gate exactly when the gate W_enc x + b_gate is positive."""
    scale = r_mag.exp()
    return W_enc * scale[:, None], b_mag, b_mag - scale * b_gate
