"""Codebook features (Tamkin et al. 2023, "Codebook Features: Sparse and Discrete Interpretability
for Neural Networks").

Each token's activation is replaced by the sum of the k codes most similar to it:

    s_i   = cos(x, c_i)                 similarity to every code
    S     = the k codes of largest s    the token's code: a set of k integers
    x_hat = sum_{i in S} c_i

A code is held as a unit direction W_dec[i] and a norm a_i (`code_norm`), c_i = a_i W_dec[i], so
that its direction is what steering, the logit lens and the dashboards read, as for every family,
and its activation in the sparse code is a_i when it is chosen and 0 otherwise: the code is
discrete (`discrete = True`), its value does not vary with the input. Choosing by cos(x, c_i) is
choosing by W_dec[i] . x, the 1/||x|| being the same for every code, so the pre-activations are
z = W_dec x (W_enc is W_dec, b_enc 0) and their top k are the k most similar codes. There is no
bias: the codes replace the activation, as in the paper. (The paper's released code divides the
sum by k; the codes' norms absorb that constant.) Activating a code during generation, as the
paper does, is `interp.steering.activate_code`: the code's activation clamped to a_i through the
coder, so a_i W_dec[i] is added wherever the code was off.

Training. The paper inserts the codebooks into the model and fine-tunes it with them (the
language-model loss, with the codes' reconstruction error added). interp trains on frozen
activations with its one trainer: the loss is the FVU of x_hat against x, and the codes learn only
through x_hat (the choice itself is not differentiated, as in the paper, whose straight-through
gradient to the input has nothing to train here). What that changes: the model never adapts to
the bottleneck, so the spliced loss counts everything the codes lose, where the paper's fine-tuned
model learns to route its computation through them; expect a higher spliced loss than the paper
reports at the same k. Codes unused for the trainer's dead window are given gradient by the AuxK
loss of the TopK family (the paper re-initialises them instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from interp import kernels
from interp.errors import BadInput
from interp.sae.topk import TopKConfig, TopKSAE


@dataclass
class CodebookConfig(TopKConfig):
    def __post_init__(self):
        super().__post_init__()
        if self.target_hook is not None or self.skip:
            raise BadInput("a codebook replaces the activation it reads: it cannot be a transcoder (drop --transcode/--skip)")


class CodebookSAE(TopKSAE):
    arch = "codebook"
    config_class = CodebookConfig
    discrete = True

    def __init__(self, cfg: CodebookConfig):
        super().__init__(cfg)
        for name in ("W_enc", "b_enc", "b_dec"):
            del self._parameters[name]
        # Zero and not saved: the codes have no bias, and the encoder is the decoder.
        self.register_buffer("b_enc", torch.zeros(cfg.n_latents), persistent=False)
        self.register_buffer("b_dec", torch.zeros(cfg.d_in), persistent=False)
        # The trainer starts the codes from data (`init_from_data`); before that, the normalised
        # input's scale, E ||x||^2 = d, over k codes.
        self.code_norm = nn.Parameter(torch.full((cfg.n_latents,), math.sqrt(cfg.d_in) / cfg.k))

    def __getattr__(self, name: str):
        # W_enc is W_dec once the codes exist (the base class registers its own W_enc first, and a
        # property would stop it); read through __dict__, which a copy in progress may lack.
        params = self.__dict__.get("_parameters")
        if name == "W_enc" and params is not None and "code_norm" in params:
            return params["W_dec"]
        return super().__getattr__(name)

    def active_values(self, enc_in_bd: torch.Tensor, indices_bk: torch.Tensor, pre_bk: torch.Tensor | None,
                      layout: kernels.LatentLayout | None = None) -> torch.Tensor:
        """Each chosen code's norm (0 in unused slots): differentiable with respect to the norms."""
        return self.code_norm[indices_bk.clamp(min=0)].masked_fill(indices_bk < 0, 0.0)

    @torch.no_grad()
    def init_from_data(self, target: torch.Tensor, method: str = "geometric_median") -> None:
        """The codes start at the first batch's tokens (a token drawn for each code, again when the
        codes outnumber the tokens; the paper offers a k-means start to the same end): each code's
        direction is its token's, blurred by noise of half the token's norm so that codes drawn from
        one token differ, and its norm the token's over k, so that k codes near a token sum to
        about it. There is no bias, so `method` has nothing to choose."""
        points_bd = target.float() * self.out_scale
        drawn_n = torch.randint(len(points_bd), (self.cfg.n_latents,), device=points_bd.device)
        tokens_nd = points_bd[drawn_n]
        norms_n = tokens_nd.norm(dim=1, keepdim=True)
        blurred_nd = tokens_nd + torch.randn_like(tokens_nd) * norms_n * (0.5 / math.sqrt(self.cfg.d_in))
        self.W_dec.copy_(blurred_nd / blurred_nd.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.code_norm.copy_(norms_n[:, 0] / self.cfg.k)
