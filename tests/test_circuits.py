"""Feature circuits, checked against references written here: exact activation patching by a
forward hook of the test's own (integrated gradients' sum over a coder's nodes must approach it),
the whole model and the fully ablated model (faithfulness's end points), a circuit planted in a
tiny model (a feature whose effect is set by hand must be found and be the whole mechanism), and
edges that sum to each upstream node's effect when every path runs through the downstream coder.
Tasks are checked against SmolLM2's tokenizer."""

import json

import pytest
import torch
from interp.cli.main import app
from test_dashboard_browser import SKIP_WITHOUT_BROWSER, dump_dom
from test_hooks import fitted
from typer.testing import CliRunner

from interp.circuits import CircuitConfig, Task, build_task, find_circuit
from interp.circuits.ablation import Membership, faithfulness_curve, metric_with
from interp.circuits.attribution import (
    Groups,
    edges_into,
    metric_gradients,
    node_effects,
)
from interp.circuits.circuit import forward_order, rank_nodes
from interp.circuits.page import write_circuit_page
from interp.circuits.states import Node, baseline, coder_states
from interp.circuits.tasks import baseline as task_baseline
from interp.circuits.tasks import check_model_does_task, from_jsonl
from interp.circuits.weights import deembedding, input_dependent, upstream_connections
from interp.data import DataConfig
from interp.errors import BadInput
from interp.features import FeatureConfig, collect_features
from interp.hooks import capture, output_hook
from interp.models import TINY_MODEL, load_hf

N, LENGTH = 12, 9


def model_task(model, n=N, seed=0, vocab=(3, 250)) -> Task:
    """Random prompts and their corruption (two tokens changed, one of them the last), with the clean prompt's top
    prediction as the answer and the corrupt one's as the wrong answer: a task a random model
    does by construction."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(*vocab, (n, LENGTH), generator=g)
    clean[:, 0] = 0  # BOS
    corrupt = clean.clone()
    corrupt[:, [4, -1]] = torch.randint(*vocab, (n, 2), generator=g)
    with torch.no_grad():
        top_clean = model(clean)[:, -1].topk(2).indices
        top_corrupt = model(corrupt)[:, -1].argmax(-1)
    answer = top_clean[:, 0]
    wrong = torch.where(top_corrupt == answer, top_clean[:, 1], top_corrupt)
    return Task("random", clean, corrupt, answer[:, None], wrong[:, None], "logit_diff", {"CHANGED": torch.full((n,), 4)})


def coders_for(model, specs):
    hooks = sorted({h for s in specs for h in (s[1], s[2]) if h})
    data = capture(model, torch.randint(3, 250, (16, 24)), hooks)
    return [fitted(arch, hook=hook, target=target, skip=skip, seed=i, data=data) for i, (arch, hook, target, skip) in enumerate(specs)]


SPECS = [("topk", "blocks.0.hook_resid_post", None, False),
         ("batchtopk", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out", True),
         ("topk", "blocks.1.hook_resid_post", None, False)]


def exact_patch(model, task, hook, value_ntd, positions_nt):
    """The mean metric with `hook`'s activation set to `value_ntd` at `positions_nt`, by the test's own hook."""

    def set_value(act, hook):
        flat = act.reshape(*act.shape[:2], -1).clone()
        flat[positions_nt] = value_ntd[positions_nt].to(flat)
        return flat.reshape(act.shape)

    with torch.no_grad(), model.hooks(fwd_hooks=[(model.hook_dict[hook].name, set_value)]):
        return float(task.metric_n(model(task.clean_nt)).mean())


def objective(task):
    return lambda logits: task.metric_n(logits).sum()


def test_integrated_gradients_approach_exact_patching(tiny_model):
    task, coders = model_task(tiny_model), coders_for(tiny_model, SPECS)
    clean, corrupt = coder_states(tiny_model, coders, task.clean_nt), coder_states(tiny_model, coders, task.corrupt_nt)
    groups = Groups.of(task.role_of_positions(), "role")
    m_clean = float(task.metric_n(tiny_model(task.clean_nt)).mean())
    errors = {}
    for steps in (1, 4, 32):
        effects = node_effects(tiny_model, task.clean_nt, objective(task), clean, corrupt, groups, "ig", steps)
        errors[steps] = []
        for state, patched, eff in zip(clean, corrupt, effects):
            total = float(eff.feature_gk.sum() + eff.error_g.sum() + (0 if eff.skip_g is None else eff.skip_g.sum()))
            exact = exact_patch(tiny_model, task, state.hook, patched.y_ntd, state.nodes_nt) - m_clean
            assert abs(exact) > 1e-3
            errors[steps].append(abs(total - exact) / abs(exact))
    assert max(errors[32]) < 0.01, errors
    assert sum(errors[32]) < sum(errors[1]), errors


def test_attribution_patching_is_the_first_order_term(tiny_model):
    """AtP equals integrated gradients with one step taken at the clean end: check it against a
    finite difference along a tiny patch."""
    task, coders = model_task(tiny_model), coders_for(tiny_model, SPECS[:1])
    clean, corrupt = coder_states(tiny_model, coders, task.clean_nt), coder_states(tiny_model, coders, task.corrupt_nt)
    groups = Groups.of(task.role_of_positions(), "all")
    eps = 1e-3
    small = [c.like(c.f_ntk + eps * (p.f_ntk - c.f_ntk), c.error_ntd + eps * (p.error_ntd - c.error_ntd), None) for c, p in zip(clean, corrupt)]
    effect = node_effects(tiny_model, task.clean_nt, objective(task), clean, small, groups, "atp")[0]
    m_clean = float(task.metric_n(tiny_model(task.clean_nt)).mean())
    exact = exact_patch(tiny_model, task, clean[0].hook, small[0].y_ntd, clean[0].nodes_nt) - m_clean
    total = float(effect.feature_gk.sum() + effect.error_g.sum())
    assert total == pytest.approx(exact, rel=0.02, abs=1e-6)


def test_faithfulness_end_points_are_the_model_and_the_fully_patched_model(tiny_model):
    task, coders = model_task(tiny_model), coders_for(tiny_model, SPECS)
    clean, corrupt = coder_states(tiny_model, coders, task.clean_nt), coder_states(tiny_model, coders, task.corrupt_nt)
    groups = Groups.of(task.role_of_positions(), "role")
    everything = [Membership.everything(s.coder, len(groups.names)) for s in clean]
    nothing = [Membership.none(s.coder, len(groups.names)) for s in clean]
    m_model = metric_with(tiny_model, task, task.clean_nt, clean, corrupt, everything, groups)
    assert m_model == pytest.approx(float(task.metric_n(tiny_model(task.clean_nt)).mean()), abs=1e-4)
    # Every node at its corrupt value: each coder writes its corrupt activation. The deepest
    # coder writes the final residual stream, so the model then computes the corrupt logits there.
    m_empty = metric_with(tiny_model, task, task.clean_nt, clean, corrupt, nothing, groups)
    expected = exact_patch(tiny_model, task, "blocks.1.hook_resid_post", corrupt[2].y_ntd, clean[2].nodes_nt)
    assert m_empty == pytest.approx(expected, abs=1e-4)
    ranked = [Node(0, "error", -1, g) for g in range(len(groups.names))]
    curve = faithfulness_curve(tiny_model, task, task.clean_nt, clean, corrupt, groups, ranked, [1], ranked, n_random=1)
    assert (curve.m_model, curve.m_empty) == (pytest.approx(m_model), pytest.approx(m_empty))


def planted(model, task):
    """A jumprelu coder at the final residual stream whose feature 7 fires (value 1) exactly on the
    clean prompts at END and writes the whole clean - corrupt difference there; no other feature
    ever fires. The mean over prompts of that difference, so the task uses one prompt pair."""
    hook = "blocks.1.hook_resid_post"
    acts = {name: capture(model, tokens, [hook])[hook].view(len(tokens), LENGTH, -1) for name, tokens in
            (("clean", task.clean_nt), ("corrupt", task.corrupt_nt))}
    y_clean, y_corrupt = acts["clean"][0, -1], acts["corrupt"][0, -1]
    delta = y_clean - y_corrupt
    coder = fitted("jumprelu", hook=hook, data={hook: acts["clean"].flatten(0, 1)})
    with torch.no_grad():
        coder.in_scale.fill_(1), coder.out_scale.fill_(1), coder.b_dec.zero_()
        coder.threshold.fill_(1e9)
        coder.threshold[7] = 0.5
        u = delta / delta.norm()
        coder.W_enc[7] = u * 4 / delta.norm()  # z = 1 on the clean END token, 1 - 4 on the corrupt one
        coder.b_enc[7] = 1 - float(coder.W_enc[7] @ y_clean)
        coder.W_dec[7] = delta
    return coder


def test_a_planted_feature_is_found_and_is_the_whole_mechanism(tiny_model):
    base = model_task(tiny_model, n=1)
    task = Task("planted", base.clean_nt.repeat(4, 1), base.corrupt_nt.repeat(4, 1), base.answers_na.repeat(4, 1),
                base.wrong_na.repeat(4, 1), "logit_diff", {"CHANGED": torch.full((4,), 4)})
    coder = planted(tiny_model, task)
    for method in ("atp", "ig"):
        result = find_circuit(tiny_model, [coder], CircuitConfig(method=method, sizes=[1, 2], random_circuits=2), task=task,
                              progress=False)
        top = result["nodes"][0]
        assert (top["kind"], top["latent"], top["group"]) == ("feature", 7, "END")
        assert result["faithfulness"]["faithfulness"][0] == pytest.approx(1.0, abs=1e-4)
        assert result["faithfulness"]["completeness"][0] == pytest.approx(0.0, abs=1e-4)
        assert result["error_share"] < 0.05


def test_edges_into_every_downstream_node_sum_to_the_upstream_effect(tiny_model):
    """With the downstream coder on the final residual stream every path runs through it, so for
    each upstream node the edges into all downstream nodes add up to its attribution-patching effect."""
    task = model_task(tiny_model)
    coders = coders_for(tiny_model, [SPECS[0], ("topk", "blocks.1.hook_resid_post", None, False)])
    clean, corrupt = coder_states(tiny_model, coders, task.clean_nt), coder_states(tiny_model, coders, task.corrupt_nt)
    groups = Groups.of(task.role_of_positions(), "all")
    effects = node_effects(tiny_model, task.clean_nt, objective(task), clean, corrupt, groups, "atp")
    grads = metric_gradients(tiny_model, task.clean_nt, [s.hook for s in clean], objective(task))
    active = (clean[1].f_ntk > 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
    targets = [Node(1, "feature", k, 0) for k in active] + [Node(1, "error", -1, 0)]
    into = edges_into(tiny_model, task.clean_nt, clean[0], corrupt[0], clean[1], grads[output_hook(coders[1])], targets, groups)
    summed_features = sum(e.feature_gk for e in into)
    summed_error = sum(e.error_g for e in into)
    torch.testing.assert_close(summed_features, effects[0].feature_gk, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(summed_error, effects[0].error_g, atol=1e-4, rtol=1e-3)


def test_coders_are_ordered_as_the_model_computes_them(tiny_model):
    """The hook registry lists blocks.1.hook_resid_post before blocks.1.hook_mlp_out; the model
    computes the MLP output first, and edges go from each coder to the next one computed."""
    coders = coders_for(tiny_model, SPECS)
    ordered = forward_order(tiny_model, [coders[2], coders[0], coders[1]])
    assert [output_hook(c) for c in ordered] == ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]
    with pytest.raises(BadInput, match="same hook"):
        forward_order(tiny_model, [coders[0], coders[0]])


def test_baselines_mean_and_zero(tiny_model):
    task, coders = model_task(tiny_model), coders_for(tiny_model, SPECS[:2])
    clean = coder_states(tiny_model, coders, task.clean_nt)
    other = coder_states(tiny_model, coders, task.corrupt_nt)
    mean = baseline("mean", clean, None, other)
    torch.testing.assert_close(mean[0].f_ntk[3], other[0].f_ntk.mean(0))
    zero = baseline("zero", clean, None, None)
    assert zero[1].f_ntk.abs().max() == 0 and zero[1].skip_ntd.abs().max() == 0
    with pytest.raises(BadInput, match="calibration"):
        baseline("mean", clean, None, None)


def test_a_task_the_model_does_not_do_is_refused(tiny_model):
    task = model_task(tiny_model)
    swapped = Task("swapped", task.clean_nt, task.corrupt_nt, task.wrong_na, task.answers_na)
    result = task_baseline(tiny_model, swapped)
    assert result.accuracy == 0
    with pytest.raises(BadInput, match="does not do task swapped"):
        check_model_does_task(result, swapped, 0.6)
    with pytest.raises(BadInput, match="does not do task"):
        find_circuit(tiny_model, coders_for(tiny_model, SPECS[:1]), CircuitConfig(), task=swapped, progress=False)


# --- tasks ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["ioi", "greater_than", "induction", "agreement"])
def test_builtin_tasks_fit_smollm2s_tokenizer(smollm2, name):
    tokenizer = smollm2.tokenizer
    task = build_task(name, tokenizer, n=24, seed=1)
    assert task.clean_nt.shape == task.corrupt_nt.shape and len(task) == 24
    assert torch.equal(task.clean_nt[0], smollm2.to_tokens(tokenizer.decode(task.clean_nt[0, 1:]))[0])
    rows = torch.arange(len(task))
    if name == "ioi":
        assert torch.equal(task.clean_nt[rows, task.roles["IO"]], task.answers_na[:, 0])
        assert torch.equal(task.clean_nt[rows, task.roles["S2"]], task.wrong_na[:, 0])
        assert torch.equal(task.clean_nt[rows, task.roles["S1"]], task.wrong_na[:, 0])
        assert len(set(task.corrupt_nt[:, task.roles["S2"][0]].tolist())) > 1
    if name == "greater_than":
        digits = [tokenizer.decode([t]) for t in task.clean_nt[rows, task.roles["YY"]].tolist()]
        for i, d in enumerate(digits):
            answers = {tokenizer.decode([t]) for t in task.answers_na[i].tolist() if t >= 0}
            assert answers == {str(x) for x in range(int(d) + 1, 10)}
    if name == "induction":
        end, match, nxt = task.roles["END"], task.roles["MATCH"], task.roles["NEXT"]
        assert torch.equal(task.clean_nt[rows, end], task.clean_nt[rows, match])
        assert torch.equal(task.clean_nt[rows, nxt], task.answers_na[:, 0])
    if name == "agreement":
        subjects = [tokenizer.decode([t]) for t in task.clean_nt[rows, task.roles["SUBJ"]].tolist()]
        verbs = [tokenizer.decode([t]) for t in task.answers_na[:, 0].tolist()]
        assert all((s.endswith("s")) == (v == " are") for s, v in zip(subjects, verbs))


def test_jsonl_tasks_and_their_errors(tmp_path, tiny_model):
    tokenizer = tiny_model.tokenizer
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"prompt": "ab c", "corrupt": "ab d", "answer": "x", "wrong": "y"},
                                                      {"prompt": "ef g", "corrupt": "ef h", "answer": "z", "wrong": "x"}]))
    task = from_jsonl(tokenizer, path)
    assert task.clean_nt.shape == (2, 5) and task.answers_na[:, 0].tolist() == [tokenizer.convert_tokens_to_ids("<0x78>")] * 1 + [tokenizer.convert_tokens_to_ids("<0x7A>")]
    path.write_text(json.dumps({"prompt": "ab c", "corrupt": "ab dd", "answer": "x", "wrong": "y"}))
    with pytest.raises(BadInput, match="same number of tokens"):
        from_jsonl(tokenizer, path)
    path.write_text(json.dumps({"prompt": "ab c", "corrupt": "ab d", "answer": "xy", "wrong": "y"}))
    with pytest.raises(BadInput, match="not one token"):
        from_jsonl(tokenizer, path)
    path.write_text(json.dumps({"prompt": "ab c"}))
    with pytest.raises(BadInput, match="lacks"):
        from_jsonl(tokenizer, path)


def task_file(model, path, n):
    """A .jsonl task the tiny model does: printable ASCII bytes (token id = byte + 3), so that
    prompts are text; answers the model predicts need not be, so only the lines whose answers
    are printable are kept. Returns the number of lines."""
    task = model_task(model, n=n, vocab=(ord("a") + 3, ord("z") + 4))
    decode = model.tokenizer.decode
    lines = [{"prompt": decode(c[1:]), "corrupt": decode(k[1:]), "answer": decode(a), "wrong": decode(w)}
             for c, k, a, w in zip(task.clean_nt, task.corrupt_nt, task.answers_na, task.wrong_na)
             if all(35 <= int(t) < 130 for t in (a, w))]
    path.write_text("\n".join(json.dumps(r) for r in lines))
    return len(lines)


def test_cli_circuit_writes_circuit_json(tiny_model, tmp_path):
    path = tmp_path / "random.jsonl"
    assert task_file(tiny_model, path, 60) >= 6
    runs = []
    for i, coder in enumerate(coders_for(tiny_model, SPECS[:2])):
        coder.cfg.model = TINY_MODEL  # what `interp circuit` loads
        runs.append(coder.save(tmp_path / f"coder{i}"))
    result = CliRunner().invoke(app, ["circuit", "find", "--task", str(path), *[arg for r in runs for arg in ("--coder", str(r))],
                                      "--method", "atp", "--sizes", "1", "--sizes", "5", "--min-accuracy", "0", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "circuit.json").read_text())
    assert written["nodes"] and written["faithfulness"]["sizes"] == [1, 5]
    assert "faithfulness" in result.output


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_circuit_page_renders_in_chromium(tiny_model, tmp_path):
    task = model_task(tiny_model)
    coders = coders_for(tiny_model, SPECS)
    result = find_circuit(tiny_model, coders, CircuitConfig(method="atp", sizes=[1, 3], random_circuits=1), task=task, progress=False)
    for coder in coders:
        coder.cfg.model = TINY_MODEL
    first = coders[0]
    features = {output_hook(first): collect_features(tiny_model, first, FeatureConfig(tokens=600, top_k=4, samples=4,
                                                                                      data=DataConfig(context_size=32, model_batch=4)), progress=False)}
    page = write_circuit_page(result, tmp_path / "circuit.html", features)
    dom = dump_dom(page.as_uri(), tmp_path / "profile")
    assert 'data-rendered="circuit"' in dom, dom[-2000:]
    assert 'class="main-svg"' in dom
    top = result["nodes"][0]["id"]
    assert f'id="{top}"' in dom
    described = [n for n in result["nodes"][:50] if n["coder"] == output_hook(first) and n["kind"] == "feature"
                 and features[output_hook(first)].top_contexts(n["latent"])]
    assert described and "top tokens:" in dom


# --- weights-based transcoder circuits -----------------------------------------------------

TRANSCODERS = [("topk", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", True),
               ("batchtopk", "blocks.1.ln2.hook_out", "blocks.1.hook_mlp_out", False)]


@pytest.fixture
def norm_gain(tiny_model):
    """The tiny model with a random gain in layer 1's MLP norm (its own is all ones, which would
    hide a gain handled wrongly), restored afterwards."""
    weight = tiny_model.blocks[1].ln2.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.copy_(torch.rand_like(weight) + 0.5)
    yield tiny_model
    with torch.no_grad():
        weight.copy_(saved)


@pytest.mark.parametrize("reads", ["ln2.hook_normalized", "ln2.hook_out"])
def test_input_dependent_contributions_add_up_to_the_pre_activation(norm_gain, reads):
    tiny_model = norm_gain
    specs = [TRANSCODERS[0], ("topk", f"blocks.1.{reads}", "blocks.1.hook_mlp_out", False)]
    up, down = coders_for(tiny_model, specs)
    tokens = tiny_model.to_tokens(["The parts of the residual stream add up."])[0]
    for feature, position in ((3, 4), (17, 7)):
        parts = input_dependent(tiny_model, [up], down, feature, tokens, position)
        total = sum(parts.features.values()) + sum(parts.rest.values())
        assert total == pytest.approx(parts.pre_activation, rel=1e-4, abs=1e-5)
        assert parts.features and "blocks.0.transcoder error" in parts.rest and "blocks.0.transcoder skip" in parts.rest


def test_weights_connections_and_deembedding_against_plain_products(norm_gain):
    tiny_model = norm_gain
    up, down = coders_for(tiny_model, TRANSCODERS)
    feature = 5
    gain = tiny_model.blocks[1].ln2.weight.detach()
    with torch.no_grad():
        v = down.W_enc[feature] * down.in_scale * gain  # reads ln2.hook_out: the gain is part of its input
        direct = (up.W_dec / up.out_scale) @ v
    found = upstream_connections(tiny_model, [up], down, feature, top=5)
    assert [c.feature for c in found] == direct.abs().topk(5).indices.tolist()
    assert found[0].weight == pytest.approx(float(direct[found[0].feature]), rel=1e-5)
    embedding = load_hf(TINY_MODEL)[0].model.embed_tokens.weight.detach()
    tokens = deembedding(tiny_model, down, feature, top=4)
    assert [t for t, _ in tokens] == (embedding @ v).topk(4).indices.tolist()
    with pytest.raises(BadInput, match="MLP transcoders"):
        upstream_connections(tiny_model, [fitted(hook="blocks.0.hook_resid_post")], down, feature)


def test_cli_circuit_task_and_weights(tiny_model, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["circuit", "task", "--task", "ioi", "--model", TINY_MODEL])
    assert result.exit_code == 2 and "IOI names are one token" in result.output  # a byte tokenizer has no one-token names
    runs = []
    for i, coder in enumerate(coders_for(tiny_model, TRANSCODERS)):
        coder.cfg.model = TINY_MODEL
        runs.append(str(coder.save(tmp_path / f"t{i}")))
    result = runner.invoke(app, ["circuit", "weights", "--coder", runs[0], "--coder", runs[1], "--feature", "5",
                                 "--prompt", "The parts add up.", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "strongest input-invariant connections" in result.output and "pre-activation" in result.output
    result = runner.invoke(app, ["circuit", "weights", "--coder", runs[1], "--coder", runs[0], "--feature", "5"])
    assert result.exit_code == 2 and "not upstream" in result.output


@pytest.mark.parametrize("kind", ["mean", "zero"])
def test_every_baseline_finds_a_checked_circuit(tiny_model, kind):
    task = model_task(tiny_model)
    cfg = CircuitConfig(method="atp", baseline=kind, sizes=[2], random_circuits=1, group_by="position")
    result = find_circuit(tiny_model, coders_for(tiny_model, SPECS[:2]), cfg, task=task, progress=False)
    test_half = task.split(0.5)[1]
    assert result["faithfulness"]["m_model"] == pytest.approx(float(test_half.metric_n(tiny_model(test_half.clean_nt)).mean()), abs=1e-4)
    assert result["groups"] == [f"pos{t}" for t in range(1, LENGTH)]
    assert all(edge["source"].startswith("blocks.0.hook_resid_post/") for edge in result["edges"])


def test_probability_difference_metric():
    logits = torch.randn(3, 4, 10)
    task = Task("digits", torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long),
                torch.tensor([[7, 8, 9], [5, -1, -1], [1, 2, -1]]), torch.tensor([[1, -1, -1], [0, 1, 2], [3, -1, -1]]), "prob_diff")
    p = logits[:, -1].softmax(-1)
    expected = torch.stack([p[0, 7:10].sum() - p[0, 1], p[1, 5] - p[1, :3].sum(), p[2, 1:3].sum() - p[2, 3]])
    torch.testing.assert_close(task.metric_n(logits), expected)


def test_the_circuit_of_every_ranked_node_is_the_model(tiny_model):
    """On the prompts the effects were found on, nodes left out of the ranking have no effect (the
    same clean and baseline value, or no gradient), so a circuit of every ranked node must
    reproduce the model: faithfulness 1, completeness 0. (find_circuit checks on held-out prompts,
    where other features fire: there this need not hold.)"""
    task, coders = model_task(tiny_model), coders_for(tiny_model, SPECS)
    clean, corrupt = coder_states(tiny_model, coders, task.clean_nt), coder_states(tiny_model, coders, task.corrupt_nt)
    groups = Groups.of(task.role_of_positions(), "role")
    effects = node_effects(tiny_model, task.clean_nt, objective(task), clean, corrupt, groups, "atp")
    ranked, _ = rank_nodes(effects, clean)
    curve = faithfulness_curve(tiny_model, task, task.clean_nt, clean, corrupt, groups, ranked, [len(ranked)], ranked, n_random=1)
    assert curve.faithfulness[0] == pytest.approx(1.0, abs=1e-4)
    assert curve.completeness[0] == pytest.approx(0.0, abs=1e-4)
