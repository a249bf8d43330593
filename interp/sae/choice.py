"""Mutual choice and feature choice sparse autoencoders, with aux_zipf_loss (Ayonrinde 2024,
"Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse Autoencoders",
arXiv 2411.02124).

The sparsifier allocates a budget of M = k B token-feature matches over a batch of B tokens, with
pre-activations Z (B x n), z_b = W_enc (x_b - b_dec) + b_enc:

    TopK (token choice):  each token b takes its top-k features          (exactly k per token)
    Mutual choice:        S = TopM(Z) over the whole B x n matrix         (free allocation)
    Feature choice:       feature i takes its top-m_i tokens, sum_i m_i = M (at most m_i per feature)

    f_b = ReLU(z_b) * S_b,    x_hat_b = W_dec f_b + b_dec,    L = FVU + aux_coef * aux_zipf_loss

Tokens get a varying number of latents; the padded sparse code (-1 slots) carries them to the
sparse kernels. Mutual choice selects exactly as BatchTopK does; what the paper adds is the
allocation view, feature choice, and the auxiliary loss.

Choices where the paper leaves room (ours, and why):

- Feature capacities follow a Zipf law over a ranking of the latents, m_r proportional to r^-alpha,
  alpha = `zipf_exponent` (0 gives the uniform m = M / n). The paper motivates Zipf capacities by
  the observation that feature densities of trained SAEs follow a Zipf law; that law is over the
  density rank, so `capacity_order` either ties the capacity to a fixed index ('index': latents
  start interchangeable, so training decides which latent gets which capacity; deterministic) or
  hands the r-th largest capacity to the latent in the r-th greatest demand ('demand': how often
  it is among the batch's k B largest pre-activations, which free allocation would pick). Ranking
  by the latents' own firing densities instead would change nothing: the capacities make those
  densities, so the order they start in is a fixed point (bench/choice_readings.py (c) found the
  runs bit-identical). The default is 'demand': on SmolLM2 layer 12 at 9,216 latents, k 16, it
  lowers held-out FVU by about 0.02 against 'index' at exponents 0.5 and 1 (which tie; the
  uniform exponent 0 is worse by 0.05), and the paper's exponent 1 stays (docs/results.md).
  Feature choice still trails BatchTopK there by 0.03 FVU, so the capacity rule we read is not
  why the paper's claim does not reproduce. A feature can take at most the B tokens of the batch and at least one, so
  m_i = clamp(c w_i, 1, B) with the scale c chosen so that the capacities still sum to M
  (what the capped head cannot take goes to the rest in the same proportions), then rounded by
  largest remainder: sum_i m_i = M exactly, the same budget as TopK. (Capping without
  redistributing, as a first version did, lost about a tenth of the budget at k = 16, n = 4 d.)
- aux_zipf_loss generalises AuxK from dead to under-utilised features. We track each latent's
  firing density d_i (a moving average over training batches, rate `density_rate`), fit a Zipf
  law log d = a - beta log r to the densities ranked r = 1..n over the head of the ranking (the
  top half, where the paper finds the law holds), and call latent i under-utilised when
  d_i < `underuse_factor` * exp(a - beta log r_i): it sits well under the law at its rank. Dead
  latents (d_i = 0) are always under-utilised, so with no under-used live latent the loss is
  exactly AuxK. The loss is AuxK restricted to the under-utilised latents: their top-k_aux
  pre-activations reconstruct the residual x - x_hat, L_aux = FVU(residual, their decode).
- `aux_mask` chooses the auxiliary loss's latents: 'zipf' is the reading above, 'dead' AuxK's
  mask (mutual choice then trains exactly as BatchTopK with AuxK). The default is 'dead':
  bench/choice_readings.py (b) finds the 'zipf' reading harmful: on SmolLM2 layer 12 at 9,216
  latents, k 16, it masks 37% of the latents and leaves 26% silent over the last fifth of
  training, against 0.01% with 'dead', at a slightly worse FVU (docs/results.md). 'zipf' stays
  for those who study the paper's loss; a reading of its "under-utilised" that helps is still
  to find.
- Inference on one token cannot depend on the batch, so in `eval()` mode both coders keep the
  latents whose pre-activation exceeds a threshold estimated in training (see allocation.py):
  mutual choice one global threshold (the smallest kept activation, as BatchTopK), feature choice
  one threshold per feature (the m_i-th largest activation of feature i in the batch, clamped at
  0), each a moving average with rate `threshold_rate`. Feature i then fires on a token exactly
  when it would rank among its top-m_i in a typical batch.
- Under data parallelism (each rank a share of the global batch) both choose over the global
  batch, as one process does: mutual choice through BatchTopK's global cut, feature choice by
  gathering each rank's top-m_i of every latent and taking the global m_i-th largest as the
  latent's cut; the capacities are the global batch's and the densities count every rank's
  firings over every rank's tokens, so the under-utilised mask is the same on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interp import distributed
from interp.errors import BadInput
from interp.sae.allocation import batch_topk, padded_code, select_above, update_ema
from interp.sae.base import SelectContext
from interp.sae.batchtopk import BatchTopKConfig, BatchTopKSAE

AUX_MASKS = ("zipf", "dead")
CAPACITY_ORDERS = ("index", "demand")


@dataclass
class MutualChoiceConfig(BatchTopKConfig):
    density_rate: float = 0.01
    """Rate of the moving average of latent densities that aux_zipf_loss reads (choice coders)."""
    underuse_factor: float = 0.5
    """aux_zipf_loss treats a latent as under-utilised when its density is below this fraction of the Zipf law at its rank."""
    aux_mask: str = "dead"
    """Latents the auxiliary loss may use: 'zipf' (under-utilised by the Zipf law, aux_zipf_loss) or 'dead' (unfired for the trainer's dead window, AuxK's mask)."""

    def __post_init__(self):
        super().__post_init__()
        if self.aux_mask not in AUX_MASKS:
            raise BadInput(f"aux_mask must be one of {', '.join(AUX_MASKS)}, got {self.aux_mask!r}")


@dataclass
class FeatureChoiceConfig(MutualChoiceConfig):
    zipf_exponent: float = 1.0
    """Feature choice: the latent of rank r may take m_r ~ r^-exponent of the batch's k*B matches (0: uniform)."""
    capacity_order: str = "demand"
    """Feature choice: rank latents for their capacities by 'index' (fixed) or by 'demand' (how often free allocation would pick them, largest first)."""

    def __post_init__(self):
        super().__post_init__()
        if self.capacity_order not in CAPACITY_ORDERS:
            raise BadInput(f"capacity_order must be one of {', '.join(CAPACITY_ORDERS)}, got {self.capacity_order!r}")


class MutualChoiceSAE(BatchTopKSAE):
    arch = "mutual_choice"
    config_class = MutualChoiceConfig

    def __init__(self, cfg: MutualChoiceConfig):
        super().__init__(cfg)
        self.register_training_buffer("density", torch.zeros(cfg.n_latents))
        self.register_training_buffer("density_started", torch.zeros((), dtype=torch.bool))

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        indices_bk, pre_bk = super().select(pre_bn, ctx)
        if self.training:
            self.track_density(indices_bk)
        return indices_bk, pre_bk

    @torch.no_grad()
    def track_density(self, indices_bk: torch.Tensor) -> None:
        # Selected entries are all positive, so selection counts are firing counts.
        fires = distributed.sum_over_ranks(torch.bincount(indices_bk[indices_bk >= 0], minlength=self.cfg.n_latents).float())
        update_ema(self.density, fires / distributed.total_over_ranks(len(indices_bk), fires.device), self.cfg.density_rate, self.density_started)

    def aux_loss(self, enc_in_bd, pre_bn, target_norm, x_hat_norm, ctx: SelectContext) -> torch.Tensor:
        if self.cfg.aux_mask == "dead":
            return super().aux_loss(enc_in_bd, pre_bn, target_norm, x_hat_norm, ctx)
        if not self.training:
            return torch.zeros((), device=enc_in_bd.device)
        return self.masked_aux_loss(enc_in_bd, pre_bn, target_norm, x_hat_norm, self.underused())

    @torch.no_grad()
    def underused(self) -> torch.Tensor:
        """Latents whose density falls under `underuse_factor` x the Zipf law fitted to the head."""
        return underused_by_zipf(self.density, self.cfg.underuse_factor)


class FeatureChoiceSAE(MutualChoiceSAE):
    arch = "feature_choice"
    config_class = FeatureChoiceConfig

    def __init__(self, cfg: FeatureChoiceConfig):
        super().__init__(cfg)
        # One inference threshold per feature (the scalar of BatchTopK becomes a vector).
        self.threshold = torch.zeros(cfg.n_latents)
        self.register_training_buffer("demand", torch.zeros(cfg.n_latents))
        self.register_training_buffer("demand_started", torch.zeros((), dtype=torch.bool))

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """m_r, the most tokens the latent of rank r may take in a batch of `n_tokens` (non-increasing in r)."""
        return zipf_capacities(self.cfg.n_latents, self.cfg.k * n_tokens, n_tokens, self.cfg.zipf_exponent).to(
            self.threshold.device
        )

    @torch.no_grad()
    def ranking(self, pre_bn: torch.Tensor) -> torch.Tensor:
        """Latents in rank order for the capacities: by index, or by demand, a moving average
        (rate `density_rate`) of how often each latent is among the batch's k B largest
        pre-activations, the matches free allocation (mutual choice) would make; ties by index.
        Demand is measured apart from the capacities: their own firing densities would only
        repeat the order the capacities gave them. The same on every rank."""
        if self.cfg.capacity_order == "index":
            return torch.arange(self.cfg.n_latents, device=pre_bn.device)
        _, cols, _ = batch_topk(pre_bn, self.cfg.k * len(pre_bn))
        picks = distributed.sum_over_ranks(torch.bincount(cols, minlength=self.cfg.n_latents).float())
        tokens = distributed.total_over_ranks(len(pre_bn), pre_bn.device)
        update_ema(self.demand, picks / tokens, self.cfg.density_rate, self.demand_started)
        return self.demand.argsort(descending=True, stable=True)

    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            return select_above(pre_bn, self.threshold)
        capacity_r = self.capacities(distributed.total_over_ranks(len(pre_bn), pre_bn.device))
        order_r = self.ranking(pre_bn)
        rows, ranked_cols, cuts_r = feature_choice(pre_bn[:, order_r], capacity_r)
        cols = order_r[ranked_cols]
        thresholds = torch.empty_like(cuts_r)
        thresholds[order_r] = cuts_r
        update_ema(self.threshold, thresholds, self.cfg.threshold_rate, self.threshold_started)
        indices_bk, pre_bk = padded_code(rows, cols, pre_bn[rows, cols], len(pre_bn))
        self.track_density(indices_bk)
        return indices_bk, pre_bk


def zipf_capacities(n_latents: int, budget: int, n_tokens: int, exponent: float) -> torch.Tensor:
    """m_i = clamp(c (i + 1)^-exponent, 1, n_tokens) rounded to integers, non-increasing in i,
    with the scale c chosen so that sum_i m_i = budget (exactly, whenever
    n_latents <= budget <= n_latents * n_tokens)."""
    weights = torch.arange(1, n_latents + 1, dtype=torch.float64).pow(-exponent)
    budget = min(max(budget, n_latents), n_latents * n_tokens)

    def allocated(scale: float) -> torch.Tensor:
        return (scale * weights).clamp(1, n_tokens)

    # The clamped total grows monotonically with the scale: bisect for the one that spends the budget.
    low, high = 0.0, n_tokens / float(weights[-1])
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if allocated(middle).sum() < budget else (low, middle)
    exact = allocated(high)
    capacity = exact.floor()
    short = budget - int(capacity.sum())
    if short > 0:
        # Largest remainders first; a latent already at the batch size takes no more.
        room = torch.where(capacity < n_tokens, exact - capacity, torch.full_like(exact, -1.0))
        capacity[room.topk(short).indices] += 1
    # Equal weights (exponent 0) have equal remainders, and the one taken may follow one left:
    # sorting keeps the capacities non-increasing, as feature_choice's grouping needs.
    return capacity.sort(descending=True).values.long()


def feature_choice(pre_bn: torch.Tensor, capacity_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each latent i takes its top-capacity_n[i] tokens with positive pre-activation (of the
    global batch, under data parallelism: every rank offers its own top-capacity_n[i] and all take
    the same cut). Returns (rows, cols) of the matches and each latent's smallest admitted value
    (>= 0), its cut.

    Capacities are non-increasing in i, so latents are processed in groups whose capacities lie
    within a factor 2: one column-wise top-m per group instead of a full sort of every column."""
    rows, cols, thresholds = [], [], []
    start, (B, n) = 0, pre_bn.shape
    while start < n:
        m = int(capacity_n[start])
        stop = max(start + 1, int((capacity_n > m // 2).sum()))
        block_bg = pre_bn[:, start:stop]
        top_mg = torch.full((m, stop - start), float("-inf"), device=pre_bn.device, dtype=pre_bn.dtype)
        top_mg[: min(m, B)] = block_bg.topk(min(m, B), dim=0).values  # sorted
        if distributed.across_ranks():
            top_mg = distributed.gather_rows(top_mg).topk(m, dim=0).values
        cut_g = top_mg.gather(0, (capacity_n[start:stop] - 1)[None]).squeeze(0).clamp_min(0)
        row, col = ((block_bg >= cut_g) & (block_bg > 0)).nonzero(as_tuple=True)
        rows.append(row)
        cols.append(col + start)
        thresholds.append(cut_g)
        start = stop
    return torch.cat(rows), torch.cat(cols), torch.cat(thresholds)


def underused_by_zipf(density_n: torch.Tensor, factor: float) -> torch.Tensor:
    sorted_d, order = density_n.sort(descending=True)
    ranks = torch.arange(1, len(density_n) + 1, dtype=torch.float64, device=density_n.device)
    head = (ranks <= max(2, len(density_n) // 2)) & (sorted_d > 0)
    expected = torch.zeros_like(ranks)
    if int(head.sum()) >= 2:
        log_r, log_d = ranks[head].log(), sorted_d[head].double().log()
        slope = ((log_r - log_r.mean()) * (log_d - log_d.mean())).sum() / (log_r - log_r.mean()).pow(2).sum()
        intercept = log_d.mean() - slope * log_r.mean()
        expected = (intercept + slope * ranks.log()).exp()
    under_sorted = sorted_d.double() < factor * expected
    under_sorted |= sorted_d == 0
    mask = torch.empty_like(under_sorted)
    mask[order] = under_sorted
    return mask

