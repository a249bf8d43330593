"""An attribution graph for one prompt in one call, as plain data (graph.json): the graph built,
checked (the sum rule on every node, interventions on the strongest nodes against forward
passes), pruned by influence, its strongest edges split by attention head; and the export in
circuit-tracer's graph JSON, which its frontend loads.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from interp.circuits.graph import (
    BIAS,
    EMBEDDING,
    ERROR,
    FEATURE,
    TARGET,
    Graph,
    Target,
    build_graph,
    intervene,
    memory_bytes,
)
from interp.circuits.heads import head_split
from interp.circuits.pruning import Pruned, prune
from interp.errors import BadInput, check_positive
from interp.sae.base import SparseCoder

SUM_RULE_LIMIT = 1e-4
"""The largest relative error of the sum rule a graph may show before its summary says it fails."""


@dataclass
class GraphConfig:
    prompt: str = "When Mary and John went to the store, John gave a drink to"
    """The prompt (BOS is prepended)."""
    answer: str | None = None
    """Text of the token whose logit the graph explains (one token); by default the model's top prediction."""
    wrong: str | None = None
    """With --answer: explain the logit difference answer - wrong instead."""
    node_threshold: float = 0.8
    """Keep the nodes holding this share of the influence on the target."""
    edge_threshold: float = 0.98
    """Among them, keep the edges holding this share of the edge influence."""
    batch: int = 64
    """Target nodes per batched backward pass (memory: batch x layers x tokens x d_model x 8 bytes)."""
    head_edges: int = 50
    """The strongest kept edges split by attention head."""
    interventions: int = 3
    """Nodes checked by intervention (the most influential feature, error and token)."""

    def __post_init__(self):
        check_positive("batch", self.batch)
        check_positive("head_edges", self.head_edges, zero_ok=True)
        check_positive("interventions", self.interventions, zero_ok=True)
        if self.wrong is not None and self.answer is None:
            raise BadInput("--wrong needs --answer: a logit difference is answer - wrong")


def single_token(tokenizer, text: str, what: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise BadInput(f"the {what} {text!r} is {len(ids)} tokens for this tokenizer ({ids}); give text that is one token, "
                       f"often with its leading space, e.g. ' Mary'")
    return ids[0]


def node_id(graph: Graph, node: int) -> str:
    """A node's id in graph.json: circuit-tracer's for features (`{layer}_{latent}_{pos}`), tokens
    (`E_{token}_{pos}`) and the target (as a logit, `{n_layers + 1}_{token}_{pos}`); `err_{layer}_{pos}`
    and `bias_{layer}_{pos}` for error and bias nodes (circuit-tracer's error id, `0_{layer}_{pos}`,
    can be a layer-0 feature's too)."""
    kind, layer, pos, feature = graph.kind[node], int(graph.layer[node]), int(graph.position[node]), int(graph.feature[node])
    return {FEATURE: f"{layer}_{feature}_{pos}", ERROR: f"err_{layer}_{pos}", EMBEDDING: f"E_{feature}_{pos}",
            BIAS: f"bias_{layer}_{pos}", TARGET: f"{graph.n_layers + 1}_{max(feature, 0)}_{pos}"}[kind]


def _intervention_nodes(graph: Graph, pruned: Pruned, n: int) -> list[int]:
    chosen = []
    for kind in (FEATURE, ERROR, EMBEDDING):
        of_kind = [int(i) for i in pruned.nodes if graph.kind[int(i)] == kind]
        chosen += of_kind[:1]
    return chosen[:n]


def intervention_error(model, graph: Graph, coders: list[SparseCoder], nodes: list[int]) -> float:
    """The largest |change of a row node's input by forward passes - the edges' prediction|,
    relative to the largest predicted change, over `nodes` doubled one at a time."""
    worst = 0.0
    for node in nodes:
        predicted = graph.adjacency[:, node]
        moved = intervene(model, graph, coders, node, 2.0)
        worst = max(worst, float((moved - predicted).abs().max() / predicted.abs().max().clamp_min(1e-12)))
    return worst


def trace(model, coders: list[SparseCoder], cfg: GraphConfig, coder_names: list[str] | None = None, progress: bool = True,
          say=print) -> dict:
    """Build, check and prune the attribution graph of `cfg.prompt` through `coders`."""
    start = time.perf_counter()
    tokenizer = model.tokenizer
    tokens_1t = model.to_tokens(cfg.prompt)
    if cfg.answer is None:
        with torch.no_grad():
            answer = int(model(tokens_1t)[0, -1].argmax())
    else:
        answer = single_token(tokenizer, cfg.answer, "answer")
    wrong = None if cfg.wrong is None else single_token(tokenizer, cfg.wrong, "wrong answer")
    target = Target(answer=answer, wrong=wrong)
    graph = build_graph(model, coders, tokens_1t, target, batch=cfg.batch, progress=progress, say=say)
    built = time.perf_counter() - start
    pruned = prune(graph, cfg.node_threshold, cfg.edge_threshold)
    sum_rule = graph.sum_rule_error()
    checked = _intervention_nodes(graph, pruned, cfg.interventions)
    parity = intervention_error(model, graph, coders, checked) if checked else None
    splits = head_split(model, graph, coders, [tuple(e) for e in pruned.edges[: cfg.head_edges].tolist()]) if cfg.head_edges else []
    with torch.no_grad():
        probability = float(torch.softmax(model(tokens_1t)[0, -1].float(), -1)[answer])
    names = coder_names or [c.cfg.hook for c in coders]
    layer_name = {int(c.cfg.hook.split(".")[1]): name for c, name in zip(coders, names)}
    influence = pruned.influence
    sources = [i for i, k in enumerate(graph.kind) if k != TARGET]
    error_share = float(influence[[i for i in sources if graph.kind[i] == ERROR]].sum() / influence[sources].sum())
    rows_of = {int(n): r for r, n in enumerate(graph.rows.tolist())}
    nodes = []
    for i in pruned.nodes.tolist():
        kind = graph.kind[i]
        node = {"id": node_id(graph, i), "kind": kind, "layer": int(graph.layer[i]), "position": int(graph.position[i]),
                "influence": float(influence[i])}
        if kind == FEATURE:
            node |= {"coder": layer_name[node["layer"]], "latent": int(graph.feature[i]), "activation": float(graph.activation[i])}
        if kind == EMBEDDING:
            node["token"] = tokenizer.decode([int(graph.feature[i])])
        if i in rows_of:
            node["input"] = float(graph.inputs[rows_of[i]])
        nodes.append(node)
    split_of = {(s.target, s.source): s for s in splits}
    edges = []
    for (t, s), w in zip(pruned.edges.tolist(), pruned.weights.tolist()):
        edge = {"source": node_id(graph, s), "target": node_id(graph, t), "weight": w}
        if (split := split_of.get((t, s))) is not None:
            top = sorted(split.heads.items(), key=lambda item: -abs(item[1]))
            edge["split"] = {"residual": split.residual, "other": split.other,
                             "heads": [{"layer": l, "head": h, "part": v} for (l, h), v in top if abs(v) >= 1e-3 * abs(split.edge)]}
        edges.append(edge)
    n_pos = len(graph.tokens)
    checks = {
        "sum_rule_max_error": float(sum_rule.max()), "sum_rule_median_error": float(sum_rule.median()), "sum_rule_nodes": len(sum_rule),
        "intervention_max_error": parity, "intervention_nodes": [node_id(graph, i) for i in checked],
        "error_influence_share": error_share,
        "head_split_max_other": max((abs(s.other) / max(abs(s.edge), 1e-12) for s in splits), default=None),
    }
    sizes = {"tokens": n_pos, "features": graph.kind.count(FEATURE), "nodes": len(graph.kind), "rows": len(graph.rows),
             "kept_nodes": len(nodes), "kept_edges": len(edges),
             "memory_estimate_bytes": memory_bytes(len(graph.rows), len(graph.kind), n_pos, model.cfg.d_model, model.cfg.n_layers, cfg.batch)}
    result = {
        "config": asdict(cfg), "model": getattr(model, "interp_name", ""), "coders": names, "n_layers": graph.n_layers,
        "tokens": [tokenizer.decode([t]) for t in graph.tokens], "token_ids": graph.tokens,
        "target": {"label": target.label(tokenizer), "value": float(graph.inputs[-1]), "token": answer, "probability": probability,
                   "position": n_pos - 1, "id": node_id(graph, graph.target)},
        "nodes": nodes, "edges": edges, "checks": checks, "sizes": sizes,
        "seconds": {"build": built, "total": time.perf_counter() - start},
    }
    result["summary"] = _summary(result)
    return result


def _summary(result: dict) -> str:
    checks, sizes, target = result["checks"], result["sizes"], result["target"]
    lines = [
        f"target {target['label']} = {target['value']:.4f} at position {target['position']} (p = {target['probability']:.3f})",
        f"graph: {sizes['features']} active features, {sizes['nodes']} nodes; kept {sizes['kept_nodes']} nodes and {sizes['kept_edges']} edges",
        f"sum rule: relative error max {checks['sum_rule_max_error']:.2e}, median {checks['sum_rule_median_error']:.2e} over {checks['sum_rule_nodes']} nodes",
    ]
    if checks["sum_rule_max_error"] > SUM_RULE_LIMIT:
        lines.append(f"WARNING: the sum rule misses {SUM_RULE_LIMIT:g} on some node: the edges do not add up to the inputs")
    if checks["intervention_max_error"] is not None:
        lines.append(f"interventions on {', '.join(checks['intervention_nodes'])}: edges match forward passes within "
                     f"{checks['intervention_max_error']:.2e} (relative)")
    lines.append(f"error nodes hold {checks['error_influence_share']:.0%} of the influence on the target")
    return "\n".join(lines)


def cantor_pair(layer: int, latent: int) -> int:
    """circuit-tracer's (0.5) one number for a feature across layers: the Cantor pairing."""
    return (layer + latent) * (layer + latent + 1) // 2 + latent


def circuit_tracer_graph(result: dict, slug: str) -> dict:
    """The graph in circuit-tracer's (0.5) graph JSON (its frontend's `Model`: metadata, qParams,
    nodes, links). Bias nodes have no kind there: they and their edges are left out."""
    kinds = {FEATURE: "cross layer transcoder", ERROR: "mlp reconstruction error", EMBEDDING: "embedding", TARGET: "logit"}
    target = result["target"]
    nodes, ids = [], {}
    for node in result["nodes"]:
        if node["kind"] == BIAS:
            continue
        layer, pos = node["layer"], node["position"]
        # as in circuit-tracer's own files, an error id can equal a layer-0 feature's (jsNodeId tells them apart)
        ids[node["id"]] = f"0_{layer}_{pos}" if node["kind"] == ERROR else node["id"]
        entry = {"node_id": ids[node["id"]], "layer": str(layer), "ctx_idx": pos, "feature_type": kinds[node["kind"]],
                 "influence": node["influence"], "run_idx": 0, "reverse_ctx_idx": 0, "clerp": "", "token_prob": 0.0,
                 "is_target_logit": False}
        if node["kind"] == FEATURE:
            entry |= {"feature": cantor_pair(layer, node["latent"]), "jsNodeId": f"{layer}_{node['latent']}-0", "activation": node["activation"]}
        elif node["kind"] == ERROR:
            entry |= {"feature": -1, "jsNodeId": f"{layer}_{pos}-0"}
        elif node["kind"] == EMBEDDING:
            token = int(node["id"].split("_")[1])
            entry |= {"feature": pos, "layer": "E", "jsNodeId": f"E_{token}-{pos}"}
        else:
            entry |= {"feature": target["token"], "layer": str(result["n_layers"] + 1), "jsNodeId": f"L_{target['token']}-{pos}",
                      "token_prob": target["probability"], "is_target_logit": True,
                      "clerp": f"Output {target['label']} (p={target['probability']:.3f})"}
        nodes.append(entry)
    links = [{"source": ids[e["source"]], "target": ids[e["target"]], "weight": e["weight"]} for e in result["edges"]
             if e["source"] in ids and e["target"] in ids]
    metadata = {"slug": slug, "scan": "interp-" + "-".join(result["coders"]), "transcoder_list": result["coders"],
                "prompt_tokens": [t.replace("\n", "⏎").replace("\t", "→") for t in result["tokens"]], "prompt": result["config"]["prompt"],
                "node_threshold": result["config"]["node_threshold"], "schema_version": 1}
    return {"metadata": metadata, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}
