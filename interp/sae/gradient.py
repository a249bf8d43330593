"""Gradient sparse autoencoder, g-SAE (Olmo et al. 2024, "Features that Make a Difference:
Leveraging Gradients for Improved Dictionary Learning", arXiv 2411.10397).

TopK whose *selection* also weighs each latent's first-order effect on the model's loss:

    z     = W_enc (x - b_dec) + b_enc
    g     = dL/dx                             gradient of the next-token loss at the hooked activation
    s     = z + beta * z * |W_dec^T g|        selection score (elementwise products)
    S     = TopK_k(s)                         the k latents with the largest score
    f     = ReLU(z) on S, 0 elsewhere         values are the ordinary activations
    x_hat = W_dec f + b_dec,   L = FVU + aux_coef * AuxK (as TopK)

|W_dec_i . g| is how much the loss moves per unit of latent i, so a latent with a small activation
but a large downstream effect can displace one with a slightly larger but inert activation.
beta = 0 (or g = 0) gives exactly TopK.

Choices (ours):
- g is taken in the coder's normalised units (dL/dx_norm = g / scale, the chain rule through our
  input scaling), so the score does not depend on the model's activation scale. For a transcoder
  the gradient is taken at the target hook, the space W_dec writes into.
- Gradients come from the activation source (`ModelChunks(with_grads=True)`, or a store written
  by `interp cache --with-grads`): one backward pass from the loss to the hooked activation.
- beta defaults to 1, from `bench/gsae_readings.py` on SmolLM2 layer 12 (docs/results.md, "g-SAE's
  gradient term"): in normalised units beta 1 changes about 11% of a token's TopK selection and
  beta 10 over 40%; above 1, FVU, the first-order loss proxy |g . (x_hat - x)| and the spliced
  loss all get worse, and at 1 the spliced loss is slightly below TopK's at 0.001 higher FVU (one seed).
- Without a gradient (inference, splicing into the model, `interp eval`) the coder selects by
  plain TopK on z, the beta = 0 limit: one forward pass, no backward. In training a missing
  gradient is an error, not a silent fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp.errors import BadInput
from interp.sae.base import SelectContext
from interp.sae.topk import TopKConfig, TopKSAE


@dataclass
class GradientConfig(TopKConfig):
    beta: float = 1.0
    """g-SAE: weight of the gradient term beta in the selection score z + beta * z * |W_dec^T grad|."""


class GradientSAE(TopKSAE):
    arch = "gradient"
    config_class = GradientConfig
    needs_grad = True

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx.grad is None:
            if self.training:
                raise BadInput("a gradient SAE trains on gradients: pass SelectContext(grad=...) (an activation source with_grads)")
            return super().select(pre_bn, ctx)
        indices_bk = self.scores(pre_bn, ctx.grad).topk(self.cfg.k, dim=1, sorted=False).indices
        return indices_bk, pre_bn.gather(1, indices_bk)

    @torch.no_grad()
    def scores(self, pre_bn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """s = z + beta * z * |W_dec^T g| with g in normalised units, (tokens, n)."""
        grad_norm = grad.to(self.W_dec.dtype) / self.out_scale
        effect_bn = (grad_norm @ self.W_dec.t()).abs()
        return pre_bn + self.cfg.beta * pre_bn * effect_bn
