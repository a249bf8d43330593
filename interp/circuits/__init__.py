"""Circuits: which coder features (and error terms) carry a model's behaviour on a task, how they
connect, and whether they are the mechanism (faithfulness, completeness), in data flow order:

- `tasks.py`: clean/corrupt prompt pairs, answers, a metric, roles; the model's baseline on them;
- `states.py`: the nodes (features, errors, skip terms of spliced coders) and their values;
- `attribution.py`: node effects (attribution patching, integrated gradients) and edges;
- `ablation.py`: the metric with nodes outside a circuit ablated; faithfulness and completeness;
- `circuit.py`: `find_circuit(model, coders, CircuitConfig(...))`, everything above in one call;
- `page.py`: circuits and attribution graphs as interactive HTML pages;
- `weights.py`: transcoder circuits from the weights (connections, de-embedding, contributions);
- `graph.py`: the attribution graph of one prompt through MLP transcoders (frozen attention and
  norms; exact edges, checked by the sum rule and by interventions);
- `pruning.py`: influence on the target and pruning by it;
- `heads.py`: a graph's edges split by the attention head they pass through first;
- `head_effects.py`: each attention head's and head-to-head edge's effect on a task, by exact
  activation and path patching and by attribution patching, for query heads (hook_z) and for the
  key/value heads grouped-query attention shares (hook_k, hook_v);
- `head_codes.py`: `find_heads(model, HeadsConfig(...))`, the heads a task uses from discrete
  codes (O'Neill & Bui 2024), against exact activation and path patching, with attribution patching;
- `supervised.py`: supervised feature dictionaries from a task's attributes (Makelov et al. 2024);
- `task_evaluation.py`: `evaluate_on_task(model, TaskEvalConfig(...))`, dictionaries at a node of
  a task's circuit scored for sufficiency, necessity, control and each attribute's best detector;
- `tracing.py`: `trace(model, coders, GraphConfig(...))`, a graph built, checked, pruned and split
  in one call, and its export in circuit-tracer's graph JSON.
"""

from interp.circuits.circuit import CircuitConfig, find_circuit
from interp.circuits.tasks import Task, baseline, build_task

__all__ = ["CircuitConfig", "Task", "baseline", "build_task", "find_circuit"]
