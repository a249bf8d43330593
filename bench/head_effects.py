"""Attribution patching against exact patching on the embedded model, for a few heads of each
kind: query heads (hook_z), key and value heads (hook_k, hook_v: under SmolLM2's grouped-query
attention each is read by three query heads), and head-to-head edges into each kind of
receiver. Prints each head's two effects, their Pearson correlation per kind and the runtimes:

    python bench/head_effects.py --task ioi --prompts 32 --heads 6 --random 3 --edges 4

The heads are the strongest query heads by attribution patching plus `--random` others drawn with
the seed; key/value heads are those the chosen query heads read; edges run among the strongest
`--edges` query heads, into their z and into the key and value heads they read.
"""

from __future__ import annotations

import argparse
import time

import torch

from interp.circuits.head_effects import (
    KINDS,
    attribution_effects,
    edge_attribution_effects,
    head_acts,
    heads_of,
    patching_effects,
    path_patching_effects,
)
from interp.circuits.tasks import baseline, build_task
from interp.models import ModelConfig


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if len(a) > 2 else float("nan")


def show(label: str, names: list[str], exact: torch.Tensor, estimate: torch.Tensor, seconds: tuple[float, float]) -> None:
    print(f"\n{label}: Pearson {pearson(exact, estimate):.3f}; exact {seconds[0]:.1f} s, attribution {seconds[1]:.1f} s")
    for name, e, a in zip(names, exact.tolist(), estimate.tolist()):
        print(f"  {name:>16}  exact {e:+.4f}  attribution {a:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--edges", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = ModelConfig().load()
    task = build_task(args.task, model.tokenizer, n=args.prompts, seed=args.seed)
    base = baseline(model, task)
    print(f"{task.name}: {len(task)} prompts, metric clean {base.mean_clean:.3f}, corrupt {base.mean_corrupt:.3f}; "
          f"{model.cfg.n_heads} query heads sharing {heads_of(model, 'k')} key/value heads per layer")
    clean, corrupt = head_acts(model, task.clean_nt, KINDS), head_acts(model, task.corrupt_nt, KINDS)
    start = time.perf_counter()
    estimates = attribution_effects(model, task, clean, corrupt)
    attribution_seconds = time.perf_counter() - start

    n_heads, n_kv = model.cfg.n_heads, heads_of(model, "k")
    group = n_heads // n_kv
    strongest = estimates["z"].abs().argsort(descending=True)
    others = strongest[args.heads:][torch.randperm(len(strongest) - args.heads, generator=torch.Generator().manual_seed(args.seed))]
    chosen = {"z": sorted(int(h) for h in torch.cat([strongest[: args.heads], others[: args.random]]))}
    read = sorted({(h // n_heads) * n_kv + (h % n_heads) // group for h in chosen["z"]})
    chosen["k"] = chosen["v"] = read
    for kind in KINDS:
        letter = "H" if kind == "z" else "KV"
        names = [f"L{h // heads_of(model, kind)}{letter}{h % heads_of(model, kind)}" for h in chosen[kind]]
        start = time.perf_counter()
        exact = patching_effects(model, task, base.mean_clean, corrupt[kind], kind=kind, heads=chosen[kind])
        show(f"{kind} heads", names, exact, estimates[kind][chosen[kind]], (time.perf_counter() - start, attribution_seconds))

    top = sorted(int(h) for h in strongest[: args.edges])
    for kind in KINDS:
        per_layer = heads_of(model, kind)
        receivers = top if kind == "z" else sorted({(h // n_heads) * n_kv + (h % n_heads) // group for h in top})
        pairs = [(a, b) for a in top for b in receivers if a // n_heads < b // per_layer]
        letter = "H" if kind == "z" else "KV"
        names = [f"L{a // n_heads}H{a % n_heads}->L{b // per_layer}{letter}{b % per_layer}" for a, b in pairs]
        start = time.perf_counter()
        exact = path_patching_effects(model, task, base.mean_clean, clean["z"], corrupt["z"], pairs, kind=kind)
        exact_seconds = time.perf_counter() - start
        start = time.perf_counter()
        estimate = edge_attribution_effects(model, task, clean["z"], corrupt["z"], pairs, kind=kind)
        show(f"edges into {kind}", names, exact, estimate, (exact_seconds, time.perf_counter() - start))


if __name__ == "__main__":
    main()
