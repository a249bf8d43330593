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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from interp.atomic import write_json, write_tensors
from interp.data import DataConfig
from interp.errors import BadInput, NotFound, check_positive
from interp.hooks import capture, check_coder_fits, output_hook
from interp.run import coder_model
from interp.sae.base import SparseCoder, check_latent

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
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        for name in ("tokens", "top_k", "samples", "logit_tokens"):
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
    results = collect_features(coder_model(coder, str(coder.W_dec.device)), coder, cfg, progress)
    results.save(run_dir)
    return results, False


def load_features(run_dir: str | Path) -> FeatureResults:
    """Reload what `collect_features` saved in `run_dir`; needs neither the model nor the coder."""
    folder = Path(run_dir) / FEATURES_DIR
    if not (folder / "features.json").exists() or not (folder / "features.safetensors").exists():
        raise NotFound(f"{run_dir} holds no feature results; run `interp features {run_dir}` first")
    meta = json.loads((folder / "features.json").read_text())
    cfg_data = meta["config"]
    # Results saved before model_batch moved into DataConfig kept it here.
    data = {**cfg_data["data"], **({"model_batch": cfg_data.pop("model_batch")} if "model_batch" in cfg_data else {})}
    cfg = FeatureConfig(**{**cfg_data, "data": DataConfig(**data)})
    return FeatureResults(cfg, meta["coder"], meta["n_tokens"], meta["vocab"], load_file(folder / "features.safetensors"))


class _TopSlots:
    """Per feature, the `k` firings with the largest keys so far, with their context windows."""

    def __init__(self, n_latents: int, k: int, window: int):
        self.keys_nk = torch.full((n_latents, k), float("-inf"))
        self.values_nk = torch.zeros(n_latents, k)
        self.tokens_nkw = torch.full((n_latents, k, window), -1, dtype=torch.int32)
        self.acts_nkw = torch.zeros(n_latents, k, window)

    def offer(self, feature_e, key_e, value_e, window_fn) -> None:
        """Consider firings e (feature, key, value); `window_fn(selected)` cuts their windows."""
        k = self.keys_nk.shape[1]
        # Only firings that beat their feature's current k-th key can enter.
        beats = key_e > self.keys_nk[feature_e, -1]
        if not beats.any():
            return
        sel = beats.nonzero().squeeze(1)
        # Rank within each feature by key, descending; keep the best k of the batch per feature.
        order = key_e[sel].argsort(descending=True, stable=True)
        order = order[feature_e[sel][order].argsort(stable=True)]
        sel = sel[order]
        feats = feature_e[sel]
        group_start = torch.searchsorted(feats, feats, side="left")
        rank = torch.arange(len(feats)) - group_start
        sel, feats, rank = sel[rank < k], feats[rank < k], rank[rank < k]
        rows = feats.unique()
        slot = torch.searchsorted(rows, feats)
        new_keys = torch.full((len(rows), k), float("-inf"))
        new_keys[slot, rank] = key_e[sel]
        best = torch.cat([self.keys_nk[rows], new_keys], 1).topk(k, dim=1).indices
        # Windows are cut only for the firings that made it into the kept k: early in a pass
        # most candidates do, later very few.
        survives = torch.zeros(len(rows), 2 * k, dtype=torch.bool)
        survives[torch.arange(len(rows))[:, None], best] = True
        kept = survives[slot, k + rank]
        tokens_ew, acts_ew = window_fn(sel[kept])
        width = tokens_ew.shape[1]
        new_values = torch.zeros(len(rows), k)
        new_tokens = torch.full((len(rows), k, width), -1, dtype=torch.int32)
        new_acts = torch.zeros(len(rows), k, width)
        new_values[slot, rank] = value_e[sel]
        new_tokens[slot[kept], rank[kept]] = tokens_ew
        new_acts[slot[kept], rank[kept]] = acts_ew
        self.keys_nk[rows] = torch.cat([self.keys_nk[rows], new_keys], 1).gather(1, best)
        self.values_nk[rows] = torch.cat([self.values_nk[rows], new_values], 1).gather(1, best)
        best_w = best[:, :, None].expand(-1, -1, width)
        self.tokens_nkw[rows] = torch.cat([self.tokens_nkw[rows], new_tokens], 1).gather(1, best_w)
        self.acts_nkw[rows] = torch.cat([self.acts_nkw[rows], new_acts], 1).gather(1, best_w)


@torch.no_grad()
def collect_features(model, coder: SparseCoder, cfg: FeatureConfig | None = None, progress: bool = True) -> FeatureResults:
    """One pass over `cfg.tokens` tokens of `cfg.data`: contexts, samples, density, histograms;
    then the logit lens of every feature."""
    cfg = cfg or FeatureConfig()
    check_coder_fits(model, coder)
    coder.eval()
    n, device = coder.cfg.n_latents, coder.W_dec.device
    top = _TopSlots(n, cfg.top_k, cfg.window)
    sample = _TopSlots(n, cfg.samples, cfg.window)
    fires_n = torch.zeros(n, dtype=torch.long)
    act_sum_n = torch.zeros(n, dtype=torch.float64)
    n_bins = len(HIST_EDGES) - 1
    hist_nb = torch.zeros(n * n_bins, dtype=torch.long)
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = 0
    bar = tqdm(total=cfg.tokens, desc="features", unit="tok", disable=not progress)
    for batch in cfg.data.batches(model.tokenizer, "train"):
        if seen >= cfg.tokens:
            break
        acts_td = capture(model, batch.tokens_bt, [coder.cfg.hook], batch.mask_bt)[coder.cfg.hook].to(device)
        code = coder.encode(acts_td)
        indices_tk, values_tk = code.indices_bk.cpu(), code.values_bk.float().cpu()
        b, s = batch.tokens_bt.shape
        position_t = batch.mask_bt.reshape(-1).nonzero().squeeze(1)  # flat (sequence, position) of each token
        # Per position of the batch, its code (BOS and padding hold none): windows read from here.
        indices_pk = torch.full((b * s, indices_tk.shape[1]), -1, dtype=torch.long)
        values_pk = torch.zeros(b * s, indices_tk.shape[1])
        indices_pk[position_t], values_pk[position_t] = indices_tk, values_tk
        on = (indices_tk >= 0) & (values_tk > 0)
        feature_e, value_e = indices_tk[on], values_tk[on]
        where_e = position_t[:, None].expand_as(indices_tk)[on]
        fires_n += torch.bincount(feature_e, minlength=n)
        act_sum_n += torch.bincount(feature_e, weights=value_e.double(), minlength=n)
        bins_e = (torch.bucketize(value_e, HIST_EDGES) - 1).clamp(0, n_bins - 1)
        hist_nb += torch.bincount(feature_e * n_bins + bins_e, minlength=n * n_bins)

        def window_fn(sel, feature_e=feature_e, where_e=where_e, tokens_bt=batch.tokens_bt, s=s,
                      indices_pk=indices_pk, values_pk=values_pk):
            where, feats = where_e[sel], feature_e[sel]
            offsets = torch.arange(-cfg.left, cfg.right + 1)
            pos_ew = (where % s)[:, None] + offsets
            inside = (pos_ew >= 0) & (pos_ew < s)
            flat_ew = (where - where % s)[:, None] + pos_ew.clamp(0, s - 1)
            tokens_ew = tokens_bt.reshape(-1)[flat_ew].masked_fill(~inside, -1).to(torch.int32)
            match = indices_pk[flat_ew] == feats[:, None, None]
            acts_ew = (values_pk[flat_ew] * match).sum(-1) * inside
            return tokens_ew, acts_ew

        top.offer(feature_e, value_e, value_e, window_fn)
        sample.offer(feature_e, torch.rand(len(feature_e), generator=generator), value_e, window_fn)
        seen += len(acts_td)
        bar.update(len(acts_td))
    bar.close()
    if seen == 0:
        raise BadInput(f"the dataset {cfg.data.dataset!r} is too small for one batch of {cfg.data.model_batch} sequences")
    tensors = {
        "fires_n": fires_n, "act_sum_n": act_sum_n, "hist_nb": hist_nb.reshape(n, n_bins),
        "top_values_nk": top.values_nk, "top_tokens_nkw": top.tokens_nkw, "top_acts_nkw": top.acts_nkw,
        "sample_values_nk": sample.values_nk, "sample_tokens_nkw": sample.tokens_nkw, "sample_acts_nkw": sample.acts_nkw,
    }
    lens = logit_lens(model, coder, cfg.logit_tokens)
    if lens is not None:
        tensors.update(lens)
    coder_info = {
        "arch": coder.arch, "hook": coder.cfg.hook, "target_hook": coder.cfg.target_hook,
        "model": coder.cfg.model, "n_latents": n,
    }
    return FeatureResults(cfg, coder_info, seen, token_strings(model), tensors)


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
def logit_lens(model, coder: SparseCoder, n_tokens: int = 10, chunk: int = 256) -> dict[str, torch.Tensor] | None:
    """Top and bottom tokens of each feature's direction pushed through the final norm and the
    unembedding, as the model treats its last residual; the norm's bias (a LayerNorm's shift, the
    same for every input) is taken out so a direction is scored by its own effect."""
    dirs_nd = residual_directions(model, coder)
    if dirs_nd is None:
        return None
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
    k = torch.arange(t["top_tokens_nkw"].shape[2]) == results.cfg.left
    center_nk = t["top_tokens_nkw"][:, :, k].squeeze(2).long()
    # Token -1 (no context in that slot) indexes the trailing False.
    context_hits = (matches_vocab[center_nk] & (t["top_values_nk"] > 0)).sum(1)
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
