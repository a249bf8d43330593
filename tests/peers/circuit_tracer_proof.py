"""Runs inside circuit-tracer's own environment (tests/test_graph.py starts it): validates a graph
interp exported in circuit-tracer's graph JSON with its frontend's own pydantic `Model`, and
rebuilds every node from interp's graph.json with circuit-tracer's own constructors
(`Node.feature_node`, `error_node`, `token_node`, `logit_node`), which must give the exported
node's id, feature number, layer, position, kind and frontend id; bias nodes, which it has no
kind for, must be absent. Usage: python
circuit_tracer_proof.py GRAPH_JSON EXPORT_JSON; exits non-zero with the first mismatch."""

import json
import sys
from pathlib import Path

from circuit_tracer.frontend.graph_models import Link, Model, Node

ours = json.loads(Path(sys.argv[1]).read_text())
exported = json.loads(Path(sys.argv[2]).read_text())
model = Model.model_validate(exported)
# circuit-tracer's own ids can repeat (an error node's 0_{layer}_{pos} is also a layer-0 feature's);
# its frontend ids (jsNodeId) and kinds tell nodes apart
by_key = {(node.node_id, node.feature_type): node for node in model.nodes}
assert len(by_key) == len(model.nodes), "nodes repeat"
ids = {node.node_id for node in model.nodes}
FIELDS = ("node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId")
checked = 0
for node in ours["nodes"]:
    if node["kind"] == "bias":
        continue
    if node["kind"] == "feature":
        expected = Node.feature_node(node["layer"], node["position"], node["latent"], influence=node["influence"], activation=node["activation"])
    elif node["kind"] == "error":
        expected = Node.error_node(node["layer"], node["position"], influence=node["influence"])
    elif node["kind"] == "embedding":
        expected = Node.token_node(node["position"], int(node["id"].split("_")[1]), influence=node["influence"])
    else:
        target = ours["target"]
        expected = Node.logit_node(node["position"], target["token"], "", ours["n_layers"], target_logit=True, token_prob=target["probability"])
    got = by_key[(expected.node_id, expected.feature_type)]
    for name in FIELDS:
        assert getattr(got, name) == getattr(expected, name), f"{node['id']}: {name} {getattr(got, name)!r} != {getattr(expected, name)!r}"
    checked += 1
for link in model.links:
    Link.model_validate(link)
    assert link["source"] in ids and link["target"] in ids, f"link {link} names a node not in the graph"
assert not any(node.node_id.startswith("bias") for node in model.nodes)
print(json.dumps({"nodes": checked, "links": len(model.links)}))
