"""Several coders from one forward pass on the embedded model: training tokens/s of one run of M
TopK SAEs (M = 1, 4, 8; hooks of one layer, so every run stops the forward at the same depth)
against M separate runs (M times the one-coder run) and against the bound 1 / (1/F + M/S), where
F is the bare stopped forward's tokens/s and S one coder's training step's, both measured in the
same run. A run's rate is its training loop's (forward passes and steps; not its model load).

    python bench/many_coders.py [--tokens 32768] [--layer 6]

The issue's target: at least 0.9 of the bound. Then one coder's training tokens/s in one
process and data parallel in two under torchrun (gloo; each process one thread, its share of
every batch), from the training loop's own log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timing import timed

from interp.data import DataConfig
from interp.hooks import capture
from interp.models import load_model
from interp.run import RunConfig, train_runs
from interp.sae import create_coder
from interp.train import TrainConfig, Trainer

NAMES = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "ln1.hook_normalized",
         "ln2.hook_normalized", "ln2.hook_out"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    hooks = [f"blocks.{args.layer}.{name}" for name in NAMES]
    data = DataConfig()
    model = load_model()
    train = TrainConfig(tokens=args.tokens, batch_size=args.batch_size, eval_every=0, warmup_steps=1, checkpoint_every=10**6)

    # F: the bare forward, stopped after the layer, capturing the hooks, over the same text
    batches = data.batches(model.tokenizer, "train")
    batch = next(batches)
    capture(model, batch.tokens_bt, hooks, batch.mask_bt)
    done, seconds = 0, 0.0
    while done < args.tokens:
        batch = next(batches)
        acts, dt = timed(lambda batch=batch: capture(model, batch.tokens_bt, hooks, batch.mask_bt))
        done, seconds = done + len(acts[hooks[0]]), seconds + dt
    forward = done / seconds
    # S: one coder's training step on a batch of those activations
    x = acts[hooks[0]].repeat(args.batch_size // len(acts[hooks[0]]) + 1, 1)[: args.batch_size]
    coder = create_coder("topk", d_in=x.shape[1], n_latents=8 * x.shape[1], k=32, hook=hooks[0])
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(coder, None, train, scratch)
        trainer.initialize({hooks[0]: x})
        trainer.train_step({hooks[0]: x})
        step = args.batch_size / min(timed(lambda: trainer.train_step({hooks[0]: x}))[1] for _ in range(3))
    print(f"bare stopped forward F: {forward:8.0f} tokens/s; one TopK step S (k 32, {8 * x.shape[1]} latents): {step:8.0f} tokens/s; "
          f"torch threads {torch.get_num_threads()}")
    single = None
    for m in (1, 4, 8):
        out = Path(tempfile.mkdtemp(prefix="many-coders-"))
        try:
            # the buffer holds the run's tokens: one forward per trained token, as in the bound
            cfg = RunConfig(hooks=hooks[:m], coder_options={"k": 32}, train=train, data=data, buffer_tokens=args.tokens)
            runs = train_runs(cfg, out / "run", progress=False, evaluate=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        # the training loop's own rate: forward passes and steps, not the run's model load
        ours = runs[0][1].tokens_per_second
        single = single or ours
        bound = 1 / (1 / forward + m / step)
        print(f"M={m}: one run {ours:7.0f} tokens/s; {m} separate runs {single / m:7.0f} tokens/s ({ours / (single / m):.2f}x); "
              f"bound {bound:7.0f} tokens/s ({ours / bound:.2f} of it)")
    data_parallel(args.tokens, args.layer, args.batch_size)


def logged_rate(command: list[str], out: Path, env: dict) -> float:
    """The last logged tokens/s of an `interp train` run."""
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]


def data_parallel(tokens: int, layer: int, batch_size: int) -> None:
    train = ["train", "--hook", f"blocks.{layer}.hook_resid_post", "--k", "32", "--tokens", str(tokens), "--batch-size", str(batch_size),
             "--buffer-tokens", str(tokens), "--warmup-steps", "1", "--eval-tokens", "2048", "--splice-tokens", "512"]
    with tempfile.TemporaryDirectory(prefix="data-parallel-") as scratch:
        one = logged_rate([sys.executable, "-m", "interp", *train], Path(scratch) / "one", dict(os.environ))
        two = logged_rate([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "interp", *train],
                          Path(scratch) / "two", {**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"one coder, one process ({torch.get_num_threads()} threads): {one:7.0f} tokens/s; data parallel, 2 processes x 1 thread: "
          f"{two:7.0f} tokens/s ({two / 2:7.0f} per rank, {two / one:.2f}x the one process)")


if __name__ == "__main__":
    main()
