"""BatchTopK sparse autoencoder (Bussmann, Leask and Nanda 2024, "BatchTopK Sparse Autoencoders").

Training, over a batch Z = [z_1 .. z_B] of pre-activations z_b = W_enc (x_b - b_dec) + b_enc:

    F     = ReLU(BatchTopK_{k B}(Z))         the k B largest entries of the whole B x n matrix
    x_hat = W_dec f_b + b_dec                 tokens get a varying number of latents, k on average
    L     = FVU + aux_coef * AuxK             AuxK exactly as in TopK (Gao et al.)

Inference replaces the batch dependency by one threshold theta (a JumpReLU):

    f = z * 1[z > theta]

theta estimates the smallest activation BatchTopK keeps. The paper averages the minimum positive
kept activation over training batches; we keep that average as an exponential moving average with
rate `threshold_rate` (starting from the first batch's value rather than 0, so that an early
checkpoint is already usable), since a plain mean over all of training would remember the
untrained coder's first batches. The default rate, 0.05, averages about 20 batches: in short runs
a slower average lags the moving coder and the inference L0 drifts from k (0.01 gave L0 13.3
instead of 16 after 60 steps on SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp import distributed
from interp.sae.allocation import batch_topk, padded_code, select_above, update_ema
from interp.sae.base import SelectContext
from interp.sae.topk import TopKConfig, TopKSAE


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_rate: float = 0.05
    """Rate of the moving average that estimates the inference threshold (BatchTopK-style coders)."""


class BatchTopKSAE(TopKSAE):
    arch = "batchtopk"
    config_class = BatchTopKConfig

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        # Inference threshold on pre-activations, in normalised units.
        self.register_buffer("threshold", torch.zeros(()))
        self.register_training_buffer("threshold_started", torch.zeros((), dtype=torch.bool))

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return select_above(pre_bn, self.threshold)
        rows, cols, values = batch_topk(pre_bn, self.cfg.k * len(pre_bn))
        # under data parallelism the smallest kept entry is the global batch's, the same on every rank
        smallest = values.min() if len(values) else torch.tensor(float("inf"), device=pre_bn.device)
        smallest = -distributed.max_over_ranks(-smallest)
        if torch.isfinite(smallest):
            update_ema(self.threshold, smallest, self.cfg.threshold_rate, self.threshold_started)
        return padded_code(rows, cols, values, len(pre_bn))
