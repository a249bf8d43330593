"""A feature circuit for a task, found and checked in one call: the model's baseline on the task
(refusing a task it does not do), node effects on half the prompts (attribution patching or
integrated gradients, against a corrupt, mean or zero baseline), edges between consecutive
coders into their strongest nodes, and on the other half faithfulness and completeness over
circuit size against random circuits and against the circuit without its error nodes, and the
share of the effect carried by error nodes. The result is plain data, written as circuit.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from interp.circuits.ablation import faithfulness_curve
from interp.circuits.attribution import (
    METHODS,
    Groups,
    edges_into,
    metric_gradients,
    node_effects,
)
from interp.circuits.states import BASELINES, CoderState, Node, baseline, coder_states
from interp.circuits.tasks import Task, TaskConfig, build_task, check_model_does_task
from interp.circuits.tasks import baseline as task_baseline
from interp.errors import BadInput, check_positive
from interp.hooks import output_hook
from interp.models import hook_order
from interp.sae.base import SparseCoder


@dataclass
class CircuitConfig(TaskConfig):
    """Half the prompts find the circuit, half check it; the seed also draws the random circuits."""

    method: str = "ig"
    """Node effects by integrated gradients ("ig") or attribution patching ("atp", one forward and backward)."""
    steps: int = 10
    """Integrated-gradient steps per coder."""
    baseline: str = "corrupt"
    """What a patched or ablated node is set to: its value on the corrupt prompt ("corrupt"), its mean over the other half of the prompts ("mean"), or 0 ("zero")."""
    group_by: str = "role"
    """Nodes per role of the task ("role": IO, S2, END, ..., other positions together), per position ("position") or over all positions ("all")."""
    edge_targets: int = 5
    """Edges are computed into this many of each coder's strongest nodes, from every node of the coder upstream."""
    edge_sources: int = 20
    """The strongest edges kept into each target."""
    sizes: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50, 100])
    """Circuit sizes (nodes) at which faithfulness and completeness are measured."""
    random_circuits: int = 5
    """Random circuits per size, for the random baseline."""
    top_nodes: int = 200
    """Nodes kept in the result (all are ranked)."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise BadInput(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.baseline not in BASELINES:
            raise BadInput(f"unknown baseline {self.baseline!r}; choose one of {', '.join(BASELINES)}")
        super().__post_init__()
        for name in ("steps", "top_nodes"):
            check_positive(name, getattr(self, name))


def node_id(coders: list[SparseCoder], node: Node, groups: Groups) -> str:
    """A node's name: <hook written>/<kind>[/<latent>]@<group>."""
    hook = output_hook(coders[node.coder])
    latent = f"/{node.latent}" if node.kind == "feature" else ""
    return f"{hook}/{node.kind}{latent}@{groups.names[node.group]}"


def forward_order(model, coders: list[SparseCoder]) -> list[SparseCoder]:
    """The coders in the order the model computes what they write."""
    written = [output_hook(c) for c in coders]
    if len(set(written)) < len(coders):
        raise BadInput(f"two coders write the same hook ({', '.join(written)}): give one coder per hook")
    order = hook_order(model, written)
    return sorted(coders, key=lambda c: order.index(output_hook(c)))


class _Half:
    """One half of the prompts: its clean and baseline node values and its groups."""

    def __init__(self, model, coders, task: Task, groups: Groups, other: Task, kind: str):
        self.task, self.groups = task, groups
        self.clean = coder_states(model, coders, task.clean_nt)
        corrupt = coder_states(model, coders, task.corrupt_nt) if kind == "corrupt" else None
        calibration = coder_states(model, coders, other.clean_nt) if kind == "mean" else None
        self.base = baseline(kind, self.clean, corrupt, calibration)

    def objective(self):
        return lambda logits: self.task.metric_n(logits).sum()


def find_circuit(model, coders: list[SparseCoder], cfg: CircuitConfig, task: Task | None = None, progress: bool = True) -> dict:
    """Find and check the feature circuit of `task` (built from cfg.task when not given) through
    `coders`, spliced in together. Returns circuit.json's content."""
    if not coders:
        raise BadInput("a feature circuit needs at least one coder")
    coders = forward_order(model, coders)
    task = task or build_task(cfg.task, model.tokenizer, n=cfg.prompts, seed=cfg.seed)
    result_baseline = task_baseline(model, task)
    check_model_does_task(result_baseline, task, cfg.min_accuracy)
    train_task, test_task = task.split(0.5)
    all_groups = Groups.of(task.role_of_positions(), cfg.group_by)
    cut = len(train_task)
    train_groups = Groups(all_groups.ids_nt[:cut], all_groups.names)
    test_groups = Groups(all_groups.ids_nt[cut:], all_groups.names)
    n_passes = (1 if cfg.method == "atp" else cfg.steps * len(coders)) + (len(coders) - 1) \
        + 2 + len(cfg.sizes) * (3 + cfg.random_circuits)
    bar = tqdm(total=n_passes, desc="circuit", unit="pass", disable=not progress)
    tick = lambda: bar.update(1)

    train = _Half(model, coders, train_task, train_groups, test_task, cfg.baseline)
    with_edges = len(coders) > 1 and cfg.edge_targets > 0
    # One clean backward serves attribution patching and the edges.
    clean_grads = metric_gradients(model, train_task.clean_nt, [s.hook for s in train.clean], train.objective()) \
        if cfg.method == "atp" or with_edges else None
    effects = node_effects(model, train_task.clean_nt, train.objective(), train.clean, train.base, train_groups,
                           cfg.method, cfg.steps, progress=tick, clean_grads=clean_grads)
    ranked, scores = rank_nodes(effects, train.clean)
    edges = _edges(model, train, effects, cfg.edge_targets, cfg.edge_sources, clean_grads, tick) if with_edges else []

    test = _Half(model, coders, test_task, test_groups, train_task, cfg.baseline)
    candidates = ranked  # every node with a nonzero estimated effect
    curve = faithfulness_curve(model, test_task, test_task.clean_nt, test.clean, test.base, test_groups, ranked,
                               cfg.sizes, candidates, cfg.random_circuits, cfg.seed, progress=tick)
    bar.close()
    total = sum(abs(v) for v in scores.values()) or 1.0
    error_share = sum(abs(v) for node, v in scores.items() if node.kind != "feature") / total
    nodes = [{"id": node_id(coders, n, all_groups), "coder": output_hook(coders[n.coder]), "kind": n.kind,
              "latent": n.latent, "group": all_groups.names[n.group], "effect": scores[n]} for n in ranked[: cfg.top_nodes]]
    return {
        "config": asdict(cfg) | {"task": task.name},
        "coders": [{"hook": c.cfg.hook, "writes": output_hook(c), "arch": c.arch, "n_latents": c.cfg.n_latents} for c in coders],
        "baseline": asdict(result_baseline),
        "groups": all_groups.names,
        "nodes": nodes,
        "edges": [{"source": node_id(coders, s, all_groups), "target": node_id(coders, t, all_groups), "weight": w}
                  for s, t, w in edges],
        "faithfulness": asdict(curve),
        "error_share": error_share,
        "summary": _summary(task, result_baseline, curve, error_share),
    }


def rank_nodes(effects, states: list[CoderState]) -> tuple[list[Node], dict[Node, float]]:
    """Every node with a nonzero effect, strongest first."""
    scores: dict[Node, float] = {}
    for c, eff in enumerate(effects):
        groups_idx, latents = eff.feature_gk.nonzero(as_tuple=True)
        for g, k in zip(groups_idx.tolist(), latents.tolist()):
            scores[Node(c, "feature", k, g)] = float(eff.feature_gk[g, k])
        for g, value in enumerate(eff.error_g.tolist()):
            if value:
                scores[Node(c, "error", -1, g)] = value
        if eff.skip_g is not None:
            for g, value in enumerate(eff.skip_g.tolist()):
                if value:
                    scores[Node(c, "skip", -1, g)] = value
    ranked = sorted(scores, key=lambda node: -abs(scores[node]))
    return ranked, scores


def _edges(model, half: _Half, effects, n_targets: int, n_sources: int, grads: dict[str, torch.Tensor],
           tick) -> list[tuple[Node, Node, float]]:
    """Edges from each coder into the strongest nodes of the next one downstream, the strongest
    edges into each target kept; `grads`: the metric's gradients at the coders' written hooks."""
    hooks = [s.hook for s in half.clean]
    out = []
    for up in range(len(half.clean) - 1):
        down = up + 1
        ranked, _ = rank_nodes([effects[down]], [half.clean[down]])
        targets = [Node(down, n.kind, n.latent, n.group) for n in ranked[:n_targets]]
        into = edges_into(model, half.task.clean_nt, half.clean[up], half.base[up], half.clean[down],
                          grads[hooks[down]].to(half.clean[down].y_ntd.device), targets, half.groups)
        tick()
        for target, eff in zip(targets, into):
            sources, sources_scores = rank_nodes([eff], [half.clean[up]])
            for source in sources[:n_sources]:
                out.append((Node(up, source.kind, source.latent, source.group), target, sources_scores[source]))
    return out


def _summary(task: Task, base, curve, error_share: float) -> str:
    lines = [(f"task {task.name}: accuracy {base.accuracy:.2f}, mean {task.metric} {base.mean_clean:.3f} "
              f"(corrupt {base.mean_corrupt:.3f}) on {base.n} prompts")]
    for size, f, c, r in zip(curve.sizes, curve.faithfulness, curve.completeness, curve.random):
        lines.append(f"  {size:>5} nodes: faithfulness {f:.3f} (random {r:.3f}), completeness {c:.3f}")
    lines.append(f"  error nodes carry {error_share:.1%} of the summed absolute effect")
    best = max(curve.faithfulness, default=float("nan"))
    if not best >= 0.5:
        lines.append(f"  WARNING: faithfulness is below 0.5 at every size measured (best {best:.3f}): this circuit does not explain the behaviour")
    return "\n".join(lines)
