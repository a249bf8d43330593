"""TopK SAE training steps per second on the CPU: interp against sparsify, SAE Lens, and the
floor no TopK SAE can beat (the dense encoder matmul + top-k alone).

    python bench/train_step.py            # d=576, n=9216, k=32, 4096 tokens, fp32, Adam

Every contender trains on the same activations, already in memory, with Adam. interp runs its
real trainer step (interp.train.Trainer.train_step: forward, FVU + AuxK, sparse backward through
interp.kernels, decoder-parallel gradient removed, clipping, Adam, decoder renormalised).
The peers run in their own virtual environments under bench/.peers/ (SAE Lens pins
transformer-lens < 4), through the runners in bench/peers/; bench/peers/environment.py creates
each on first use, atomically, with this environment's torch version and progress on stderr. Every
contender is measured in each of --rounds interleaved rounds and the medians are compared;
within a round, interp and the floor alternate step by step, so their ratio survives a shared
machine's slow spells (the peers run in other processes and cannot be paired so). The last line is
`train-step tok/s: interp=N floor=N sparsify=N saelens=N`; a peer that cannot run prints NA,
with the reason on the line before.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from interp.sae.topk import TopKConfig, TopKSAE
from interp.train import TrainConfig, Trainer

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH / "peers"))
from common import activations  # noqa: E402
from environment import PEERS, peer_python  # noqa: E402


def interp_and_floor(x_bd: torch.Tensor, n: int, k: int, steps: int) -> tuple[float, float]:
    """Tokens/s of interp's training step and of the floor, timed step by step in alternation:
    a slow spell on a shared machine then hits both alike, and their ratio holds still.

    The floor computes each token's top-k pre-activations into one reused buffer (as interp's
    coders do on the CPU: fresh memory for z each step costs page faults)."""
    W_enc_nd = torch.randn(n, x_bd.shape[1]) / x_bd.shape[1] ** 0.5
    b_enc_n = torch.zeros(n)
    pre_bn = torch.empty(len(x_bd), n)

    def floor_step():
        torch.addmm(b_enc_n, x_bd, W_enc_nd.T, out=pre_bn).topk(k, dim=1, sorted=False)

    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=x_bd.shape[1], n_latents=n, k=k, hook="x"))
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(sae, None, TrainConfig(), run_dir)
        trainer.initialize({"x": x_bd})
        contenders = (lambda: trainer.train_step({"x": x_bd}), floor_step)
        for _ in range(2):
            for step in contenders:
                step()
        seconds = [0.0, 0.0]
        for _ in range(steps):
            for i, step in enumerate(contenders):
                start = time.perf_counter()
                step()
                seconds[i] += time.perf_counter() - start
    return tuple(len(x_bd) * steps / s for s in seconds)


def peer(name: str, d: int, n: int, k: int, tokens: int, steps: int) -> float:
    python = peer_python(name)
    shape = [f"--d={d}", f"--n={n}", f"--k={k}", f"--tokens={tokens}", f"--steps={steps}"]
    done = subprocess.run([str(python), str(BENCH / "peers" / f"{name}_step.py"), *shape],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--n", type=int, default=9216)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="Measure every contender this many times, interleaved; report medians.")
    args = parser.parse_args()
    print(f"d={args.d} n={args.n} k={args.k} tokens={args.tokens} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")

    x_bd = activations(args.tokens, args.d)
    # Interleaved rounds: a shared machine's slow spells then hit every contender alike, and the
    # median drops a round that one of them had to itself.
    rounds: dict[str, list[float]] = {name: [] for name in ("interp", "floor", *PEERS)}
    failed: dict[str, str] = {}
    for _ in range(args.rounds):
        ours, bare = interp_and_floor(x_bd, args.n, args.k, args.steps)
        rounds["interp"].append(ours)
        rounds["floor"].append(bare)
        for name in PEERS:
            if name in failed:
                continue
            try:
                rounds[name].append(peer(name, args.d, args.n, args.k, args.tokens, args.steps))
            except (RuntimeError, OSError, ValueError, subprocess.CalledProcessError) as err:
                failed[name] = str(err)
    for name, reason in failed.items():
        print(f"{name}: NA because {reason}")
    for name, values in rounds.items():
        if values:
            print(f"{name}: " + " ".join(f"{v:.0f}" for v in values))
    results = {name: statistics.median(values) if values else None for name, values in rounds.items()}

    ours = results["interp"]
    for name, value in results.items():
        if value is not None and name != "interp":
            print(f"interp / {name}: {ours / value:.2f}")
    print("train-step tok/s: " + " ".join(f"{name}={'NA' if v is None else round(v)}" for name, v in results.items()))


if __name__ == "__main__":
    main()
