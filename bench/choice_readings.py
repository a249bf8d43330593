"""Mutual choice against BatchTopK, to tell our reading of aux_zipf_loss from the method, and the
dead-latent window's length, and feature choice's capacities: the discriminating experiments of
the fidelity issue (a, b, c, e), on a store's activations, every run on the same batches in the
same order.

    python bench/choice_readings.py --store STORE --hook blocks.12.hook_resid_post --latents 9216 --k 16

(a) batchtopk and mutual_choice with the auxiliary loss off and the same seed: the largest
    difference between their weights over every step (0 unless mutual choice has a bug).
(b) mutual_choice with our reading of aux_zipf_loss (aux_mask zipf: latents under the Zipf law
    fitted to the ranked densities) against the mask restricted to dead latents (aux_mask dead,
    AuxK's), and batchtopk with AuxK: per step, how many latents the mask holds, how many latents
    are dead (unfired for the trainer's window), and how many of the dead receive an auxiliary
    slot (are among some token's top-k_aux masked pre-activations).
(c) feature_choice with Zipf capacities of exponent 0 (uniform), 0.5 and 1 over the latent index,
    and at 0.5 and 1 handed out by rank of demand instead (capacity_order demand: how often free
    allocation would pick the latent), all with AuxK's mask (aux_mask dead, so that (b)'s finding
    does not blur the capacities'), next to batchtopk with AuxK; each scored with its inference
    thresholds and with the batch allocation it trained with (the held-out tokens rebatched to
    the training batch size), and the capacity profile: the most tokens one latent may take, the
    budget share of the ten largest, how many latents may take one token per batch.
(e) the dead window at 200k tokens (the default) and at --short-window of the run, for topk and
    mutual_choice with AuxK's mask.

Every run reports held-out FVU, L0 and dead (no firing on the held-out tokens), and dead over the
last fifth of training (no firing in its last fifth of steps).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from store_runs import heldout, train_one_pass, training_activations

from interp.metrics import reconstruction_metrics
from interp.run import EvalConfig
from interp.sae import create_coder
from interp.sae.choice import zipf_capacities
from interp.train import TrainConfig, Trainer


def make(arch: str, x_nd: torch.Tensor, args, **options):
    torch.manual_seed(args.seed)
    return create_coder(arch, d_in=x_nd.shape[1], n_latents=args.latents, k=args.k, hook=args.hook, **options)


def config(args, x_nd: torch.Tensor, **overrides) -> TrainConfig:
    steps = len(x_nd) // args.batch
    return TrainConfig(tokens=steps * args.batch, batch_size=args.batch, seed=args.seed, eval_every=0,
                       max_norm_ratio=args.max_norm_ratio, **overrides)


class AuxSlots:
    """Records, at every auxiliary loss the coder computes, the mask's size and which latents get
    an auxiliary slot, by wrapping the coder's masked_aux_loss (it sees exactly what the step uses)."""

    def __init__(self, coder):
        self.coder, self.recipients, self.masked = coder, None, 0
        inner = coder.masked_aux_loss

        def recording(enc_in_bd, pre_bn, target_norm, x_hat_norm, mask_n):
            self.masked = int(mask_n.sum())
            self.recipients = torch.zeros(coder.cfg.n_latents, dtype=torch.bool)
            if self.masked:
                k_aux = min(coder.cfg.k_aux or coder.cfg.d_in // 2, self.masked)
                top = pre_bn.detach().masked_fill(~mask_n, float("-inf")).topk(k_aux, dim=1).indices
                self.recipients[top.flatten()] = True
            return inner(enc_in_bd, pre_bn, target_norm, x_hat_norm, mask_n)

        coder.masked_aux_loss = recording

    def take(self, dead_n: torch.Tensor) -> tuple[int, int]:
        """(latents masked, dead latents with a slot) at the last step; none when it computed no auxiliary loss."""
        masked, recipients = self.masked, self.recipients
        self.masked, self.recipients = 0, None
        return masked, 0 if recipients is None else int((recipients & dead_n).sum())


def evaluate(name: str, trainer: Trainer, held, seconds: float, extra: str = "", allocation: bool = False) -> None:
    """One line: held-out FVU, L0, dead under inference (and, with `allocation`, under the batch
    allocation, on the held-out tokens in whole batches of the training batch size)."""
    coder, cfg = trainer.coder, trainer.cfg
    hook = coder.cfg.hook
    metrics = reconstruction_metrics(coder, [{hook: b[hook]} for b in held])
    last_fifth = cfg.batch_size * (cfg.steps - int(0.8 * cfg.steps))
    dead_late = (trainer.tokens_since_fired >= last_fifth).float().mean().item()
    if allocation:
        x_nd = torch.cat([b[hook] for b in held])
        whole = [{hook: x_nd[i:i + cfg.batch_size]} for i in range(0, len(x_nd) - cfg.batch_size + 1, cfg.batch_size)]
        allocated = reconstruction_metrics(coder, whole, allocation=True)
        extra = (f"; under the batch allocation ({len(whole)} batches of {cfg.batch_size}): FVU {allocated['fvu']:.4f}, "
                 f"L0 {allocated['l0']:.2f}, dead {allocated['dead_frac']:.4f}") + extra
    print(f"{name}: held-out FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.2f}, dead {metrics['dead_frac']:.4f} held-out, "
          f"{dead_late:.4f} over the last fifth of training; {seconds:.0f} s{extra}", flush=True)


def identical_without_aux(x_nd, args, held) -> None:
    coders = {arch: make(arch, x_nd, args, aux_coef=0.0) for arch in ("batchtopk", "mutual_choice")}
    cfg = config(args, x_nd)
    trainers = {arch: Trainer(coder, None, cfg, tempfile.gettempdir()) for arch, coder in coders.items()}
    largest, first = 0.0, None
    for step in range(cfg.steps):
        batch = {args.hook: x_nd[step * args.batch:(step + 1) * args.batch]}
        for trainer in trainers.values():
            if step == 0:
                trainer.initialize(batch)
            trainer.train_step(batch)
        a, b = (coders[arch].state_dict() for arch in ("batchtopk", "mutual_choice"))
        gap = max((a[name].float() - b[name].float()).abs().max().item() for name in a)
        if gap > 0 and first is None:
            first = step + 1
        largest = max(largest, gap)
    print(f"(a) batchtopk vs mutual_choice, auxiliary loss off: largest weight difference over {cfg.steps} steps "
          f"{largest:.3g}" + (f" (first at step {first})" if first else " (identical at every step)"), flush=True)


def masks(x_nd, args, held) -> None:
    runs = [("mutual_choice", {"aux_mask": "zipf"}), ("mutual_choice", {"aux_mask": "dead"}), ("batchtopk", {})]
    for arch, options in runs:
        coder = make(arch, x_nd, args, **options)
        slots, log = AuxSlots(coder), []
        cfg = config(args, x_nd)

        def record(trainer: Trainer, stats: dict, cfg=cfg, slots=slots, log=log) -> None:
            dead_n = trainer.tokens_since_fired > cfg.dead_tokens
            masked, dead_with_slot = slots.take(dead_n)
            log.append((masked, int(dead_n.sum()), dead_with_slot))

        start = time.perf_counter()
        trainer = train_one_pass(coder, x_nd, cfg, after_step=record, name=f"{arch} {options}")
        seconds = time.perf_counter() - start
        name = f"(b) {arch}" + (f" aux_mask={options['aux_mask']}" if options else " (AuxK)")
        for step in range(0, cfg.steps, max(1, cfg.steps // 8)):
            masked, dead, with_slot = log[step]
            print(f"    step {step + 1}: masked {masked}, dead {dead}, dead with an auxiliary slot {with_slot}")
        steps_with_dead = [entry for entry in log if entry[1] > 0]
        share = (sum(s for _, _, s in steps_with_dead) / max(1, sum(d for _, d, _ in steps_with_dead)))
        extra = (f"; mean masked {sum(m for m, _, _ in log) / len(log):.0f} latents, "
                 f"{share:.3f} of dead latents got a slot on steps with any dead")
        evaluate(name, trainer, held, seconds, extra)


def capacities(x_nd, args, held) -> None:
    runs = [("batchtopk", {})] + [("feature_choice", {"zipf_exponent": e, "capacity_order": "index"}) for e in (0.0, 0.5, 1.0)]
    runs += [("feature_choice", {"zipf_exponent": e, "capacity_order": "demand"}) for e in (0.5, 1.0)]
    for arch, options in runs:
        coder = make(arch, x_nd, args, aux_mask="dead", **options) if options else make(arch, x_nd, args)
        extra = ""
        if options:
            capacity = zipf_capacities(args.latents, args.k * args.batch, args.batch, options["zipf_exponent"])
            extra = (f"; capacities: largest {int(capacity[0])}, ten largest {capacity[:10].sum() / capacity.sum():.3f} "
                     f"of the budget, {int((capacity == 1).sum())} latents at 1 token")
        start = time.perf_counter()
        trainer = train_one_pass(coder, x_nd, config(args, x_nd), name=f"{arch} {options}")
        label = " ".join(f"{name}={value}" for name, value in options.items()) or "(AuxK)"
        evaluate(f"(c) {arch} {label}", trainer, held, time.perf_counter() - start, extra, allocation=True)


def windows(x_nd, args, held) -> None:
    short = max(args.batch, int(args.short_window * (len(x_nd) // args.batch) * args.batch))
    for arch, options in (("topk", {}), ("mutual_choice", {"aux_mask": "dead"})):
        for window in (TrainConfig.dead_tokens, short):
            coder = make(arch, x_nd, args, **options)
            start = time.perf_counter()
            trainer = train_one_pass(coder, x_nd, config(args, x_nd, dead_tokens=window), name=f"{arch} window {window}")
            evaluate(f"(e) {arch} dead window {window} tokens", trainer, held, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="An activation store written by `interp cache`.")
    parser.add_argument("--hook", default="blocks.12.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=None, help="Train on the store's first N tokens (default: all).")
    parser.add_argument("--latents", type=int, default=9216)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-norm-ratio", type=float, default=None, help="TrainConfig.max_norm_ratio for every run.")
    parser.add_argument("--short-window", type=float, default=0.05, help="(e): the short dead window, as a fraction of the run.")
    parser.add_argument("--heldout-tokens", type=int, default=EvalConfig.eval_tokens)
    parser.add_argument("--only", choices=("a", "b", "c", "e"), action="append", help="Run only these experiments.")
    args = parser.parse_args()

    x_nd = training_activations(args.store, args.hook, args.seed, args.tokens)
    held = heldout(args.store, args.hook, args.heldout_tokens)
    print(f"{args.hook}: {len(x_nd)} training tokens, {sum(len(b[args.hook]) for b in held)} held-out; "
          f"{args.latents} latents, k {args.k}, batch {args.batch}, {len(x_nd) // args.batch} steps, seed {args.seed}")
    for key, experiment in (("a", identical_without_aux), ("b", masks), ("c", capacities), ("e", windows)):
        if not args.only or key in args.only:
            experiment(x_nd, args, held)


if __name__ == "__main__":
    main()
