"""The code method of O'Neill & Bui 2024 under several settings, scored against one reference.

`interp circuit heads` computes the reference (exact patching of every head, path patching of
edges) once, which is nearly all of its time; this script reads that reference from its
heads.json and rebuilds the same prompts, then for each setting (head vector space, coder family,
training prompts, seed) trains the shared coder, takes the codes and prints how their node and
edge scores find the reference, in the same run:

    interp circuit heads --task ioi --prompts 64 --out runs/heads-ioi
    python bench/head_codes.py --reference runs/heads-ioi/heads.json --space z --space result \
        --arch codebook --arch topk --train-prompts 10 --train-prompts 128 --seed 0 --seed 1 --seed 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

from interp.circuits.head_codes import (
    HeadsConfig,
    agreement,
    edge_scores,
    head_codes,
    head_vectors,
    node_scores,
    train_head_coder,
)
from interp.circuits.head_effects import head_z
from interp.circuits.tasks import build_task
from interp.models import ModelConfig

KEYS = ("roc_auc", "precision_at_n", "best_f1", "best_paper_f1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="heads.json written by `interp circuit heads`.")
    parser.add_argument("--space", action="append", choices=["z", "result"])
    parser.add_argument("--arch", action="append")
    parser.add_argument("--train-prompts", action="append", type=int)
    parser.add_argument("--seed", action="append", type=int)
    args = parser.parse_args()

    reference = json.loads(open(args.reference).read())
    base = HeadsConfig(**reference["config"])
    model = ModelConfig().load()
    task = build_task(base.task, model.tokenizer, n=base.prompts, seed=base.seed)
    z_clean, z_corrupt = head_z(model, task.clean_nt), head_z(model, task.corrupt_nt)
    gap = abs(reference["baseline"]["mean_clean"] - reference["baseline"]["mean_corrupt"])
    labels = torch.tensor(reference["exact_effect"]).abs() >= base.reference_share * gap
    index = {name: i for i, name in enumerate(reference["heads"])}
    pairs = [(index[a], index[b]) for a, b in reference["edges"]["pairs"]]
    edge_labels = torch.tensor(reference["edges"]["reference"])
    print(f"{task.name}: {len(task)} prompts, {int(labels.sum())} reference heads of {len(labels)}, "
          f"{int(edge_labels.sum())} reference edges of {len(pairs)}")
    print("attribution patching (from heads.json): " + ", ".join(f"{k} {reference['nodes']['attribution'][k]:.3f}" for k in KEYS))

    header = "| space | arch | train prompts | distinct codes | " + " | ".join(f"nodes {k}" for k in KEYS) + " | edges roc_auc | edges best_paper_f1 | s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for space in args.space or ["z"]:
        positive, negative = head_vectors(model, z_clean, space), head_vectors(model, z_corrupt, space)
        both = torch.cat([positive, negative])
        for arch in args.arch or ["codebook"]:
            for train_prompts in args.train_prompts or [10]:
                rows = []
                for seed in args.seed or [0]:
                    cfg = replace(base, space=space, arch=arch, train_prompts=train_prompts, seed=seed)
                    start = time.perf_counter()
                    drawn = torch.randperm(2 * len(task), generator=torch.Generator().manual_seed(seed))[:train_prompts]
                    coder = train_head_coder(both[drawn].reshape(-1, both.shape[-1]), cfg, f"heads.hook_{space}")
                    codes_pos, codes_neg = head_codes(coder, positive), head_codes(coder, negative)
                    nodes = agreement(node_scores(codes_pos, codes_neg), labels)
                    edges = agreement(edge_scores(codes_pos, codes_neg, pairs, cfg.latents), edge_labels)
                    distinct = torch.unique(torch.cat([codes_pos, codes_neg])).numel()
                    rows.append({**{f"n_{k}": nodes[k] for k in KEYS}, "e_roc_auc": edges["roc_auc"],
                                 "e_best_paper_f1": edges["best_paper_f1"], "distinct": distinct, "s": time.perf_counter() - start})

                def cell(key):
                    values = [r[key] for r in rows if r[key] is not None]
                    if not values:
                        return "n/a"
                    spread = (max(values) - min(values)) / 2
                    return f"{statistics.mean(values):.3f} ± {spread:.3f}" if len(values) > 1 else f"{values[0]:.3f}"

                print(f"| {space} | {arch} | {train_prompts} | {statistics.mean(r['distinct'] for r in rows):.0f} | "
                      + " | ".join(cell(f"n_{k}") for k in KEYS) + f" | {cell('e_roc_auc')} | {cell('e_best_paper_f1')} | "
                      f"{statistics.mean(r['s'] for r in rows):.1f} |", flush=True)
    print(f"means over seeds {args.seed or [0]}; ± is half the range")


if __name__ == "__main__":
    main()
