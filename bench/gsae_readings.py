"""g-SAE's gradient term on stored gradients (fidelity issue, experiment d): how large
beta * |W_dec^T g| is against the pre-activation z, how often it changes the selection, and what
the change does to the first-order loss proxy; then g-SAEs retrained at the betas that matter.

    python bench/gsae_readings.py --store STORE --hook blocks.12.hook_resid_post --latents 9216 --k 16

STORE is written by `interp cache --with-grads`. A TopK SAE (g-SAE at beta 0) is trained one pass
over the store; on held-out tokens with their own gradients (interp's held-out split, one
backward pass each) and for each beta of --betas, with s = z + beta * z * |W_dec^T g| (the
library's GradientSAE.scores, g in normalised units):

- r = beta * |W_dec^T g|, the factor by which the gradient term scales z (s = z (1 + r)): its
  median and 99th percentile over every (token, latent), and its median over TopK's choices;
- overlap: the mean share of a token's k latents that the gradient-scored selection keeps from
  TopK's (1: the gradient changes nothing);
- FVU and the first-order loss proxy |g . (x_hat - x)| (model units, nats per token of the summed
  next-token loss), each under TopK's selection and under the gradient-scored one (which needs the
  token's true gradient: an oracle no spliced coder has).

Then g-SAEs are trained at beta 0 (TopK), 1 (our default) and --retrain betas, and each is scored
as it is used (plain TopK at inference: FVU, the proxy, and the next-token loss spliced into the
model) and under its own gradient selection.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from store_runs import store_model, train_one_pass, training_columns

from interp.hooks import capture, grad_key
from interp.metrics import splice_metrics
from interp.run import EvalConfig, heldout_token_batches
from interp.sae import create_coder
from interp.sae.base import SparseCode
from interp.train import TrainConfig


def make(args, d_in: int, beta: float):
    torch.manual_seed(args.seed)
    return create_coder("gradient", d_in=d_in, n_latents=args.latents, k=args.k, hook=args.hook, beta=beta)


@torch.no_grad()
def readings(coder, held: list[dict[str, torch.Tensor]], hook: str, beta: float) -> dict[str, float]:
    """Selection and loss-proxy readings of `coder` at `beta` on the held-out batches."""
    coder.eval()
    saved, coder.cfg.beta = coder.cfg.beta, beta
    sums = {"overlap": 0.0, "proxy_topk": 0.0, "proxy_grad": 0.0, "sse_topk": 0.0, "sse_grad": 0.0, "var": 0.0}
    ratios, chosen_ratios, tokens = [], [], 0
    for batch in held:
        # Tokens over the norm bound are outside the coder's domain, as interp's metrics treat them.
        keep = coder.inliers(batch[hook])
        x, g = batch[hook][keep], batch[grad_key(hook)][keep]
        pre_bn = coder.preacts(coder.encoder_input(coder.normalized_input(x))).clone()
        topk_bk = pre_bn.topk(coder.cfg.k, dim=1).indices
        ratio_bn = beta * (g.to(coder.W_dec.dtype) / coder.out_scale @ coder.W_dec.t()).abs()
        sample = torch.randint(0, ratio_bn.numel(), (4096,), generator=torch.Generator().manual_seed(len(ratios)))
        ratios.append(ratio_bn.flatten()[sample])
        chosen_ratios.append(ratio_bn.gather(1, topk_bk).flatten())
        grad_bk = coder.scores(pre_bn, g).topk(coder.cfg.k, dim=1).indices
        same = (topk_bk.unsqueeze(2) == grad_bk.unsqueeze(1)).any(2).float().mean(1)
        sums["overlap"] += float(same.sum())
        sums["var"] += float(((x - x.mean(0)) ** 2).sum())
        for name, indices_bk in (("topk", topk_bk), ("grad", grad_bk)):
            values_bk = pre_bn.gather(1, indices_bk).clamp_min(0)
            x_hat = coder.decode(SparseCode(indices_bk, values_bk))
            sums[f"sse_{name}"] += float(((x_hat - x) ** 2).sum())
            sums[f"proxy_{name}"] += float(((x_hat - x) * g).sum(1).abs().sum())
        tokens += len(x)
    coder.cfg.beta = saved
    ratio, chosen = torch.cat(ratios), torch.cat(chosen_ratios)
    return {
        "r_median": float(ratio.median()), "r_p99": float(ratio.quantile(0.99)), "r_chosen_median": float(chosen.median()),
        "overlap": sums["overlap"] / tokens,
        "fvu_topk": sums["sse_topk"] / sums["var"], "fvu_grad": sums["sse_grad"] / sums["var"],
        "proxy_topk": sums["proxy_topk"] / tokens, "proxy_grad": sums["proxy_grad"] / tokens,
    }


def line(label: str, r: dict[str, float]) -> str:
    return (f"{label}: r median {r['r_median']:.3g}, p99 {r['r_p99']:.3g}, median at TopK's choices {r['r_chosen_median']:.3g}; "
            f"overlap with TopK {r['overlap']:.4f}; FVU {r['fvu_topk']:.4f} TopK / {r['fvu_grad']:.4f} gradient-scored; "
            f"|g.(x_hat-x)| {r['proxy_topk']:.4f} / {r['proxy_grad']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="A store written by `interp cache --with-grads`.")
    parser.add_argument("--hook", default="blocks.12.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=None, help="Train on the store's first N tokens (default: all).")
    parser.add_argument("--latents", type=int, default=9216)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-norm-ratio", type=float, default=None, help="TrainConfig.max_norm_ratio for every run.")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 1, 10, 100, 1000, 10000])
    parser.add_argument("--retrain", type=float, nargs="*", default=[100, 1000], help="Betas to train g-SAEs at, besides 0 and 1.")
    parser.add_argument("--heldout-tokens", type=int, default=EvalConfig.eval_tokens)
    parser.add_argument("--splice-tokens", type=int, default=8192)
    args = parser.parse_args()

    keys = [args.hook, grad_key(args.hook)]
    columns = training_columns(args.store, keys, args.seed, args.tokens)
    model, data = store_model(args.store, args.hook)
    held = [capture(model, b.tokens_bt, [args.hook], b.mask_bt, with_grads=True)
            for b in heldout_token_batches(model, data, args.heldout_tokens)]
    splice_batches = heldout_token_batches(model, data, args.splice_tokens)
    n_train, d_in = columns[args.hook].shape
    steps = n_train // args.batch
    cfg = TrainConfig(tokens=steps * args.batch, batch_size=args.batch, seed=args.seed, eval_every=0, max_norm_ratio=args.max_norm_ratio)
    grad_norm = columns[keys[1]].norm(dim=1)
    print(f"{args.hook}: {n_train} training tokens with gradients, {sum(len(b[args.hook]) for b in held)} held-out; "
          f"{args.latents} latents, k {args.k}, batch {args.batch}, {steps} steps, seed {args.seed}; "
          f"|g| (model units) median {grad_norm.median():.3g}, p99 {grad_norm.quantile(0.99):.3g}", flush=True)

    trained = {}
    for beta in [0.0, 1.0] + [b for b in args.retrain if b not in (0.0, 1.0)]:
        start = time.perf_counter()
        trained[beta] = train_one_pass(make(args, d_in, beta), columns, cfg, name=f"g-SAE beta {beta:g}").coder.eval()
        print(f"trained beta {beta:g} in {time.perf_counter() - start:.0f} s", flush=True)

    print("\nReadings of the beta 0 (TopK) SAE at each beta:")
    for beta in args.betas:
        print("  " + line(f"beta {beta:g}", readings(trained[0.0], held, args.hook, beta)), flush=True)

    print("\nEach g-SAE as used (TopK at inference), and under its own gradient selection:")
    for beta, coder in trained.items():
        r = readings(coder, held, args.hook, beta)
        spliced = splice_metrics(model, coder, splice_batches, progress=False)
        print(f"  trained at beta {beta:g}: held-out FVU {r['fvu_topk']:.4f}, |g.(x_hat-x)| {r['proxy_topk']:.4f}, "
              f"spliced loss {spliced['loss_spliced']:.4f} (clean {spliced['loss_clean']:.4f}, KL {spliced['kl']:.4f}); "
              f"gradient-scored: overlap {r['overlap']:.4f}, FVU {r['fvu_grad']:.4f}, |g.(x_hat-x)| {r['proxy_grad']:.4f}", flush=True)


if __name__ == "__main__":
    main()
