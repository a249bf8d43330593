"""What every sparse coder shares: parameters, normalisation, the sparse encode/decode path, its
model-unit view, and the training support the trainer calls.

Notation (as in ../shared/ALGORITHMS.md): x is the hooked activation (d), W_enc (n x d), b_enc (n),
W_dec (n x d here: row i is latent i's unit-norm decoder direction, so the sparse decode gathers
contiguous rows), b_dec (d). Pre-activations z = W_enc (x - b_dec) + b_enc. A family decides which
latents are active (`select`); values are ReLU(z) at those latents (a discrete family, the codebook, gives its codes constant values instead); x_hat = sum values * W_dec + b_dec.

Inputs are scaled by one constant so that E ||x||^2 = d (and targets by their own constant), which
makes learning rates transfer across models and layers; the constants are buffers saved with the
weights, so a loaded coder reproduces its outputs exactly, and outputs are returned in the model's
units. `model_units()` folds them into plain matrices.

State: parameters and buffers in `state_dict()` are what inference needs and what a saved coder
carries (interp.sae.folder); buffers a family registers with `register_training_buffer` (moving
averages' bookkeeping, densities) exist only for training: the trainer's checkpoint keeps them
(`training_state`), a saved coder does not.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from interp import kernels
from interp.allocator import Workspace
from interp.errors import BadInput
from interp.sae.folder import load_coder, save_coder
from interp.sae.losses import fraction_unexplained, shifted_encoder_bias, total_variance


@dataclass
class CoderConfig:
    d_in: int
    """Width of the hooked activation."""
    n_latents: int
    """Number of dictionary latents."""
    hook: str = ""
    """TransformerLens hook the coder reads."""
    target_hook: str | None = None
    """Hook the coder reconstructs, when it differs from `hook` (transcoders)."""
    d_out: int | None = None
    """Width of the target activation (defaults to d_in)."""
    skip: bool = False
    """Add a linear skip connection W_skip (d_out x d_in) from input to output (skip transcoder, Paulo et al. 2025)."""
    model: str = ""
    """Name of the model the coder was trained on, as given to interp.load_model."""

    def __post_init__(self):
        if self.d_in <= 0 or self.n_latents <= 0:
            raise BadInput(f"d_in and n_latents must be positive, got {self.d_in} and {self.n_latents}")
        if self.d_out is None:
            self.d_out = self.d_in


@dataclass(frozen=True)
class SelectContext:
    """What a family may use, in training, to choose a token's latents."""

    dead_mask: torch.Tensor | None = None
    """(n_latents,) bool: latents that have not fired for the trainer's dead window (AuxK)."""
    grad: torch.Tensor | None = None
    """(tokens, d_out): the loss gradient at the hook the coder writes (gradient SAEs), model units."""


NO_CONTEXT = SelectContext()


class SparseCode(NamedTuple):
    indices_bk: torch.Tensor
    """Active latent ids per token (int64); -1 marks an unused slot."""
    values_bk: torch.Tensor
    """Their activations (0 in unused slots)."""


class CoderOutput(NamedTuple):
    x_hat_norm: torch.Tensor
    """Reconstruction, in normalised units (what the losses compare)."""
    out_scale: torch.Tensor
    """The target's normalisation constant."""
    code: SparseCode
    fvu: torch.Tensor
    """Fraction of variance unexplained of this batch (the reconstruction loss)."""
    aux_loss: torch.Tensor
    """The family's auxiliary loss (already weighted); 0 when it has none."""

    @property
    def x_hat(self) -> torch.Tensor:
        """Reconstruction, in the target's units: computed on request, as a training step never
        asks for it (a pass over (tokens, d) saved)."""
        return self.x_hat_norm / self.out_scale


class ModelUnits(NamedTuple):
    """A coder as plain matrices in the model's units: pre-activations z = x @ W_enc.T + b_enc
    (exactly the coder's, so its family selects from them as it does), feature activations as
    `encode` returns them, and x_hat = sum_i f_i W_dec[i] + b_dec (+ x @ W_skip.T)."""

    W_enc: torch.Tensor
    """(n_latents, d_in)"""
    b_enc: torch.Tensor
    """(n_latents,)"""
    W_dec: torch.Tensor
    """(n_latents, d_out): feature i's direction per unit of its activation."""
    b_dec: torch.Tensor
    """(d_out,)"""
    W_skip: torch.Tensor | None
    """(d_out, d_in) for a skip transcoder."""


def check_latent(feature, n_latents: int) -> int:
    """`feature` as a latent index, or a clear error."""
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < n_latents:
        raise BadInput(f"feature {feature!r} is out of range: the coder has {n_latents} latents (0 to {n_latents - 1})")
    return feature


class SparseCoder(nn.Module):
    arch: ClassVar[str]
    config_class: ClassVar[type[CoderConfig]] = CoderConfig
    needs_grad: ClassVar[bool] = False
    """Whether training selects latents with the loss gradient (`SelectContext.grad`)."""
    trainable: ClassVar[bool] = True
    """Whether interp's trainer can train the family (some are only read from other libraries)."""
    discrete: ClassVar[bool] = False
    """Whether a chosen latent's value is a constant of the latent (a code) rather than ReLU(z): its
    activation then has no gradient with respect to the input."""

    def __init__(self, cfg: CoderConfig):
        super().__init__()
        self.cfg = cfg
        n, d, d_out = cfg.n_latents, cfg.d_in, cfg.d_out
        W_dec = torch.randn(n, d_out)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # Gao et al.: the encoder starts as the decoder's transpose (same (n, d) layout here).
        self.W_enc = nn.Parameter(W_dec.clone() if d == d_out else torch.randn(n, d) / math.sqrt(d))
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            # Paulo et al. start the skip connection at zero: the coder begins as a plain transcoder.
            self.W_skip = nn.Parameter(torch.zeros(d_out, d))
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("out_scale", torch.ones(()))
        # Inputs with a norm above this (model units) are outside the coder's domain; inf: none.
        self.register_buffer("input_bound", torch.tensor(math.inf))
        self._training_buffers: list[str] = []
        self.meta: dict = {}
        """Free-form facts saved in cfg.json (training settings, evaluation)."""
        self._preacts = Workspace()
        self._rounded: tuple = (None,)

    def register_training_buffer(self, name: str, tensor: torch.Tensor) -> None:
        """A buffer only training needs: in the trainer's checkpoint, not in a saved coder."""
        self.register_buffer(name, tensor, persistent=False)
        self._training_buffers.append(name)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._training_buffers}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self._training_buffers) - set(state)
        if missing:
            raise BadInput(f"the training state lacks {sorted(missing)}")
        for name in self._training_buffers:
            getattr(self, name).copy_(state[name])

    # --- the domain and the units ----------------------------------------------------------

    @property
    def max_input_norm(self) -> float | None:
        """Tokens whose input norm (model units) exceeds this are outside the coder's domain: left
        out of training and evaluation, and left unchanged when spliced. None: no bound."""
        bound = float(self.input_bound)
        return None if math.isinf(bound) else bound

    def set_max_input_norm(self, bound: float | None) -> None:
        self.input_bound.fill_(math.inf if bound is None else float(bound))

    def inliers(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens,) bool: which rows of `x` the coder covers (all of them without a bound)."""
        if self.max_input_norm is None:
            return torch.ones(len(x), dtype=torch.bool, device=x.device)
        return x.float().norm(dim=1) <= self.max_input_norm

    def check_feature(self, feature) -> int:
        return check_latent(feature, self.cfg.n_latents)

    @torch.no_grad()
    def model_units(self) -> ModelUnits:
        """The coder's matrices with its normalisation folded in: what steering, the logit lens,
        circuits and export read."""
        W_enc = self.W_enc * self.in_scale
        b_enc = self.b_enc - self.W_enc @ self.b_dec if self.cfg.target_hook is None else self.b_enc.clone()
        W_skip = self.W_skip * (self.in_scale / self.out_scale) if self.cfg.skip else None
        return ModelUnits(W_enc, b_enc, self.W_dec / self.out_scale, self.b_dec / self.out_scale, W_skip)

    # --- encode / decode -------------------------------------------------------------------

    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) * self.in_scale

    def preacts(self, enc_in_bd: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense pre-activations z (tokens, n) of the encoder input: the one dense product, computed
        without autograd into a reused workspace on the CPU, in `dtype` (default the coder's);
        gradients reach the weights through `kernels.encode_selected` at the active latents only.
        z never outlives the call."""
        dtype = dtype or self.W_enc.dtype
        out = self._preacts.get(len(enc_in_bd), self.cfg.n_latents, dtype, enc_in_bd.device)
        with torch.no_grad():
            W_enc, b_enc = (self.W_enc, self.b_enc) if dtype == self.W_enc.dtype else self._rounded_encoder(dtype)
            return torch.addmm(b_enc, enc_in_bd.to(dtype), W_enc.t(), out=out)

    def _rounded_encoder(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_enc and b_enc in `dtype`, converted again only when the weights change."""
        key = (dtype, self.W_enc.data_ptr(), self.W_enc._version, self.b_enc.data_ptr(), self.b_enc._version)
        if self._rounded[0] != key:
            self._rounded = (key, self.W_enc.detach().to(dtype), self.b_enc.detach().to(dtype))
        return self._rounded[1], self._rounded[2]

    def encoder_input(self, x_norm: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies, from the normalised input."""
        # An SAE subtracts its decoder bias before encoding; a transcoder's input and output
        # live in different spaces, so it does not. b_dec's gradient through the subtraction
        # reaches it through `encoder_bias`.
        return x_norm - self.b_dec.detach() if self.cfg.target_hook is None else x_norm

    def encoder_bias(self) -> torch.Tensor:
        """b_enc; for an SAE it also carries b_dec's gradient through the encoder input x - b_dec."""
        if self.cfg.target_hook is not None:
            return self.b_enc
        return shifted_encoder_bias(self.b_enc, self.W_enc, self.b_dec)

    def active_values(self, enc_in_bd: torch.Tensor, indices_bk: torch.Tensor, pre_bk: torch.Tensor | None,
                      layout: kernels.LatentLayout | None = None) -> torch.Tensor:
        """ReLU(z) at the selected latents (their pre-activations `pre_bk`, from `select`),
        differentiable through the sparse encoder backward."""
        pre_bk = kernels.encode_selected(enc_in_bd, self.W_enc, self.encoder_bias(), indices_bk, pre_bk=pre_bk, layout=layout)
        return torch.relu(pre_bk).masked_fill(indices_bk < 0, 0.0)

    @abstractmethod
    def select(self, pre_bn: torch.Tensor, ctx: SelectContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, pre-activations) (tokens, k) of the active latents, -1 and any value in unused
        slots; never differentiated. The values come with the choice (a top-k returns them), which
        spares a gather from the (tokens, n) pre-activations."""

    def _code(self, x_norm: torch.Tensor, ctx: SelectContext):
        """The pipeline encode and forward share: (encoder input, z, code, the code's layout)."""
        enc_in_bd = self.encoder_input(x_norm)
        pre_bn = self.preacts(enc_in_bd)
        indices_bk, pre_bk = self.select(pre_bn, ctx)
        # One sort of the active entries by latent, shared by the decoder's and encoder's backward.
        layout = kernels.latent_layout(indices_bk, self.cfg.n_latents)
        values_bk = self.active_values(enc_in_bd, indices_bk, pre_bk, layout)
        return enc_in_bd, pre_bn, SparseCode(indices_bk, values_bk), layout

    def encode(self, x: torch.Tensor, ctx: SelectContext = NO_CONTEXT, select_dtype: torch.dtype | None = None) -> SparseCode:
        """The sparse code of `x`. With `select_dtype` (bfloat16: several times faster on CPUs with
        bf16 instructions and on GPUs) the dense product, which only chooses the latents, runs at
        that precision (`select_rounded`) and the chosen latents' activations are computed again
        exactly."""
        if select_dtype is None or select_dtype == self.W_enc.dtype:
            return self._code(self.normalized_input(x), ctx)[2]
        enc_in_bd = self.encoder_input(self.normalized_input(x))
        indices_bk = self.select_rounded(enc_in_bd, self.preacts(enc_in_bd, select_dtype), ctx)
        return SparseCode(indices_bk, self.active_values(enc_in_bd, indices_bk, None))

    def select_rounded(self, enc_in_bd: torch.Tensor, rounded_bn: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        """(tokens, k) indices chosen from pre-activations computed at a lower precision: by
        default `select` on them, so a latent within that rounding (about 0.4% of the
        pre-activation's scale in bfloat16) of the selection's cut may be chosen in place of
        another. A family whose choice can be made exact from rounded values overrides this."""
        return self.select(rounded_bn, ctx)[0]

    def decode(self, code: SparseCode) -> torch.Tensor:
        """The code's reconstruction in the target's units (without a skip transcoder's linear term)."""
        return kernels.decode(code.indices_bk, code.values_bk, self.W_dec, self.b_dec) / self.out_scale

    def reconstruct(self, x: torch.Tensor, code: SparseCode | None = None, ctx: SelectContext = NO_CONTEXT) -> torch.Tensor:
        """What the coder puts in the target hook's place: decode(encode(x)) plus any skip term
        (pass `code` when x is already encoded)."""
        out = self.decode(self.encode(x, ctx) if code is None else code)
        if self.cfg.skip:
            out = out + self.normalized_input(x) @ self.W_skip.t() / self.out_scale
        return out

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, ctx: SelectContext = NO_CONTEXT) -> CoderOutput:
        """Encode `x`, reconstruct `target` (x itself for an SAE); losses in normalised units."""
        x_norm = self.normalized_input(x)
        target_norm = x_norm if target is None else target.to(self.W_dec.dtype) * self.out_scale
        # The FVU's denominator now, while the target is in cache: after the (tokens, n)
        # pre-activations it would be read from memory again.
        variance = total_variance(target_norm)
        enc_in_bd, pre_bn, code, layout = self._code(x_norm, ctx)
        x_hat_norm = kernels.decode(code.indices_bk, code.values_bk, self.W_dec, self.b_dec, layout=layout)
        if self.cfg.skip:
            x_hat_norm = x_hat_norm + x_norm @ self.W_skip.t()
        fvu = fraction_unexplained(target_norm, x_hat_norm, variance)
        aux = self.aux_loss(enc_in_bd, pre_bn, target_norm, x_hat_norm.detach(), ctx)
        return CoderOutput(x_hat_norm, self.out_scale, code, fvu, aux)

    def aux_loss(self, enc_in_bd, pre_bn, target_norm, x_hat_norm, ctx: SelectContext) -> torch.Tensor:
        return torch.zeros((), device=enc_in_bd.device)

    def decoder_head_fractions(self, n_heads: int) -> torch.Tensor:
        """(n_latents, n_heads): the share of each latent's decoder norm in each head's slice, for a
        coder of attn.hook_z, whose input concatenates the heads (Kissane et al. 2024 attribute a
        feature to the heads holding most of its decoder norm). Rows sum to 1."""
        if self.cfg.d_out % n_heads:
            raise BadInput(f"the target width {self.cfg.d_out} does not split into {n_heads} heads")
        with torch.no_grad():
            norms = self.W_dec.view(self.cfg.n_latents, n_heads, -1).norm(dim=-1)
            return norms / norms.sum(1, keepdim=True).clamp_min(1e-12)

    # --- training support ------------------------------------------------------------------

    @torch.no_grad()
    def fit_normalization(self, x: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Set the scales so that E ||x||^2 = d_in (and likewise for the target)."""
        self.in_scale.fill_(math.sqrt(self.cfg.d_in) / x.float().norm(dim=1).pow(2).mean().sqrt().item())
        if target is None:
            self.out_scale.copy_(self.in_scale)
        else:
            self.out_scale.fill_(
                math.sqrt(self.cfg.d_out) / target.float().norm(dim=1).pow(2).mean().sqrt().item()
            )

    @torch.no_grad()
    def init_from_data(self, target: torch.Tensor, method: str = "geometric_median") -> None:
        """What starts from the first batch (after `fit_normalization`): b_dec, from the target's
        geometric median (Gao et al.) or its mean (`method`), normalised units."""
        points = target.float() * self.out_scale
        if method == "mean":
            self.b_dec.copy_(points.mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(points))
        else:
            raise BadInput(f"unknown decoder bias init {method!r}; use 'geometric_median' or 'mean'")

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each unit decoder row: with the rows renormalised
        after every step, that component would only change their norm and be undone."""
        if self.W_dec.grad is None:
            return
        # In blocks of rows that stay in cache between the product and the in-place subtraction.
        for grad_rd, W_rd in zip(self.W_dec.grad.split(1024), self.W_dec.split(1024)):
            grad_rd.addcmul_((grad_rd * W_rd).sum(1, keepdim=True), W_rd, value=-1)

    # --- folder format ---------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        return save_coder(self, folder)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> SparseCoder:
        return load_coder(cls, folder, device)


def geometric_median(points: torch.Tensor, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the summed Euclidean distance to `points`."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() < tol * median.norm().clamp_min(1e-8):
            return new
        median = new
    return median
