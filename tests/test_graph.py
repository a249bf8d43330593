"""Attribution graphs, checked against references written here: the model's own values (every
node's input, a feature's pre-activation or the target, must be the sum of its edges, and be what
the unmodified model computes), forward passes that move one node (its children's inputs must
move exactly as its edges say), brute-force activation patching of one attention head at a time
under grouped-query attention (the head split), a dense matrix inverse (influence), and
circuit-tracer's own frontend code (the export). A 3-layer tiny model with 4 query heads sharing
2 key-value heads and random norm gains; transcoders at layers 0 and 2, none at layer 1 (its MLP
is an error node per position)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from interp.cli.main import app
from test_dashboard_browser import SKIP_WITHOUT_BROWSER, dump_dom
from test_hooks import fitted
from test_interop_peers import interpreter
from typer.testing import CliRunner

from interp.circuits.graph import (
    BIAS,
    EMBEDDING,
    ERROR,
    FEATURE,
    FINAL,
    Target,
    build_graph,
    frozen_pass,
    intervene,
    output_vector,
    row_inputs,
)
from interp.circuits.heads import head_split
from interp.circuits.page import write_graph_page
from interp.circuits.pruning import influence, prune
from interp.circuits.tracing import GraphConfig, circuit_tracer_graph, trace
from interp.errors import BadInput
from interp.hooks import capture
from interp.models import _tiny_config, load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello world, this is a test"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny3")
    _tiny_config(n_layers=3).save_pretrained(path)
    return path


def gqa_model(folder, dtype=torch.float32):
    model = load_model(str(folder)).to(dtype)
    assert (model.cfg.n_heads, model.cfg.n_key_value_heads) == (4, 2)
    torch.manual_seed(1)
    with torch.no_grad():  # a gain of all ones would hide a gain handled wrongly
        for block in model.blocks:
            for norm in (block.ln1, block.ln2):
                norm.weight.copy_(torch.rand_like(norm.weight) + 0.5)
        model.ln_final.weight.copy_(torch.rand_like(model.ln_final.weight) + 0.5)
    return model


@pytest.fixture(scope="module")
def model(folder):
    return gqa_model(folder)


@pytest.fixture(scope="module")
def model64(folder):
    return gqa_model(folder, torch.float64)


def transcoders(model, skip: bool):
    """A TopK transcoder at layer 0 reading the normalised MLP input (with a skip term if `skip`)
    and a BatchTopK one at layer 2 reading the norm's output (gain included)."""
    hooks = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.2.ln2.hook_out", "blocks.2.hook_mlp_out"]
    data = {h: a.float() for h, a in capture(model, torch.randint(3, 250, (16, 24)), hooks).items()}
    coders = [fitted("topk", hook=hooks[0], target=hooks[1], skip=skip, seed=0, data=data),
              fitted("batchtopk", hook=hooks[2], target=hooks[3], seed=1, data=data)]
    return [c.to(model.cfg.dtype) for c in coders]


def tokens(model):
    return model.to_tokens(PROMPT)


def targets(model):
    top2 = model(tokens(model))[0, -1].topk(2).indices.tolist()
    return {"logit": Target(answer=top2[0]), "logit difference": Target(answer=top2[0], wrong=top2[1]),
            "direction": Target(direction=torch.randn(model.cfg.d_model))}


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("kind", ["logit", "logit difference", "direction"])
def test_every_node_input_is_the_sum_of_its_edges_and_the_models_value(model, skip, kind):
    coders = transcoders(model, skip)
    target = targets(model)[kind]
    graph = build_graph(model, coders, tokens(model), target, batch=16, progress=False)
    assert graph.kind.count(FEATURE) > 50 and graph.kind.count(ERROR) == 3 * len(graph.tokens)
    assert graph.sum_rule_error().max() <= 1e-4
    # the inputs are the unmodified model's: the coders' pre-activations on a plain forward, the target's value
    plain = capture(model, tokens(model), [c.cfg.hook for c in coders] + [FINAL])
    for coder in coders:
        layer = int(coder.cfg.hook.split(".")[1])
        rows = [r for r, n in enumerate(graph.rows[:-1].tolist()) if graph.layer[n] == layer]
        pre = coder.preacts(coder.encoder_input(coder.normalized_input(plain[coder.cfg.hook])))
        nodes = graph.rows[rows]
        torch.testing.assert_close(graph.inputs[rows], pre[graph.position[nodes], graph.feature[nodes]], rtol=1e-5, atol=1e-5)
    logits = model(tokens(model))[0, -1]
    if kind == "direction":
        expected = plain[FINAL][-1] @ target.direction
    else:
        expected = logits[target.answer] - (logits[target.wrong] if target.wrong is not None else 0)
    torch.testing.assert_close(graph.inputs[-1], expected.detach(), rtol=1e-5, atol=1e-5)


def one_of_each(graph):
    """The first node of each kind whose edges are not all zero (and its largest edge)."""
    chosen = {}
    for node, kind in enumerate(graph.kind):
        if kind in (FEATURE, ERROR, EMBEDDING, BIAS) and kind not in chosen and graph.adjacency[:, node].abs().max() > 1e-3:
            chosen[kind] = node
    assert set(chosen) == {FEATURE, ERROR, EMBEDDING, BIAS}
    return chosen


@pytest.mark.parametrize("skip", [False, True])
def test_interventions_move_every_input_exactly_as_the_edges_say(model64, skip):
    coders = transcoders(model64, skip)
    graph = build_graph(model64, coders, tokens(model64), targets(model64)["logit"], batch=16, progress=False)
    for kind, node in one_of_each(graph).items():
        moved = intervene(model64, graph, coders, node, 3.0)
        predicted = 2.0 * graph.adjacency[:, node]
        assert (moved - predicted).abs().max() <= 1e-9 * predicted.abs().max(), kind


def brute_force_head_part(model, graph, coders, target, source, layer, head):
    """The source's effect on the target's input through one query head's values as its first
    attention hop, by patching: run A removes the source with every earlier layer's attention
    output held (so only the residual stream carries it to `layer`) and records the head's output;
    run B puts that output in the clean replacement model for this head alone."""
    hooks = [c.cfg.hook for c in coders] + [FINAL] + [f"blocks.{l}.hook_attn_out" for l in range(layer)] + [f"blocks.{layer}.attn.hook_z"]
    tokens_1t = torch.tensor([graph.tokens])
    clean = frozen_pass(model, tokens_1t, graph.replacement, hooks)
    vector, position = output_vector(graph, source), int(graph.position[source])
    constant, patch = dict(graph.replacement.constant), {}
    if graph.kind[source] == EMBEDDING:
        def remove(act):
            act = act.clone()
            act[0, position] -= vector
            return act
        patch["hook_embed"] = remove
    else:
        moved = constant[int(graph.layer[source])].clone()
        moved[0, position] -= vector
        constant[int(graph.layer[source])] = moved
    held = {f"blocks.{l}.hook_attn_out": clean[f"blocks.{l}.hook_attn_out"].detach() for l in range(layer)}
    for hook, value in held.items():
        patch[hook] = lambda act, value=value: value
    z_removed = frozen_pass(model, tokens_1t, graph.replacement, hooks, constant=constant, patch=patch)[f"blocks.{layer}.attn.hook_z"].detach()

    def one_head(act):
        act = act.clone()
        act[:, :, head] = z_removed[:, :, head]
        return act

    patched = frozen_pass(model, tokens_1t, graph.replacement, hooks, patch={f"blocks.{layer}.attn.hook_z": one_head})
    row = graph.rows.tolist().index(target)
    return float(row_inputs(model, graph, coders, clean)[row] - row_inputs(model, graph, coders, patched)[row])


def test_head_split_matches_brute_force_patching_under_gqa(model64):
    coders = transcoders(model64, skip=False)
    graph = build_graph(model64, coders, tokens(model64), targets(model64)["logit"], batch=16, progress=False)
    pruned = prune(graph, 0.9, 0.99)
    # edges across positions into the target and into a layer-2 feature, from every kind of source
    pairs = [tuple(e) for e in pruned.edges.tolist() if graph.position[e[1]] != graph.position[e[0]]][:6]
    assert {graph.kind[s] for _, s in pairs} >= {EMBEDDING}
    splits = head_split(model64, graph, coders, pairs)
    checked = 0
    for split in splits:
        assert abs(split.other) <= 1e-9 * max(abs(split.edge), 1e-6)  # without skip terms, heads and residual are every path
        assert split.residual == 0  # the source is at another position
        for (layer, head), part in sorted(split.heads.items(), key=lambda item: -abs(item[1]))[:3]:
            reference = brute_force_head_part(model64, graph, coders, split.target, split.source, layer, head)
            assert part == pytest.approx(reference, rel=1e-7, abs=1e-10)
            checked += 1
    assert checked >= 6


def test_influence_is_the_dense_path_sum_and_pruning_keeps_its_share(model):
    coders = transcoders(model, skip=True)
    graph = build_graph(model, coders, tokens(model), targets(model)["logit"], batch=16, progress=False)
    n = len(graph.kind)
    shares = graph.adjacency.abs().double()
    shares /= shares.sum(1, keepdim=True).clamp_min(1e-30)
    square = torch.zeros(n, n, dtype=torch.float64)
    square[graph.rows] = shares
    # influence = e_target (I - M)^-1: every path, by a dense solve
    e = torch.zeros(n, dtype=torch.float64)
    e[graph.target] = 1
    reference = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - square).T, e)
    torch.testing.assert_close(influence(graph).double(), reference, rtol=1e-5, atol=1e-7)
    pruned = prune(graph, 0.7, 0.95)
    kept = set(pruned.nodes.tolist())
    assert graph.target in kept and all(graph.kind[i] != EMBEDDING or i in kept for i in range(n))
    candidates = [i for i in range(n) if graph.kind[i] not in (EMBEDDING, "target")]
    total = float(reference[candidates].sum())
    # at least the share asked for, before nodes left without edges are dropped; dropped ones hold little
    assert sum(float(reference[i]) for i in candidates if i in kept) >= 0.6 * total
    assert len(pruned.nodes) < n / 2
    for (t, s), w in zip(pruned.edges.tolist(), pruned.weights.tolist()):
        assert t in kept and s in kept
        assert w == graph.adjacency[graph.rows.tolist().index(t), s]


def test_trace_checks_and_the_circuit_tracer_export(model, tmp_path):
    coders = transcoders(model, skip=True)
    said = []
    result = trace(model, coders, GraphConfig(prompt=PROMPT, head_edges=10), progress=False, say=said.append)
    assert any("GiB" in line for line in said)  # the memory it will need, before it runs
    checks = result["checks"]
    assert checks["sum_rule_max_error"] <= 1e-4 and checks["intervention_max_error"] <= 1e-4
    assert len(checks["intervention_nodes"]) == 3 and 0 <= checks["error_influence_share"] <= 1
    ids = [n["id"] for n in result["nodes"]]
    assert len(ids) == len(set(ids)) and result["target"]["id"] in ids
    assert sum("split" in e for e in result["edges"]) == min(10, len(result["edges"]))
    assert all(e["source"] in ids and e["target"] in ids for e in result["edges"])
    exported = circuit_tracer_graph(result, "tiny")
    (tmp_path / "graph.json").write_text(json.dumps(result))
    (tmp_path / "tiny.json").write_text(json.dumps(exported))
    done = subprocess.run([str(interpreter("circuit_tracer")), str(ROOT / "tests" / "peers" / "circuit_tracer_proof.py"),
                           str(tmp_path / "graph.json"), str(tmp_path / "tiny.json")], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["nodes"] == sum(n["kind"] != BIAS for n in result["nodes"])


def save_coders(model, folder, tmp_path):
    runs = []
    for i, coder in enumerate(transcoders(model, skip=False)):
        coder.cfg.model = str(folder)  # what `interp circuit` loads
        runs.append(coder.save(tmp_path / f"tc{i}"))
    return runs


def test_cli_circuit_graph_writes_the_graph_page_and_export(folder, model, tmp_path):
    runs = save_coders(model, folder, tmp_path)
    coder_args = [arg for r in runs for arg in ("--coder", str(r))]
    out = tmp_path / "graph-out"
    result = CliRunner().invoke(app, ["circuit", "graph", *coder_args, "--prompt", PROMPT, "--head-edges", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "sum rule" in result.output and "GiB" in result.output and "most influential nodes" in result.output
    written = json.loads((out / "graph.json").read_text())
    assert written["nodes"] and written["edges"] and (out / "graph.html").is_file()
    exported = json.loads((out / "circuit-tracer" / "graph-out.json").read_text())
    assert exported["metadata"]["slug"] == "graph-out"
    assert json.loads((out / "circuit-tracer" / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "graph-out"
    # bad input: an answer of two tokens, a coder that is not an MLP transcoder
    bad = CliRunner().invoke(app, ["circuit", "graph", *coder_args, "--prompt", PROMPT, "--answer", "ab", "--out", str(out)])
    assert bad.exit_code == 2 and "one token" in bad.output
    sae = fitted("topk", hook="blocks.1.hook_resid_post")
    sae.cfg.model = str(folder)
    sae_run = sae.save(tmp_path / "sae")
    bad = CliRunner().invoke(app, ["circuit", "graph", "--coder", str(sae_run), "--prompt", PROMPT, "--out", str(out)])
    assert bad.exit_code == 2 and "MLP transcoders" in bad.output


def test_bad_graph_input(model):
    coders = transcoders(model, skip=False)
    with pytest.raises(BadInput, match="one per layer"):
        build_graph(model, [coders[0], coders[0]], tokens(model), Target(answer=5), progress=False)
    with pytest.raises(BadInput, match="width"):
        build_graph(model, coders, tokens(model), Target(direction=torch.ones(3)), progress=False)
    with pytest.raises(BadInput, match="outside the vocabulary"):
        build_graph(model, coders, tokens(model), Target(answer=10**6), progress=False)
    with pytest.raises(BadInput, match="share of influence"):
        prune(build_graph(model, coders, tokens(model), Target(answer=5), progress=False), node_threshold=1.5)


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_graph_page_renders_in_chromium(model, tmp_path):
    result = trace(model, transcoders(model, skip=False), GraphConfig(prompt=PROMPT, head_edges=5), progress=False, say=lambda _: None)
    page = write_graph_page(result, tmp_path / "graph.html")
    dom = dump_dom(page.as_uri(), tmp_path / "profile")
    assert 'data-rendered="circuit"' in dom, dom[-2000:]
    assert f'data-nodes="{min(200, len(result["nodes"]))}"' in dom
    assert result["nodes"][1]["id"] in dom
