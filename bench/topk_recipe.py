"""interp's TopK recipe against sparsify's on the same activations, the same batches in the same
order and the same budget: held-out FVU and dead fraction of each, in one run.

    interp cache --out STORE --hook 'blocks.{L}.hook_resid_post' --layers 7,12 --tokens 500000
    python bench/topk_recipe.py --store STORE --hook blocks.7.hook_resid_post --latents 9216 --k 32

The store's activations at --hook are read once, shuffled once (--seed) and cut into batches of
--batch tokens; every contender trains one pass over them. sparsify trains in its own virtual
environment (bench/peers/environment.py) through bench/peers/sparsify_train.py, which mirrors its
Trainer's step and saves with sparsify's own save_to_disk; interp reads that folder with its
sparsify importer. interp trains with interp.train.Trainer's step and its default TrainConfig
(the batch size and token budget set to the run's), plus any --variant. Every coder is evaluated
by interp.metrics.reconstruction_metrics on the same held-out activations (the store's text,
held-out split): FVU over all held-out tokens, and dead = never fires on them.

--variant NAME:FIELD=VALUE,... adds an interp run whose TrainConfig or TopKConfig fields are set
as given (say `--variant flat:warmup_steps=0,decay_start=1.0`), and two settings no config has,
for measuring what the configs fix: raw_units=True trains in model units (no input scaling to
E ||x||^2 = d, as sparsify trains), enc_norm=R starts the encoder rows at norm R instead of 1
(sparsify's nn.Linear start has rows of norm about 1/sqrt(3) = 0.577). The last line is
`topk recipe FVU: interp=F sparsify-adam=F ...`, then the same for the dead fraction.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from store_runs import heldout, train_one_pass, training_activations

from interp.interop import load_foreign, sparsify
from interp.metrics import reconstruction_metrics
from interp.run import EvalConfig
from interp.sae.topk import TopKConfig, TopKSAE
from interp.train import TrainConfig, Trainer

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
from environment import peer_python

PEER_RECIPES = ("adam", "signum")


BENCH_SETTINGS = ("raw_units", "enc_norm")


def parse_variant(text: str) -> tuple[str, dict, dict, dict]:
    """'NAME:FIELD=VALUE,...' as (name, TrainConfig fields, TopKConfig fields, bench settings)."""
    name, _, settings = text.partition(":")
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    coder_fields = {f.name for f in dataclasses.fields(TopKConfig)}
    train, coder, bench = {}, {}, {}
    for item in filter(None, settings.split(",")):
        field, _, value = item.partition("=")
        group = train if field in train_fields else coder if field in coder_fields else bench if field in BENCH_SETTINGS else None
        if group is None:
            raise SystemExit(f"--variant {text!r}: {field!r} is not a TrainConfig or TopKConfig field nor one of {BENCH_SETTINGS}")
        group[field] = _value(value)
    return name, train, coder, bench


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"None": None, "True": True, "False": False}.get(text, text)


def train_interp(x_nd: torch.Tensor, hook: str, args, train: dict, coder_options: dict, bench: dict) -> TopKSAE:
    torch.manual_seed(args.seed)
    coder = TopKSAE(TopKConfig(d_in=x_nd.shape[1], n_latents=args.latents, k=args.k, hook=hook, **coder_options))
    if "enc_norm" in bench:
        with torch.no_grad():
            coder.W_enc.mul_(bench["enc_norm"])
    steps = len(x_nd) // args.batch
    cfg = TrainConfig(**{"tokens": steps * args.batch, "batch_size": args.batch, "seed": args.seed, **train})

    def model_units(trainer: Trainer, batch: dict) -> None:
        coder.in_scale.fill_(1.0)
        coder.out_scale.fill_(1.0)
        coder.init_from_data(batch[hook], cfg.b_dec_init)

    train_one_pass(coder, x_nd, cfg, after_init=model_units if bench.get("raw_units") else None)
    return coder


def train_sparsify(acts_file: Path, work: Path, args, recipe: str):
    """sparsify's coder, saved as a run folder's hookpoint (the name that says where it reads)."""
    out = work / recipe / sparsify.hookpoint_of(args.hook, None)
    command = [str(peer_python("sparsify")), str(BENCH / "peers" / "sparsify_train.py"), "--acts", str(acts_file),
               "--out", str(out), "--latents", str(args.latents), "--k", str(args.k), "--batch", str(args.batch),
               "--recipe", recipe, "--seed", str(args.seed)]
    subprocess.run(command, check=True, stdout=sys.stderr)
    return load_foreign(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="An activation store written by `interp cache`.")
    parser.add_argument("--hook", default="blocks.7.hook_resid_post")
    parser.add_argument("--tokens", type=int, default=None, help="Train on the store's first N tokens (default: all).")
    parser.add_argument("--latents", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-tokens", type=int, default=EvalConfig.eval_tokens)
    parser.add_argument("--peer", nargs="*", choices=PEER_RECIPES,
                        help="sparsify recipes to train (default: both; none after a bare --peer)")
    parser.add_argument("--variant", action="append", default=[], help="An extra interp run: NAME:FIELD=VALUE,...")
    args = parser.parse_args()

    x_nd = training_activations(args.store, args.hook, args.seed, args.tokens)
    held = heldout(args.store, args.hook, args.heldout_tokens)
    print(f"{args.hook}: {len(x_nd)} training tokens, {sum(len(b[args.hook]) for b in held)} held-out; "
          f"{args.latents} latents, k {args.k}, batch {args.batch}, {len(x_nd) // args.batch} steps, seed {args.seed}")
    results: dict[str, dict] = {}

    def record(name: str, coder, seconds: float) -> None:
        batches = [{coder.cfg.hook: b[args.hook]} for b in held]
        metrics = reconstruction_metrics(coder, batches)
        results[name] = metrics
        print(f"{name}: held-out FVU {metrics['fvu']:.4f}, dead {metrics['dead_frac']:.4f}, L0 {metrics['l0']:.1f}, "
              f"{seconds:.0f} s", flush=True)

    runs = [("interp", {}, {}, {})] + [parse_variant(text) for text in args.variant]
    for name, train, coder_options, bench in runs:
        start = time.perf_counter()
        record(name, train_interp(x_nd, args.hook, args, train, coder_options, bench), time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as work:
        acts_file = Path(work) / "acts.safetensors"
        save_file({"x": x_nd.contiguous()}, str(acts_file))
        for recipe in PEER_RECIPES if args.peer is None else args.peer:
            start = time.perf_counter()
            coder = train_sparsify(acts_file, Path(work), args, recipe)
            record(f"sparsify-{recipe}", coder, time.perf_counter() - start)
    ours = results["interp"]
    for name, metrics in results.items():
        if name.startswith("sparsify"):
            print(f"interp - {name}: FVU {ours['fvu'] - metrics['fvu']:+.4f}, dead {ours['dead_frac'] - metrics['dead_frac']:+.4f}")
    print("topk recipe FVU: " + " ".join(f"{name}={m['fvu']:.4f}" for name, m in results.items()))
    print("topk recipe dead: " + " ".join(f"{name}={m['dead_frac']:.4f}" for name, m in results.items()))


if __name__ == "__main__":
    main()
