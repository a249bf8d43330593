"""What a coder's features mean: one streaming pass over a corpus that keeps, per feature, its
top-activating contexts, a uniform sample of its firings (shown by activation quantile), its firing
density and an activation histogram; the logit lens of each decoder direction; search.

The pass holds, whatever the corpus length, a fixed number of slots per feature:
- top contexts: the `top_k` largest activations seen so far, each with a window of tokens around
  it and the feature's activation on every token of the window;
- samples: a reservoir of `samples` firings chosen uniformly at random (each firing gets a random
  key; the largest keys are kept, the same top-k machinery), from which the dashboard shows
  contexts in each quarter of the feature's activation distribution;
- counts: firings, summed activation, and a histogram over fixed log-spaced bins.
Windows are cut from the batch the firing occurred in, so no second pass is needed.

Results are saved next to the coder (`features/`: tensors in safetensors, the rest in JSON,
including the string of every token) and reload without the model.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from interp.atomic import write_json, write_tensors
from interp.data import DataConfig
from interp.errors import BadInput, NotFound, check_positive
from interp.hooks import capture, check_coder_fits, output_hook
from interp.run import coder_model
from interp.sae.base import SparseCode, SparseCoder, check_latent

FEATURES_DIR = "features"
# Activations live in the coder's normalised units (inputs scaled to E||x||^2 = d): fixed log bins
# from 1e-3 to 1e3 cover them without knowing each feature's range before the pass.
HIST_EDGES = torch.logspace(-3, 3, 61)


@dataclass
class FeatureConfig:
    tokens: int = 200_000
    """Tokens of text to run through the model and the coder."""
    top_k: int = 20
    """Top-activating contexts kept per feature."""
    samples: int = 40
    """Randomly sampled firings kept per feature (shown by activation quantile)."""
    left: int = 12
    """Tokens of context kept before the activating token."""
    right: int = 4
    """Tokens of context kept after the activating token."""
    logit_tokens: int = 10
    """Top and bottom logit-lens tokens kept per feature."""
    seed: int = 0
    """Seed of the random sample of firings."""
    selection: str = "auto"
    """Precision of the dense encoder product that chooses each token's latents: bfloat16 (several
    times faster on GPUs and on CPUs with bf16 instructions, several times slower on CPUs without
    them; activations are still computed exactly, and TopK's choice is float32's
    (`TopKSAE.select_rounded`), but for threshold families a latent within rounding of the cut may
    be chosen in place of another), float32 (`coder.encode`'s choice exactly), or auto: whichever
    of the two computes the product faster on the coder's device (`selection_dtype`)."""
    checkpoint_every: int = 100_000
    """Tokens between checkpoints of the pass: a killed pass started again resumes from the last."""
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        if self.selection not in ("auto", "bfloat16", "float32"):
            raise BadInput(f"selection must be 'auto', 'bfloat16' or 'float32', not {self.selection!r}")
        for name in ("tokens", "top_k", "samples", "logit_tokens", "checkpoint_every"):
            check_positive(name, getattr(self, name))
        for name in ("left", "right"):
            check_positive(name, getattr(self, name), zero_ok=True)

    @property
    def window(self) -> int:
        return self.left + 1 + self.right


class Context(NamedTuple):
    token_ids: list[int]
    """The window of tokens, the activating one at `center`."""
    acts: list[float]
    """The feature's activation on each token of the window."""
    center: int
    value: float
    """The feature's activation on the activating token."""


@dataclass
class FeatureResults:
    """Everything the pass found, per feature (rows indexed by feature id)."""

    cfg: FeatureConfig
    coder_info: dict
    """The coder's hook(s), model, architecture and number of latents."""
    n_tokens: int
    vocab: list[str]
    """The text of every token id."""
    tensors: dict[str, torch.Tensor]
    """fires_n, act_sum_n, hist_nb, top_{values,tokens,acts}, sample_{values,tokens,acts},
    lens_{top,bottom}_{ids,values} (absent when the logit lens does not apply)."""

    @property
    def n_latents(self) -> int:
        return len(self.tensors["fires_n"])

    @property
    def density_n(self) -> torch.Tensor:
        return self.tensors["fires_n"].double() / max(self.n_tokens, 1)

    @property
    def max_n(self) -> torch.Tensor:
        return self.tensors["top_values_nk"][:, 0].clamp_min(0)

    @property
    def center_tokens_nk(self) -> torch.Tensor:
        """The token each kept top context fired on (-1 in empty slots)."""
        return self.tensors["top_tokens_nkw"][:, :, self.cfg.left].long()

    @property
    def has_logit_lens(self) -> bool:
        return "lens_top_ids_nt" in self.tensors

    def check(self, feature: int) -> int:
        return check_latent(feature, self.n_latents)

    def top_contexts(self, feature: int, n: int | None = None) -> list[Context]:
        self.check(feature)
        return self._contexts("top", feature)[:n]

    def quantile_contexts(self, feature: int, per_quantile: int = 3, quantiles: int = 4) -> list[tuple[str, list[Context]]]:
        """Sampled firings split into `quantiles` equal-count groups by activation, lowest first:
        [(label, contexts)]."""
        self.check(feature)
        sampled = sorted(self._contexts("sample", feature), key=lambda c: c.value)
        groups = []
        for q in range(quantiles):
            part = sampled[q * len(sampled) // quantiles : (q + 1) * len(sampled) // quantiles]
            if part:
                label = f"quantile {q * 100 // quantiles}-{(q + 1) * 100 // quantiles}% ({part[0].value:.2f} to {part[-1].value:.2f})"
                # Evenly spread over the group, so its whole range shows.
                step = max(1, len(part) // per_quantile)
                groups.append((label, part[::step][:per_quantile]))
        return groups

    def _contexts(self, kind: str, feature: int) -> list[Context]:
        values = self.tensors[f"{kind}_values_nk"][feature]
        tokens = self.tensors[f"{kind}_tokens_nkw"][feature]
        acts = self.tensors[f"{kind}_acts_nkw"][feature]
        out = []
        for j in range(len(values)):
            if not values[j] > 0:
                continue
            present = tokens[j] >= 0
            first = int(present.nonzero()[0])
            out.append(Context(
                tokens[j][present].tolist(), acts[j][present].tolist(), self.cfg.left - first, float(values[j]),
            ))
        return out

    def logit_lens(self, feature: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]] | None:
        """(top, bottom) tokens of the feature's decoder direction read through the unembedding."""
        self.check(feature)
        if not self.has_logit_lens:
            return None
        t = self.tensors
        top = [(self.vocab[i], float(v)) for i, v in zip(t["lens_top_ids_nt"][feature].tolist(), t["lens_top_values_nt"][feature])]
        bottom = [(self.vocab[i], float(v)) for i, v in zip(t["lens_bottom_ids_nt"][feature].tolist(), t["lens_bottom_values_nt"][feature])]
        return top, bottom

    def histogram(self, feature: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin edges, counts) of the feature's nonzero activations."""
        self.check(feature)
        return HIST_EDGES, self.tensors["hist_nb"][feature]

    def save(self, run_dir: str | Path) -> Path:
        folder = Path(run_dir) / FEATURES_DIR
        write_tensors(folder / "features.safetensors", {k: v.contiguous() for k, v in self.tensors.items()})
        write_json(folder / "features.json", {
            "config": asdict(self.cfg), "coder": self.coder_info, "n_tokens": self.n_tokens, "vocab": self.vocab,
        })
        return folder


def run_features(run_dir: str | Path, coder: SparseCoder, cfg: FeatureConfig, recompute: bool = False,
                 progress: bool = True) -> tuple[FeatureResults, bool]:
    """(results, reused): the feature results saved in `run_dir`, unless `recompute` or there are
    none; then one pass as `cfg` says over the coder's model, saved there."""
    if (Path(run_dir) / FEATURES_DIR / "features.json").exists() and not recompute:
        return load_features(run_dir), True
    folder = Path(run_dir) / FEATURES_DIR
    results = collect_features(coder_model(coder, str(coder.W_dec.device)), coder, cfg, progress, folder / "partial.safetensors")
    results.save(run_dir)
    return results, False


# Per-context tensors (features x slots x window): read row by row when loaded on demand.
_CONTEXT_TENSORS = tuple(f"{kind}_{name}" for kind in ("top", "sample") for name in ("tokens_nkw", "acts_nkw"))


def load_features(run_dir: str | Path, on_demand: bool = False) -> FeatureResults:
    """Reload what `collect_features` saved in `run_dir`; needs neither the model nor the coder.
    With `on_demand` the context windows (most of the bytes) stay on disk and each indexing reads
    only the rows it asks for: what a server of 65k features needs."""
    folder = Path(run_dir) / FEATURES_DIR
    if not Path(run_dir).is_dir():
        raise NotFound(f"no such folder: {run_dir}")
    if not (folder / "features.json").exists() or not (folder / "features.safetensors").exists():
        raise NotFound(f"{run_dir} holds no feature results; run `interp features {run_dir}` first")
    meta = json.loads((folder / "features.json").read_text())
    cfg_data = meta["config"]
    # Results saved before model_batch moved into DataConfig kept it here.
    data = {**cfg_data["data"], **({"model_batch": cfg_data.pop("model_batch")} if "model_batch" in cfg_data else {})}
    cfg = FeatureConfig(**{**cfg_data, "data": DataConfig(**data)})
    path = folder / "features.safetensors"
    if on_demand:
        with safe_open(path, "pt") as f:
            tensors = {k: _OnDisk(path, k) if k in _CONTEXT_TENSORS else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
    else:
        tensors = load_file(path)
    return FeatureResults(cfg, meta["coder"], meta["n_tokens"], meta["vocab"], tensors)


class _OnDisk:
    """One tensor of a safetensors file, indexed without loading it: `t[i]`, `t[:, :, j]`."""

    def __init__(self, path: Path, name: str):
        self.path, self.name = path, name

    def __getitem__(self, key) -> torch.Tensor:
        with safe_open(self.path, "pt") as f:
            return f.get_slice(self.name)[key]


class _TopSlots:
    """Per feature, the `k` firings with the largest keys so far, with their context windows.

    Firings that beat their feature's k-th key (`entrants`) go to a pool with their windows
    (`admit`); the pool is merged into the slots (one sort) only when it holds as many entries as
    the slots do, so a batch costs a comparison per firing and a window per entrant, and memory
    stays at most twice the slots'. Entrants fall off quickly: after N firings of a feature only
    about k/N of the next beat its k-th.
    """

    def __init__(self, n_latents: int, k: int, window: int):
        self.keys_nk = torch.full((n_latents, k), float("-inf"))
        self.values_nk = torch.zeros(n_latents, k)
        self.tokens_nkw = torch.full((n_latents, k, window), -1, dtype=torch.int32)
        self.acts_nkw = torch.zeros(n_latents, k, window)
        self._pool: list[tuple[torch.Tensor, ...]] = []
        self._pooled = 0

    def entrants(self, feature_e, key_e) -> torch.Tensor:
        """Which firings e (feature, key) beat their feature's k-th key so far: a mask."""
        return key_e > self.keys_nk[feature_e, -1]

    def admit(self, feature_e, key_e, value_e, tokens_ew, acts_ew) -> None:
        """Pool entrants (from `entrants`) with their context windows."""
        if len(feature_e) == 0:
            return
        self._pool.append((feature_e, key_e, value_e, tokens_ew, acts_ew))
        self._pooled += len(feature_e)
        if self._pooled >= self.keys_nk.numel():
            self.merge()

    def merge(self) -> None:
        """Keep, per feature, the k largest keys among the slots and the pool."""
        if not self._pool:
            return
        n, k = self.keys_nk.shape
        feature_e, key_e, value_e, tokens_ew, acts_ew = (torch.cat(parts) for parts in zip(
            (torch.arange(n).repeat_interleave(k), self.keys_nk.reshape(-1), self.values_nk.reshape(-1),
             self.tokens_nkw.reshape(n * k, -1), self.acts_nkw.reshape(n * k, -1)), *self._pool))
        self._pool, self._pooled = [], 0
        # By feature, then by key descending; the rank within a feature is its slot.
        order = key_e.argsort(descending=True, stable=True)
        order = order[feature_e[order].argsort(stable=True)]
        feature_e = feature_e[order]
        count_n = torch.bincount(feature_e, minlength=n)
        first_n = count_n.cumsum(0) - count_n
        rank_e = torch.arange(len(order)) - first_n[feature_e]
        kept = rank_e < k
        order, feature_e, rank_e = order[kept], feature_e[kept], rank_e[kept]
        self.keys_nk[feature_e, rank_e] = key_e[order]
        self.values_nk[feature_e, rank_e] = value_e[order]
        self.tokens_nkw[feature_e, rank_e] = tokens_ew[order]
        self.acts_nkw[feature_e, rank_e] = acts_ew[order]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        self.merge()
        return {f"{prefix}_{name}": getattr(self, name) for name in ("keys_nk", "values_nk", "tokens_nkw", "acts_nkw")}

    def load(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for name in ("keys_nk", "values_nk", "tokens_nkw", "acts_nkw"):
            getattr(self, name).copy_(tensors[f"{prefix}_{name}"])


def _windows(tokens_bt, where_c, feature_c, where_e, feature_e, value_e, left: int, right: int):
    """The context windows (tokens, the feature's activations) of firings c, at flat positions
    `where_c` of `tokens_bt` (sequences x positions), from all the batch's firings e: `left` tokens
    before to `right` after, cut at the sequence's ends (token -1, activation 0 there)."""
    n_positions, s = tokens_bt.numel(), tokens_bt.shape[1]
    offsets_w = torch.arange(-left, right + 1)
    pos_cw = (where_c % s)[:, None] + offsets_w
    inside_cw = (pos_cw >= 0) & (pos_cw < s)
    start_c = where_c - where_c % s
    flat_cw = start_c[:, None] + pos_cw.clamp(0, s - 1)
    tokens_cw = tokens_bt.reshape(-1)[flat_cw].masked_fill(~inside_cw, -1).to(torch.int32)
    # Keyed by (feature, position), a feature's firings inside one window are one run of sorted
    # keys: two binary searches find it, however wide the window.
    lookup_e, order = (feature_e * n_positions + where_e).sort()
    base_c = feature_c * n_positions
    lo_c = torch.searchsorted(lookup_e, base_c + torch.maximum(start_c, where_c - left))
    hi_c = torch.searchsorted(lookup_e, base_c + torch.minimum(start_c + s - 1, where_c + right), right=True)
    count_c = hi_c - lo_c
    owner_m = torch.arange(len(where_c)).repeat_interleave(count_c)
    found_m = lo_c[owner_m] + torch.arange(len(owner_m)) - (count_c.cumsum(0) - count_c)[owner_m]
    acts_cw = torch.zeros(len(where_c), left + 1 + right)
    acts_cw[owner_m, lookup_e[found_m] - base_c[owner_m] - where_c[owner_m] + left] = value_e[order[found_m]]
    return tokens_cw, acts_cw


class FeaturePass:
    """The running state of a feature pass: `feed` it each batch's tokens and code; its state is a
    dict of tensors, so a long pass can be checkpointed and resumed where it stopped."""

    def __init__(self, n_latents: int, cfg: FeatureConfig):
        self.cfg, self.n = cfg, n_latents
        self.top = _TopSlots(n_latents, cfg.top_k, cfg.window)
        self.sample = _TopSlots(n_latents, cfg.samples, cfg.window)
        self.fires_n = torch.zeros(n_latents, dtype=torch.long)
        self.act_sum_n = torch.zeros(n_latents, dtype=torch.float64)
        self.hist_nb = torch.zeros(n_latents, len(HIST_EDGES) - 1, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.tokens = 0
        self.batches = 0

    def feed(self, tokens_bt: torch.Tensor, mask_bt: torch.Tensor, code: SparseCode) -> None:
        """One batch: its tokens, which positions were encoded, and their code (tokens, k)."""
        cfg, n = self.cfg, self.n
        indices_tk, values_tk = code.indices_bk.cpu(), code.values_bk.float().cpu()
        position_t = mask_bt.reshape(-1).nonzero().squeeze(1)  # flat (sequence, position) of each token
        on = (indices_tk >= 0) & (values_tk > 0)
        feature_e, value_e = indices_tk[on], values_tk[on]
        where_e = position_t[:, None].expand_as(indices_tk)[on]
        self.fires_n += torch.bincount(feature_e, minlength=n)
        self.act_sum_n += torch.bincount(feature_e, weights=value_e.double(), minlength=n)
        n_bins = self.hist_nb.shape[1]
        bins_e = (torch.bucketize(value_e, HIST_EDGES) - 1).clamp(0, n_bins - 1)
        self.hist_nb += torch.bincount(feature_e * n_bins + bins_e, minlength=n * n_bins).reshape(n, n_bins)
        # Entrants to either kind of slot get their windows cut once: early in a pass, when every
        # firing enters both, that halves the work.
        top_e = self.top.entrants(feature_e, value_e)
        sample_key_e = torch.rand(len(feature_e), generator=self.generator)
        sample_e = self.sample.entrants(feature_e, sample_key_e)
        cut_e = top_e | sample_e
        tokens_cw, acts_cw = _windows(tokens_bt, where_e[cut_e], feature_e[cut_e], where_e, feature_e, value_e, cfg.left, cfg.right)
        row_e = cut_e.cumsum(0) - 1
        for slots, chosen_e, key_e in ((self.top, top_e, value_e), (self.sample, sample_e, sample_key_e)):
            rows = row_e[chosen_e]
            slots.admit(feature_e[chosen_e], key_e[chosen_e], value_e[chosen_e], tokens_cw[rows], acts_cw[rows])
        self.tokens += len(position_t)
        self.batches += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {
            **self.top.state("top"), **self.sample.state("sample"), "fires_n": self.fires_n, "act_sum_n": self.act_sum_n,
            "hist_nb": self.hist_nb, "generator": self.generator.get_state(),
            "position": torch.tensor([self.tokens, self.batches]),
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.top.load("top", tensors)
        self.sample.load("sample", tensors)
        for name in ("fires_n", "act_sum_n", "hist_nb"):
            getattr(self, name).copy_(tensors[name])
        self.generator.set_state(tensors["generator"])
        self.tokens, self.batches = tensors["position"].tolist()

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the results keep (every kept context sorted by its key, largest first)."""
        top, sample = self.top.state("top"), self.sample.state("sample")
        return {
            "fires_n": self.fires_n, "act_sum_n": self.act_sum_n, "hist_nb": self.hist_nb,
            **{k: v for k, v in {**top, **sample}.items() if not k.endswith("keys_nk")},
        }


@torch.no_grad()
def collect_features(model, coder: SparseCoder, cfg: FeatureConfig | None = None, progress: bool = True,
                     checkpoint: str | Path | None = None) -> FeatureResults:
    """One pass over `cfg.tokens` tokens of `cfg.data` (`stream_features`): contexts, samples,
    density, histograms; then the logit lens of every feature."""
    cfg = cfg or FeatureConfig()
    state = stream_features(model, coder, cfg, progress, checkpoint)
    tensors = state.tensors()
    lens = logit_lens(model, coder, cfg.logit_tokens)
    if lens is not None:
        tensors.update(lens)
    results = FeatureResults(cfg, coder_info(coder), state.tokens, token_strings(model), tensors)
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return results


def coder_info(coder: SparseCoder) -> dict:
    return {
        "arch": coder.arch, "hook": coder.cfg.hook, "target_hook": coder.cfg.target_hook,
        "model": coder.cfg.model, "n_latents": coder.cfg.n_latents,
    }


def selection_dtype(selection: str, device: torch.device) -> torch.dtype:
    """The dtype of the selecting product for `FeatureConfig.selection` on `device`."""
    if selection != "auto":
        return getattr(torch, selection)
    return torch.bfloat16 if device.type == "cuda" else _faster_cpu_dtype()


@functools.cache
def _faster_cpu_dtype() -> torch.dtype:
    """bfloat16 or float32, whichever multiplies an encoder-shaped product (128 tokens x 576 by
    2,048 latents) faster on this CPU, timed once per process: whether bf16 runs natively (AVX-512
    BF16, AMX) or is emulated is the CPU's, and flags name it less reliably than a timing."""
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(128, 576, dtype=dtype), torch.randn(2048, 576, dtype=dtype)
        out = torch.empty(128, 2048, dtype=dtype)
        torch.mm(x, w.t(), out=out)
        start = time.perf_counter()
        for _ in range(2):
            torch.mm(x, w.t(), out=out)
        seconds[dtype] = time.perf_counter() - start
    return min(seconds, key=seconds.get)


@torch.no_grad()
def stream_features(model, coder: SparseCoder, cfg: FeatureConfig, progress: bool = True,
                    checkpoint: str | Path | None = None) -> FeaturePass:
    """The streaming part of the pass: each batch through the model (stopped after the coder's
    layer), the coder and a `FeaturePass`. With `checkpoint` (a file), the pass's state is written
    there every `cfg.checkpoint_every` tokens, and a pass with the same settings started again
    resumes from it."""
    check_coder_fits(model, coder)
    coder.eval()
    state = FeaturePass(coder.cfg.n_latents, cfg)
    # A checkpoint resumes only the same pass: the same settings over the same coder's weights.
    weights = [float(t.double().sum()) for t in (coder.W_enc, coder.b_enc, coder.in_scale)]
    identity = json.dumps({"config": asdict(cfg), "coder": coder_info(coder), "weights": weights}, sort_keys=True)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.exists():
        with safe_open(checkpoint, "pt") as f:
            if f.metadata().get("identity") == identity:
                state.load({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (a safetensors file, not a dict)
    device = coder.W_dec.device
    select_dtype = selection_dtype(cfg.selection, device)
    bar = tqdm(total=cfg.tokens, initial=state.tokens, desc="features", unit="tok", disable=not progress)
    last_saved = state.tokens
    for index, batch in enumerate(cfg.data.batches(model.tokenizer, "train")):
        if state.tokens >= cfg.tokens:
            break
        if index < state.batches:
            continue
        acts_td = capture(model, batch.tokens_bt, [coder.cfg.hook], batch.mask_bt)[coder.cfg.hook].to(device)
        state.feed(batch.tokens_bt, batch.mask_bt, coder.encode(acts_td, select_dtype=select_dtype))
        bar.update(len(acts_td))
        if checkpoint is not None and state.tokens - last_saved >= cfg.checkpoint_every and state.tokens < cfg.tokens:
            write_tensors(checkpoint, state.state(), metadata={"identity": identity})
            last_saved = state.tokens
    bar.close()
    if state.tokens == 0:
        raise BadInput(f"the dataset {cfg.data.dataset!r} is too small for one batch of {cfg.data.model_batch} sequences")
    return state


def token_strings(model) -> list[str]:
    """The text of each token id, as the tokenizer decodes it alone."""
    return model.tokenizer.batch_decode([[i] for i in range(model.cfg.d_vocab)])


def residual_directions(model, coder: SparseCoder) -> torch.Tensor | None:
    """Each feature's decoder direction as a residual-stream vector (n, d_model): as is for a
    residual-width hook, through W_O for `attn.hook_z`; None where no linear map applies."""
    hook = output_hook(coder)
    rows_nd = coder.model_units().W_dec
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.blocks[layer].attn.W_O  # (heads, d_head, d_model)
        return rows_nd.to(W_O.dtype) @ W_O.reshape(-1, W_O.shape[-1])
    if coder.cfg.d_out == model.cfg.d_model:
        return rows_nd
    return None


@torch.no_grad()
def logit_lens(model, coder: SparseCoder, n_tokens: int = 10, chunk: int = 256,
               features: list[int] | None = None) -> dict[str, torch.Tensor] | None:
    """Top and bottom tokens of each feature's direction (of `features` only, in their order,
    when given) pushed through the final norm and the unembedding, as the model treats its last
    residual; the norm's bias (a LayerNorm's shift, the same for every input) is taken out so a
    direction is scored by its own effect."""
    dirs_nd = residual_directions(model, coder)
    if dirs_nd is None:
        return None
    if features is not None:
        dirs_nd = dirs_nd[features]
    W_U = model.W_U  # (d_model, vocab)
    offset = model.ln_final(torch.zeros(1, 1, W_U.shape[0], dtype=W_U.dtype, device=W_U.device))[0, 0]
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("top_ids", "top_values", "bottom_ids", "bottom_values")}
    for start in range(0, len(dirs_nd), chunk):
        rows = dirs_nd[start : start + chunk].to(W_U.device, W_U.dtype)
        logits = (model.ln_final(rows[None])[0] - offset) @ W_U
        top, bottom = logits.topk(n_tokens, dim=1), logits.topk(n_tokens, dim=1, largest=False)
        parts["top_ids"].append(top.indices.cpu())
        parts["top_values"].append(top.values.float().cpu())
        parts["bottom_ids"].append(bottom.indices.cpu())
        parts["bottom_values"].append(bottom.values.float().cpu())
    return {f"lens_{k}_nt": torch.cat(v) for k, v in parts.items()}


class TokenFeatures(NamedTuple):
    token: str
    features: list[tuple[int, float]]
    """The most active features on this token, largest first."""


@torch.no_grad()
def features_on_text(model, coder: SparseCoder, text: str, top: int = 5) -> list[TokenFeatures]:
    """Per token of `text` (BOS left out), the `top` features that fire most on it."""
    check_coder_fits(model, coder)
    tokens = model.to_tokens(text)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    acts_td = capture(model, tokens, [coder.cfg.hook], mask)[coder.cfg.hook]
    code = coder.encode(acts_td.to(coder.W_dec.device))
    out = []
    for token_id, idx_k, val_k in zip(tokens[0, 1:].tolist(), code.indices_bk.cpu(), code.values_bk.cpu()):
        order = val_k.argsort(descending=True)
        feats = [(int(idx_k[j]), float(val_k[j])) for j in order if idx_k[j] >= 0 and val_k[j] > 0][:top]
        out.append(TokenFeatures(model.tokenizer.decode([token_id]), feats))
    return out


def feature_activations(model, coder: SparseCoder, text: str, feature: int) -> tuple[list[str], list[float]]:
    """The tokens of `text` (BOS left out) and `feature`'s activation on each."""
    coder.check_feature(feature)
    per_token = features_on_text(model, coder, text, top=coder.cfg.n_latents)
    return [t.token for t in per_token], [dict(t.features).get(feature, 0.0) for t in per_token]


class Match(NamedTuple):
    feature: int
    hits: int
    """Top contexts whose activating token matched, plus logit-lens tokens that matched."""
    where: str


def search_features(results: FeatureResults, query: str, limit: int = 20) -> list[Match]:
    """Features whose top-activating tokens or logit-lens top tokens contain `query` (case-
    insensitive), most hits first."""
    if not query:
        raise BadInput("the search text is empty")
    needle = query.lower()
    matches_vocab = torch.tensor([needle in text.lower() for text in results.vocab] + [False])
    t = results.tensors
    # Token -1 (no context in that slot) indexes the trailing False.
    context_hits = (matches_vocab[results.center_tokens_nk] & (t["top_values_nk"] > 0)).sum(1)
    lens_hits = matches_vocab[t["lens_top_ids_nt"]].sum(1) if results.has_logit_lens else torch.zeros_like(context_hits)
    total = context_hits + lens_hits
    found = []
    for f in total.argsort(descending=True, stable=True)[:limit].tolist():
        if total[f] == 0:
            break
        where = " and ".join(w for w, h in (("top contexts", context_hits[f]), ("logit lens", lens_hits[f])) if h > 0)
        found.append(Match(f, int(total[f]), where))
    return found


def decoder_neighbours(coder: SparseCoder, feature: int, n: int = 10) -> list[tuple[int, float]]:
    """The `n` features whose decoder directions have the largest cosine similarity to `feature`'s."""
    coder.check_feature(feature)
    rows_nd = coder.W_dec.detach()
    rows_nd = rows_nd / rows_nd.norm(dim=1, keepdim=True).clamp_min(1e-8)
    cos_n = rows_nd @ rows_nd[feature]
    cos_n[feature] = float("-inf")
    best = cos_n.topk(min(n, len(cos_n) - 1))
    return list(zip(best.indices.tolist(), best.values.tolist()))
