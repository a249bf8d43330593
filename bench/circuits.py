"""Circuit passes on the embedded model: the node effects of a task's prompts through saved coders
by attribution patching (one forward and one backward for all coders, plus the coders' encodes)
against the bare forward and backward of the same prompts (its floor), and one integrated-
gradient step per coder, in the same run; also peak memory (RSS).

    python bench/circuits.py --coder runs/l3 --coder runs/l8 [--task ioi] [--prompts 100]

The issue's target: a 100-prompt attribution-patching pass over coders at 8 layers in under
2 minutes on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import resource

import torch
from timing import timed

from interp.circuits import build_task
from interp.circuits.attribution import Groups, metric_gradients, node_effects
from interp.circuits.circuit import forward_order
from interp.circuits.states import coder_states
from interp.hooks import output_hook
from interp.run import coder_model
from interp.sae import load_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coder", action="append", required=True, help="A saved coder folder; repeat for several.")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()

    coders = [load_sae(path) for path in args.coder]
    model = coder_model(coders[0])
    coders = forward_order(model, coders)
    task = build_task(args.task, model.tokenizer, n=args.prompts)
    groups = Groups.of(task.role_of_positions(), "role")
    objective = lambda logits: task.metric_n(logits).sum()
    hooks = [output_hook(c) for c in coders]

    warm = task.subset(slice(0, 2))
    metric_gradients(model, warm.clean_nt, hooks, lambda logits: warm.metric_n(logits).sum())
    _, floor = timed(lambda: metric_gradients(model, task.clean_nt, hooks, objective))
    (clean, corrupt), states_s = timed(lambda: (coder_states(model, coders, task.clean_nt), coder_states(model, coders, task.corrupt_nt)))
    _, atp = timed(lambda: node_effects(model, task.clean_nt, objective, clean, corrupt, groups, "atp"))
    _, ig = timed(lambda: node_effects(model, task.clean_nt, objective, clean[:1], corrupt[:1], groups, "ig", steps=1))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"task {task.name}: {len(task)} prompts of {task.clean_nt.shape[1]} tokens; {len(coders)} coders "
          f"({', '.join(c.cfg.hook for c in coders)}); torch threads {torch.get_num_threads()}")
    print(f"bare forward+backward of the prompts (floor):  {floor:7.2f} s")
    print(f"node values of clean and corrupt prompts:      {states_s:7.2f} s  ({states_s / floor:.2f}x the floor)")
    print(f"attribution patching, all coders:              {atp:7.2f} s  ({atp / floor:.2f}x the floor)")
    print(f"  total for an AtP pass (values + effects):    {states_s + atp:7.2f} s  (target < 120 s at 8 layers)")
    print(f"one integrated-gradient step, one coder:       {ig:7.2f} s  ({ig / floor:.2f}x the floor)")
    print(f"peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
