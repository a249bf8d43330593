"""TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z     = W_enc (x - b_dec) + b_enc
    f     = ReLU(TopK_k(z))                      the k largest pre-activations per token
    x_hat = W_dec f + b_dec
    L     = ||x - x_hat||^2 / ||x - mean x||^2  +  aux_coef * L_aux

AuxK: dead latents (no activation in the trainer's window, passed as `SelectContext.dead_mask`) are given a
chance to explain what the live ones miss: with e = x - x_hat, take the top-k_aux pre-activations
among dead latents only, decode them without bias into e_hat and add
L_aux = ||e - e_hat||^2 / ||e - mean e||^2. Gao et al. use k_aux = d/2 and aux_coef = 1/32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp import kernels
from interp.errors import BadInput
from interp.sae.base import CoderConfig, SelectContext, SparseCoder
from interp.sae.losses import fraction_unexplained


@dataclass
class TopKConfig(CoderConfig):
    k: int = 32
    """Active latents per token."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss (default d_in // 2)."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.k <= self.n_latents:
            raise BadInput(f"k must be between 1 and the number of latents ({self.n_latents}), got {self.k}")


class TopKSAE(SparseCoder):
    arch = "topk"
    config_class = TopKConfig

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        top = pre_bn.topk(self.cfg.k, dim=1, sorted=False)
        return top.indices, top.values

    @torch.no_grad()
    def select_rounded(self, enc_in_bd: torch.Tensor, rounded_bn: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        """The exact top k from rounded pre-activations: the 4k largest rounded ones are computed
        again exactly and the k largest of those kept. That is the top k of all latents unless a
        latent outside the 4k could exceed the k-th: its rounded value is at most the 4k-th's, so
        its exact one at most that plus the rounding's bound (bf16 products accumulated in
        float32, the sum rounded once: (2u + u^2 + d 2^-24) ||x|| max ||w_j|| + u max |b_j| +
        u |z|, u the unit roundoff); on SmolLM2 activations the 2k largest left 40% of tokens
        without that margin, the 4k none. Tokens without it are chosen from exact
        pre-activations."""
        if ctx.grad is not None:
            return super().select_rounded(enc_in_bd, rounded_bn, ctx)
        k = self.cfg.k
        wide = rounded_bn.topk(min(4 * k, rounded_bn.shape[1]), dim=1)
        exact_bc = kernels.encode_selected(enc_in_bd, self.W_enc, self.encoder_bias(), wide.indices)
        best = exact_bc.topk(k, dim=1)
        indices_bk = wide.indices.gather(1, best.indices)
        if wide.indices.shape[1] == rounded_bn.shape[1]:
            return indices_bk
        u = torch.finfo(rounded_bn.dtype).eps / 2
        d = enc_in_bd.shape[1]
        reach = ((2 * u + u * u + d * 2.0**-24) * enc_in_bd.norm(dim=1) * self.W_enc.norm(dim=1).max()
                 + u * self.encoder_bias().abs().max())
        cut = wide.values[:, -1].float()
        unsure = best.values[:, -1] <= cut + u * cut.abs() + reach
        if unsure.any():
            indices_bk[unsure] = self.select(self.preacts(enc_in_bd[unsure]), ctx)[0]
        return indices_bk

    def aux_loss(self, enc_in_bd, pre_bn, target_norm, x_hat_norm, ctx: SelectContext) -> torch.Tensor:
        if ctx.dead_mask is None or not self.training:
            return torch.zeros((), device=enc_in_bd.device)
        return self.masked_aux_loss(enc_in_bd, pre_bn, target_norm, x_hat_norm, ctx.dead_mask)

    def masked_aux_loss(self, enc_in_bd, pre_bn, target_norm, x_hat_norm, mask_n: torch.Tensor) -> torch.Tensor:
        """AuxK restricted to the latents in `mask_n`: the top-k_aux of them reconstruct the
        residual target - x_hat (x_hat detached), computed only when some latent is masked in."""
        n_masked = int(mask_n.sum())
        if n_masked == 0:
            return torch.zeros((), device=enc_in_bd.device)
        k_aux = min(self.cfg.k_aux or self.cfg.d_in // 2, n_masked)
        masked_pre = pre_bn.masked_fill(~mask_n, float("-inf"))
        top = masked_pre.topk(k_aux, dim=1, sorted=False)
        layout = kernels.latent_layout(top.indices, self.cfg.n_latents)
        values_bk = self.active_values(enc_in_bd, top.indices, top.values, layout)
        residual_hat = kernels.decode(top.indices, values_bk, self.W_dec, layout=layout)
        return self.cfg.aux_coef * fraction_unexplained(target_norm - x_hat_norm, residual_hat)
