"""How good a sparse coder is: reconstruction, sparsity, and the cost of splicing it into the model.

Definitions (all measured on held-out text):
- FVU, fraction of variance unexplained: sum_t ||y_t - y_hat_t||^2 / sum_t ||y_t - mean(y)||^2, where
  y is the coder's target (the hooked activation for an SAE) over all evaluated tokens.
- L0: mean number of active latents per token.
- dead fraction: latents that never fired on the evaluated tokens; dense fraction: latents that
  fired on more than `DENSE_DENSITY` of them.
- spliced loss: mean next-token cross-entropy when the target hook's activation is replaced by the
  coder's reconstruction at every position but BOS; clean loss: the model untouched; zero-ablated
  loss: the same positions set to zero.
- loss recovered: (zero - spliced) / (zero - clean); 1 means the coder loses nothing.
- A coder trained with a norm bound (`max_input_norm`, from training's max_norm_ratio) does not
  cover tokens above it: they are left out of FVU, L0 and densities (their share is reported as
  outlier_frac) and stay clean in the spliced and the zero-ablated passes alike, as BOS does.
- KL: mean over predicted positions of KL(p_clean || p_spliced) of the next-token distributions.
- Batch-level coders (BatchTopK, mutual and feature choice) choose latents over a whole training
  batch but, one token at a time, by thresholds estimated in training; `allocation=True` scores
  them under the allocation they trained with instead, each evaluated batch one allocation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from interp.data import TokenBatch
from interp.errors import BadInput
from interp.hooks import Activations, by_position, output_hook, splice
from interp.sae.base import SparseCoder
from interp.sae.batchtopk import BatchTopKSAE

DENSE_DENSITY = 0.1


@torch.no_grad()
def reconstruction_metrics(coder: SparseCoder, batches: Iterable[Activations], allocation: bool = False) -> dict:
    """FVU, L0, dead and dense fractions of `coder` over activation batches. With `allocation`, a
    batch-level coder selects over each batch as in training (pass batches of the training batch
    size), through a copy, so that its running estimates stay as they were."""
    if allocation:
        if not isinstance(coder, BatchTopKSAE):
            raise BadInput(f"allocation scores batch-level coders (batchtopk, mutual_choice, feature_choice); "
                           f"{coder.arch} selects per token")
        coder = copy.deepcopy(coder)
    hook, target_hook = coder.cfg.hook, output_hook(coder)
    device = coder.W_dec.device
    squared_error = torch.zeros((), dtype=torch.float64, device=device)
    sums = sum_squares = None
    fires = torch.zeros(coder.cfg.n_latents, dtype=torch.long, device=device)
    active = tokens = 0
    was_training = coder.training
    coder.train(allocation)
    outliers = 0
    for batch in batches:
        x, y = batch[hook].to(device), batch[target_hook].to(device)
        keep = coder.inliers(x)
        outliers += int((~keep).sum())
        x, y = x[keep], y[keep].double()
        code = coder.encode(x)
        y_hat = coder.reconstruct(x, code).double()
        squared_error += (y - y_hat).pow(2).sum()
        sums = y.sum(0) if sums is None else sums + y.sum(0)
        sum_squares = y.pow(2).sum(0) if sum_squares is None else sum_squares + y.pow(2).sum(0)
        on = (code.values_bk > 0) & (code.indices_bk >= 0)
        fires += torch.bincount(code.indices_bk[on], minlength=coder.cfg.n_latents)
        active += int(on.sum())
        tokens += len(x)
    coder.train(was_training)
    if tokens == 0:
        raise BadInput("no activations to evaluate on")
    total_variance = (sum_squares - sums.pow(2) / tokens).sum()
    density = fires.double() / tokens
    return {
        "fvu": (squared_error / total_variance).item(),
        "l0": active / tokens,
        "dead_frac": (fires == 0).double().mean().item(),
        "dense_frac": (density > DENSE_DENSITY).double().mean().item(),
        "eval_tokens": tokens,
        "outlier_frac": outliers / (tokens + outliers),
    }


def splice_metrics(model, coder: SparseCoder, batches: Iterable[TokenBatch], progress: bool = True) -> dict:
    """Next-token loss clean, spliced and zero-ablated; loss recovered; KL(clean || spliced)."""
    return splice_metrics_many(model, [coder], batches, progress)[0]


@torch.no_grad()
def splice_metrics_many(model, coders: list[SparseCoder], batches: Iterable[TokenBatch], progress: bool = True) -> list[dict]:
    """`splice_metrics` of several coders of the same hooks, sharing the clean and zero-ablated passes."""
    pairs = {(coder.cfg.hook, output_hook(coder)) for coder in coders}
    if len(pairs) != 1:
        raise BadInput(f"coders evaluated together must read and write the same hooks, got {sorted(pairs)}")
    bounds = {coder.max_input_norm for coder in coders}
    if len(bounds) != 1:
        raise BadInput(f"coders evaluated together must share max_input_norm (they share the clean and zero passes), got {sorted(bounds, key=str)}")
    read_hook, write_hook = pairs.pop()
    reference = {"clean": 0.0, "zero": 0.0}
    totals = [{"spliced": 0.0, "kl": 0.0} for _ in coders]
    count = 0
    was_training = [coder.training for coder in coders]
    for coder in coders:
        coder.eval()
    for batch in tqdm(list(batches), desc="splice eval", disable=not progress, leave=False):
        tokens = batch.tokens_bt.to(model.cfg.device)
        # The clean pass also reads the coders' input (for their domain mask), and the zero pass
        # ablates the written hook: neither puts a coder in, so they are plain hooks, not a splice.
        seen: dict[str, torch.Tensor] = {}

        def read(act, hook):
            seen["input"] = by_position(act)
            return act

        clean_logits = model.run_with_hooks(tokens, fwd_hooks=[(model.hook_dict[read_hook].name, read)]).float()
        # Tokens outside the coders' domain (max_input_norm) stay clean in every pass, as BOS does.
        mask = batch.mask_bt.to(tokens.device)
        mask = mask.masked_scatter(mask, coders[0].inliers(seen.pop("input")[mask]))

        def zero(act, hook):
            flat = by_position(act).clone()
            flat[mask] = 0
            return flat.reshape(act.shape)

        zero_logits = model.run_with_hooks(tokens, fwd_hooks=[(model.hook_dict[write_hook].name, zero)]).float()
        n = tokens[:, 1:].numel()
        reference["clean"] += _next_token_loss(clean_logits, tokens) * n
        reference["zero"] += _next_token_loss(zero_logits, tokens) * n
        clean_logp = F.log_softmax(clean_logits[:, :-1], dim=-1)
        for coder, total in zip(coders, totals):
            with splice(model, [coder], where=mask):
                spliced_logits = model(tokens).float()
            total["spliced"] += _next_token_loss(spliced_logits, tokens) * n
            spliced_logp = F.log_softmax(spliced_logits[:, :-1], dim=-1)
            total["kl"] += (clean_logp.exp() * (clean_logp - spliced_logp)).sum(-1).sum().item()
        count += n
    for coder, mode in zip(coders, was_training):
        coder.train(mode)
    if count == 0:
        raise BadInput("no text to evaluate the splice on")
    clean, zero_loss = reference["clean"] / count, reference["zero"] / count
    results = []
    for total in totals:
        spliced = total["spliced"] / count
        results.append({
            "loss_clean": clean,
            "loss_spliced": spliced,
            "loss_zero": zero_loss,
            "loss_recovered": (zero_loss - spliced) / (zero_loss - clean) if zero_loss != clean else float("nan"),
            "kl": total["kl"] / count,
            "splice_tokens": count,
        })
    return results


@torch.no_grad()
def splice_together_metrics(model, coders: list[SparseCoder], batches: Iterable[TokenBatch], progress: bool = True) -> dict:
    """The next-token loss with every coder spliced in at once (each writing its reconstruction
    where it edits), against the clean model and against every written hook zero-ablated (BOS
    left clean); loss recovered and KL(clean || spliced)."""
    written = [model.hook_dict[output_hook(coder)].name for coder in coders]
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0

    def zero(act, hook):
        act = act.clone()
        act[:, 1:] = 0
        return act

    for batch in tqdm(list(batches), desc="splice eval (together)", disable=not progress, leave=False):
        tokens = batch.tokens_bt.to(model.cfg.device)
        clean_logits = model(tokens).float()
        with splice(model, coders):
            spliced_logits = model(tokens).float()
        zero_logits = model.run_with_hooks(tokens, fwd_hooks=[(name, zero) for name in written]).float()
        n = tokens[:, 1:].numel()
        for key, logits in (("clean", clean_logits), ("spliced", spliced_logits), ("zero", zero_logits)):
            totals[key] += _next_token_loss(logits, tokens) * n
        clean_logp = F.log_softmax(clean_logits[:, :-1], dim=-1)
        totals["kl"] += (clean_logp.exp() * (clean_logp - F.log_softmax(spliced_logits[:, :-1], dim=-1))).sum(-1).sum().item()
        count += n
    if count == 0:
        raise BadInput("no text to evaluate the splice on")
    clean, spliced, zero_loss = (totals[k] / count for k in ("clean", "spliced", "zero"))
    return {"coders": len(coders), "loss_clean": clean, "loss_spliced": spliced, "loss_zero": zero_loss,
            "loss_recovered": (zero_loss - spliced) / (zero_loss - clean) if zero_loss != clean else float("nan"),
            "kl": totals["kl"] / count, "splice_tokens": count}


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
