"""What every sparse coder shares: parameters, normalisation, the sparse encode/decode path,
and the folder format.

Notation (as in ../shared/ALGORITHMS.md): x is the hooked activation (d), W_enc (n x d), b_enc (n),
W_dec (n x d here: row i is latent i's unit-norm decoder direction, so the sparse decode gathers
contiguous rows), b_dec (d). Pre-activations z = W_enc (x - b_dec) + b_enc. A family decides which
latents are active (`select`); values are ReLU(z) at those latents; x_hat = sum values * W_dec + b_dec.

Inputs are scaled by one constant so that E ||x||^2 = d (and targets by their own constant), which
makes learning rates transfer across models and layers; the constants are saved with the weights,
so a loaded coder reproduces its outputs exactly, and outputs are returned in the model's units.

Folder format: `cfg.json` ({"format_version", "arch", "config", "meta"}) and `weights.safetensors`.
Loading never unpickles, and rejects a folder whose files are missing, malformed, or disagree.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from interp import kernels
from interp.atomic import write_json, write_tensors
from interp.kernels import torch_ops

FORMAT_VERSION = 1


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
    max_input_norm: float | None = None
    """Tokens whose input norm (model units) exceeds this are outside the coder's domain: left out of training and evaluation, and left unchanged when spliced (set by training's max_norm_ratio)."""

    def __post_init__(self):
        if self.d_in <= 0 or self.n_latents <= 0:
            raise ValueError(f"d_in and n_latents must be positive, got {self.d_in} and {self.n_latents}")
        if self.d_out is None:
            self.d_out = self.d_in


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


class SparseCoder(nn.Module):
    arch: ClassVar[str]
    config_class: ClassVar[type[CoderConfig]] = CoderConfig

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
        self.meta: dict = {}
        """Free-form facts saved in cfg.json (training settings, evaluation)."""
        self._preacts_workspace: torch.Tensor | None = None

    # --- encode / decode -------------------------------------------------------------------

    def inliers(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens,) bool: which rows of `x` the coder covers (all of them unless max_input_norm is set)."""
        if self.cfg.max_input_norm is None:
            return torch.ones(len(x), dtype=torch.bool, device=x.device)
        return x.float().norm(dim=1) <= self.cfg.max_input_norm

    def normalized_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) * self.in_scale

    def preacts(self, enc_in_bd: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense pre-activations z (tokens, n) of the encoder input: the one dense product, computed
        without autograd; gradients reach the weights through `kernels.encode_selected` at the
        active latents only."""
        with torch.no_grad():
            return torch.addmm(self.b_enc, enc_in_bd, self.W_enc.t(), out=out)

    def preacts_workspace(self, enc_in_bd: torch.Tensor) -> torch.Tensor | None:
        """A (tokens, n) buffer that `encode` and `forward` reuse for z on the CPU, where a fresh
        one is fresh memory from the system: first touching its pages cost 45 ms of a 340 ms
        training step (4096 tokens x 9216 latents, 2 cores). None on GPUs, whose allocator
        already reuses memory. z never outlives the call that computes it."""
        if enc_in_bd.device.type != "cpu":
            return None
        rows, workspace = len(enc_in_bd), self._preacts_workspace
        if workspace is None or workspace.shape[0] < rows or workspace.dtype != self.W_enc.dtype:
            workspace = torch.empty(rows, self.cfg.n_latents, dtype=self.W_enc.dtype)
            self._preacts_workspace = workspace
        return workspace[:rows]

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
        return _ShiftedEncoderBias.apply(self.b_enc, self.W_enc, self.b_dec)

    def active_values(self, enc_in_bd: torch.Tensor, indices_bk: torch.Tensor, pre_bk: torch.Tensor) -> torch.Tensor:
        """ReLU(z) at the selected latents (their pre-activations `pre_bk`, from `select`),
        differentiable through the sparse encoder backward."""
        pre_bk = kernels.encode_selected(enc_in_bd, self.W_enc, self.encoder_bias(), indices_bk, pre_bk=pre_bk)
        return torch.relu(pre_bk).masked_fill(indices_bk < 0, 0.0)

    @abstractmethod
    def select(self, pre_bn: torch.Tensor, **context) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, pre-activations) (tokens, k) of the active latents, -1 and any value in unused
        slots; never differentiated. The values come with the choice (a top-k returns them), which
        spares a gather from the (tokens, n) pre-activations."""

    def encode(self, x: torch.Tensor, **context) -> SparseCode:
        enc_in_bd = self.encoder_input(self.normalized_input(x))
        pre_bn = self.preacts(enc_in_bd, out=self.preacts_workspace(enc_in_bd))
        indices_bk, pre_bk = self.select(pre_bn, **context)
        return SparseCode(indices_bk, self.active_values(enc_in_bd, indices_bk, pre_bk))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """The code's reconstruction in the target's units (without a skip transcoder's linear term)."""
        return kernels.decode(code.indices_bk, code.values_bk, self.W_dec, self.b_dec) / self.out_scale

    def reconstruct(self, x: torch.Tensor, code: SparseCode | None = None, **context) -> torch.Tensor:
        """What the coder puts in the target hook's place: decode(encode(x)) plus any skip term
        (pass `code` when x is already encoded)."""
        out = self.decode(self.encode(x, **context) if code is None else code)
        if self.cfg.skip:
            out = out + self.normalized_input(x) @ self.W_skip.t() / self.out_scale
        return out

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, **context) -> CoderOutput:
        """Encode `x`, reconstruct `target` (x itself for an SAE); losses in normalised units.
        `context` carries what a family may use in training (e.g. `dead_mask`, `grad`)."""
        x_norm = self.normalized_input(x)
        target_norm = x_norm if target is None else target.to(self.W_dec.dtype) * self.out_scale
        # The FVU's denominator now, while the target is in cache: after the (tokens, n)
        # pre-activations it would be read from memory again.
        variance = total_variance(target_norm)
        enc_in_bd = self.encoder_input(x_norm)
        pre_bn = self.preacts(enc_in_bd, out=self.preacts_workspace(enc_in_bd))
        indices_bk, pre_bk = self.select(pre_bn, **context)
        values_bk = self.active_values(enc_in_bd, indices_bk, pre_bk)
        x_hat_norm = kernels.decode(indices_bk, values_bk, self.W_dec, self.b_dec)
        if self.cfg.skip:
            x_hat_norm = x_hat_norm + x_norm @ self.W_skip.t()
        fvu = fraction_unexplained(target_norm, x_hat_norm, variance)
        aux = self.aux_loss(enc_in_bd, pre_bn, target_norm, x_hat_norm.detach(), **context)
        return CoderOutput(x_hat_norm, self.out_scale, SparseCode(indices_bk, values_bk), fvu, aux)

    def aux_loss(self, enc_in_bd, pre_bn, target_norm, x_hat_norm, **context) -> torch.Tensor:
        return torch.zeros((), device=enc_in_bd.device)

    def decoder_head_fractions(self, n_heads: int) -> torch.Tensor:
        """(n_latents, n_heads): the share of each latent's decoder norm in each head's slice, for a
        coder of attn.hook_z, whose input concatenates the heads (Kissane et al. 2024 attribute a
        feature to the heads holding most of its decoder norm). Rows sum to 1."""
        if self.cfg.d_out % n_heads:
            raise ValueError(f"the target width {self.cfg.d_out} does not split into {n_heads} heads")
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
    def init_decoder_bias(self, target: torch.Tensor, method: str = "geometric_median") -> None:
        """b_dec from the data: its geometric median (Gao et al.) or its mean, normalised units."""
        points = target.float() * self.out_scale
        if method == "mean":
            self.b_dec.copy_(points.mean(0))
        elif method == "geometric_median":
            self.b_dec.copy_(geometric_median(points))
        else:
            raise ValueError(f"unknown decoder bias init {method!r}; use 'geometric_median' or 'mean'")

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        # linalg's norm: 1.2 against 1.5 ms for Tensor.norm with the division (9216 x 576, CPU).
        self.W_dec /= torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each unit decoder row: with the rows renormalised
        after every step, that component would only change their norm and be undone."""
        if self.W_dec.grad is None:
            return
        # In blocks of rows that stay in cache between the product and the in-place subtraction:
        # 2.9 ms against 4.5 for whole-matrix ops and 7.6 for linalg.vecdot (9216 x 576, CPU).
        for grad_rd, W_rd in zip(self.W_dec.grad.split(1024), self.W_dec.split(1024)):
            grad_rd.addcmul_((grad_rd * W_rd).sum(1, keepdim=True), W_rd, value=-1)

    # --- folder format ---------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        write_tensors(folder / "weights.safetensors", self.state_dict())
        write_json(
            folder / "cfg.json",
            {"format_version": FORMAT_VERSION, "arch": self.arch, "config": asdict(self.cfg), "meta": self.meta},
        )
        return folder

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu") -> SparseCoder:
        folder = Path(folder)
        cfg_data = read_cfg(folder)
        config = build_config(cls.config_class, cfg_data["config"], folder)
        coder = cls(config)
        coder.meta = cfg_data.get("meta", {})
        coder.load_state_dict(read_weights(folder, coder.state_dict()))
        return coder.to(device)


def build_config(config_class: type[CoderConfig], values: dict, folder: Path) -> CoderConfig:
    known = {f.name for f in fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{folder / 'cfg.json'}: unknown config fields {sorted(unknown)} for {config_class.__name__}")
    try:
        return config_class(**values)
    except TypeError as err:
        raise ValueError(f"{folder / 'cfg.json'}: bad config: {err}") from err


def read_cfg(folder: Path) -> dict:
    path = folder / "cfg.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; a saved coder is a folder holding cfg.json and weights.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no cfg.json: it is not a saved sparse coder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "arch" not in data or "config" not in data:
        raise ValueError(f"{path} lacks 'arch' or 'config': not a cfg.json written by interp")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this interp reads version {FORMAT_VERSION}")
    return data


def read_weights(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path = folder / "weights.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no weights.safetensors")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is corrupt or not a safetensors file: {err}") from err
    missing, extra = set(expected) - set(weights), set(weights) - set(expected)
    if missing or extra:
        raise ValueError(f"{path} does not match cfg.json: missing {sorted(missing)}, unexpected {sorted(extra)}")
    for name, tensor in expected.items():
        if weights[name].shape != tensor.shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(weights[name].shape)}, cfg.json implies {tuple(tensor.shape)}"
            )
    return weights


class _ShiftedEncoderBias(torch.autograd.Function):
    """b_enc forward; backward also gives b_dec the gradient it gets through the encoder input
    x - b_dec of z = W_enc (x - b_dec) + b_enc, which is -(d b_enc) W_enc: one matrix-vector
    product, where autograd through the subtraction would gather a (tokens, d) gradient of the
    input and sum it (1.5 against 4.7 ms a step at 4096 tokens x 9216 latents x 576, CPU)."""

    @staticmethod
    def forward(ctx, b_enc_n, W_enc_nd, b_dec_d):
        ctx.save_for_backward(W_enc_nd)
        ctx.b_dec_dtype = b_dec_d.dtype
        return b_enc_n.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_n):
        (W_enc_nd,) = ctx.saved_tensors
        grad_b_dec = None
        if ctx.needs_input_grad[2]:
            grad_b_dec = -_weighted_row_sum(grad_n.to(W_enc_nd.dtype), W_enc_nd).to(ctx.b_dec_dtype)
        return grad_n, None, grad_b_dec


def _weighted_row_sum(weights_n: torch.Tensor, table_nd: torch.Tensor) -> torch.Tensor:
    """weights @ table. The CPU's BLAS computes a vector-matrix product on one core; the kernels'
    segment sum over 8 blocks of rows uses all of them, and the 8 partial sums are added (0.7
    against 1.4 ms at 9216 x 576, 2 cores)."""
    if table_nd.device.type != "cpu":
        return weights_n @ table_nd
    n, step = len(table_nd), -(-len(table_nd) // 8)
    bounds = torch.arange(0, n + step, step).clamp(max=n)  # the last bound is the first >= n
    return torch_ops.segment_sum(table_nd, torch.arange(n), weights_n, bounds).sum(0)


class _SquaredError(torch.autograd.Function):
    """sum ||x_hat - target||^2 as one dot product, and a backward of one pass: autograd through
    (target - x_hat).pow(2).sum() writes the square and three more (tokens, d) tensors (6.1
    against 3.7 ms for the whole FVU and its backward at 4096 x 576, CPU)."""

    @staticmethod
    def forward(ctx, x_hat, target):
        diff = (x_hat - target).flatten()
        ctx.save_for_backward(diff)
        ctx.shape = x_hat.shape
        return torch.dot(diff, diff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        grad_x_hat = (diff * (2 * grad)).view(ctx.shape)
        return grad_x_hat, -grad_x_hat if ctx.needs_input_grad[1] else None


def total_variance(target: torch.Tensor) -> torch.Tensor:
    """sum ||target - mean(target)||^2 over the batch: the FVU's denominator."""
    centered = (target - target.mean(0)).flatten()
    return torch.dot(centered, centered)


def fraction_unexplained(target: torch.Tensor, x_hat: torch.Tensor, variance: torch.Tensor | None = None) -> torch.Tensor:
    """FVU = sum ||target - x_hat||^2 / sum ||target - mean(target)||^2 over the batch; pass
    `variance` when total_variance(target) is already known."""
    variance = total_variance(target) if variance is None else variance
    return _SquaredError.apply(x_hat, target) / variance.clamp_min(1e-12)


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
