"""Supervised dictionaries and the task evaluation (interp.circuits.supervised, task_evaluation)
on the tiny model, with an IOI-shaped task built from its byte tokens: least squares is exact
when the attributes determine the activation, feature edits equal the same edits made by hand
through a plain forward hook, and the scores are their definitions."""

import json

import pytest
import torch
from interp.cli.main import app
from test_dashboard_browser import SKIP_WITHOUT_BROWSER, dump_dom
from typer.testing import CliRunner

from interp.circuits import tasks
from interp.circuits.page import evaluation_table, write_evaluation_page
from interp.circuits.supervised import SupervisedDictionary
from interp.circuits.task_evaluation import (
    Learned,
    TaskEvalConfig,
    counterfactual,
    detectors,
    evaluate_on_task,
    ioi_attributes,
    logit_diff_n,
    node_acts,
    score,
    symptoms,
    with_node,
)
from interp.circuits.tasks import Task
from interp.models import TINY_MODEL, ModelConfig, load_model
from interp.sae import create_coder

HOOK = "blocks.1.attn.hook_z"
NAMES = list(range(30, 40))
T = 10


def byte_ioi(tokenizer=None, n: int = 60, seed: int = 0) -> Task:
    """IOI's shape in byte tokens: 'names' are ten token ids; the IO at position 2 or 4, S at the
    other and again at 7; answer IO, wrong S; corrupt prompts hold three other names."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(60, 200, (n, T), generator=g)
    clean[:, 0] = 0
    corrupt = clean.clone()
    io_pos, s1_pos = torch.full((n,), 2), torch.full((n,), 4)
    flip = torch.rand(n, generator=g) < 0.5
    io_pos[flip], s1_pos[flip] = 4, 2
    rows = torch.arange(n)
    picks = torch.stack([torch.randperm(len(NAMES), generator=g)[:5] for _ in range(n)])
    names = torch.tensor(NAMES)[picks]
    io, s = names[:, 0], names[:, 1]
    clean[rows, io_pos], clean[rows, s1_pos], clean[:, 7] = io, s, s
    corrupt[rows, io_pos], corrupt[rows, s1_pos], corrupt[:, 7] = names[:, 2], names[:, 3], names[:, 4]
    return Task("ioi", clean, corrupt, io[:, None], s[:, None], "logit_diff", {"IO": io_pos, "S1": s1_pos, "S2": torch.full((n,), 7)})


def planted_model():
    """The tiny model made to do the byte IOI task through the node: layer 1's z at the last
    position gets a push that the output matrix turns into W_U[IO] - W_U[S] (IO and S read from
    the prompt's embeddings), so the node carries both names and the answer depends on it."""
    model = load_model(TINY_MODEL)
    names = torch.tensor(NAMES)
    W_O = model.W_O[1].detach().reshape(-1, model.cfg.d_model)
    to_z = torch.linalg.pinv(W_O)
    names_E = model.W_E[names].detach()
    seen = {}

    def record(act, hook):
        seen["embed"] = act.detach()
        return act

    def write(act, hook):
        which = ((seen["embed"][:, :, None] - names_E[None, None]).norm(dim=-1) < 1e-5).float()
        s = which[:, 7].argmax(-1)
        first, second = which[:, 2].argmax(-1), which[:, 4].argmax(-1)
        io = torch.where(first == s, second, first)
        push = 3 * (model.W_U[:, names[io]] - model.W_U[:, names[s]]).T.detach() @ to_z
        act = act.clone()
        act[:, -1] += push.view(len(act), *act.shape[2:]).to(act)
        return act

    model.add_hook("hook_embed", record, is_permanent=True)
    model.add_hook(HOOK, write, is_permanent=True)
    return model


def test_least_squares_is_exact_when_the_attributes_determine_the_activation():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 12
    attributes = {"IO": torch.randint(0, 5, (n,), generator=g), "S": torch.randint(0, 4, (n,), generator=g)}
    # correlated attributes: S copies IO on a third of the rows, so conditional means would be biased
    attributes["S"][:100] = attributes["IO"][:100] % 4
    attributes["order"] = torch.randint(0, 2, (n,), generator=g)
    table = {name: torch.randn(int(v.max()) + 1, d, generator=g) for name, v in attributes.items()}
    constant = torch.randn(d, generator=g)
    acts = constant + sum(table[name][v] for name, v in attributes.items())
    dictionary = SupervisedDictionary.fit(acts, attributes)
    torch.testing.assert_close(dictionary.reconstruct(attributes), acts, atol=1e-4, rtol=1e-4)
    # an exchange moves the reconstruction by the difference of the two values' true directions
    new = (attributes["IO"] + 1) % 5
    edited = dictionary.edit(acts, "IO", attributes["IO"], new)
    torch.testing.assert_close(edited, acts - table["IO"][attributes["IO"]] + table["IO"][new], atol=1e-4, rtol=1e-4)
    assert dictionary.active(attributes).sum(1).eq(3).all() and dictionary.n_features == 5 + 4 + 2
    with pytest.raises(ValueError, match="not fitted on"):
        dictionary.reconstruct({**attributes, "IO": torch.full((n,), 9)})


def test_ioi_attributes_and_counterfactuals():
    task = byte_ioi()
    attributes = ioi_attributes(task)
    assert (attributes["IO"] == task.answers_na[:, 0]).all() and (attributes["S"] == task.wrong_na[:, 0]).all()
    assert (attributes["order"] == (task.roles["IO"] == 2).long()).all()
    io = counterfactual(task, "IO", seed=0)
    changed = (io.tokens_nt != task.clean_nt)
    assert (changed.sum(1) == 1).all() and changed[torch.arange(len(task)), task.roles["IO"]].all()
    assert ((io.new_n != attributes["IO"]) & (io.new_n != attributes["S"])).all()
    s = counterfactual(task, "S", seed=0)
    assert ((s.tokens_nt != task.clean_nt).sum(1) == 2).all() and (s.wrong_n == s.new_n).all() and (s.answer_n == attributes["IO"]).all()
    order = counterfactual(task, "order", seed=0)
    assert (ioi_attributes(Task("ioi", order.tokens_nt, task.corrupt_nt, task.answers_na, task.wrong_na,
                                roles={**task.roles, "IO": task.roles["S1"], "S1": task.roles["IO"]}))["IO"] == attributes["IO"]).all()
    assert (order.new_n == 1 - attributes["order"]).all() and (order.answer_n == attributes["S"]).all()


def by_hand_logits(model, tokens, positions, value_nd):
    rows = torch.arange(len(tokens))

    def hook(act, hook):
        act = act.clone()
        act[rows, positions] = value_nd.view(len(rows), *act.shape[2:])
        return act

    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook)])


def test_exchanging_latents_moves_the_metric_as_computed_by_hand():
    model = load_model(TINY_MODEL)
    task = byte_ioi()
    cf = counterfactual(task, "IO", seed=1)
    end = task.roles["END"]
    acts, cf_acts = node_acts(model, task.clean_nt, HOOK, end), node_acts(model, cf.tokens_nt, HOOK, end)
    torch.manual_seed(0)
    coder = create_coder("topk", d_in=acts.shape[1], n_latents=32, hook=HOOK, k=4)
    edits = Learned("topk", coder).edits(acts, cf_acts, ioi_attributes(task), cf)
    # by hand: each prompt's latent values, one latent at a time
    with torch.no_grad():
        W = coder.model_units().W_dec

        def values(x):
            code = coder.encode(x)
            dense = torch.zeros(len(x), 32)
            for row in range(len(x)):
                for i, v in zip(code.indices_bk[row].tolist(), code.values_bk[row].tolist()):
                    if i >= 0:
                        dense[row, i] = v
            return dense

        change = values(cf_acts) - values(acts)
        expected = acts.clone()
        for row in range(len(acts)):
            best = max(range(32), key=lambda i: float(change[row, i].abs() * W[i].norm()))
            expected[row] += change[row, best] * W[best]
    torch.testing.assert_close(edits[1], expected, atol=1e-5, rtol=1e-5)
    got = logit_diff_n(with_node(model, task.clean_nt, HOOK, end, edits[1]), cf.answer_n, cf.wrong_n)
    hand = logit_diff_n(by_hand_logits(model, task.clean_nt, end, expected), cf.answer_n, cf.wrong_n)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, logit_diff_n(model(task.clean_nt), cf.answer_n, cf.wrong_n))
    # all the latents that change: the prompt's reconstruction exchanged for the counterfactual's
    full = acts + coder.reconstruct(cf_acts) - coder.reconstruct(acts)
    with torch.no_grad():
        dense = Learned("topk", coder).dense
        torch.testing.assert_close(acts + (dense(cf_acts) - dense(acts)) @ W, full, atol=1e-4, rtol=1e-4)


def test_detector_scores_by_hand():
    active = torch.tensor([[1, 0], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    attributes = {"IO": torch.tensor([5, 5, 6, 6])}
    got = detectors(active, attributes)["IO"]
    # value 5: latent 0 fires on rows 0, 1, 3: precision 2/3, recall 1 -> F1 0.8; latent 1: 0
    # value 6: latent 1 fires on rows 2, 3: precision 1, recall 1 -> F1 1
    assert got["by_value"] == {5: pytest.approx(0.8), 6: pytest.approx(1.0)}
    assert got["best_f1"] == pytest.approx(0.9) and got["precise_per_value"] == pytest.approx(0.5)
    # a latent counts as a precise detector only of the value it detects best: latent 0 is perfect
    # for IO 5 and precise for order 0 (precision 1, recall 2/3), so it counts for IO alone
    both = detectors(torch.tensor([[1], [1], [0], [0]], dtype=torch.bool),
                     {"IO": torch.tensor([5, 5, 6, 6]), "order": torch.tensor([0, 0, 0, 1])})
    assert both["IO"]["precise_per_value"] == 0.5 and both["order"]["precise_per_value"] == 0.0
    assert both["order"]["by_value"][0] == pytest.approx(0.8)
    assert symptoms({"IO": {"best_f1": 0.9, "precise_per_value": 2.5}, "S": {"best_f1": 0.3, "precise_per_value": 0}}) == \
        {"occluded": ["S"], "over_split": ["IO"]}


class Exact:
    """A dictionary that reconstructs perfectly: sufficiency and necessity are 1 by definition."""

    name = "exact"

    def reconstruct(self, acts, attributes):
        return acts

    def active(self, acts, attributes):
        return torch.ones(len(acts), 1, dtype=torch.bool)

    def edits(self, acts, cf_acts, attributes, cf):
        return {1: cf_acts}


def test_a_perfect_dictionary_is_sufficient_necessary_and_controls_fully():
    model = planted_model()
    task = byte_ioi()
    end = task.roles["END"]
    acts = node_acts(model, task.clean_nt, HOOK, end)
    with torch.no_grad():
        clean = float(task.metric_n(model(task.clean_nt)).mean())
    mean = acts.mean(0)
    base = {"clean": clean, "mean_ablated": float(task.metric_n(with_node(model, task.clean_nt, HOOK, end, mean.expand_as(acts))).mean())}
    cf = counterfactual(task, "IO", seed=0)
    cf_acts = node_acts(model, cf.tokens_nt, HOOK, end)
    # the target, the node patched from the counterfactual, through a plain forward hook
    with torch.no_grad():
        prompt = float(logit_diff_n(model(task.clean_nt), cf.answer_n, cf.wrong_n).mean())
    patched = float(logit_diff_n(by_hand_logits(model, task.clean_nt, end, cf_acts), cf.answer_n, cf.wrong_n).mean())
    assert patched - prompt > 0.5
    cf_base = {"prompt": prompt, "patched": patched}
    row = score(model, Exact(), task, HOOK, end, acts, ioi_attributes(task), mean, base, [(cf, cf_acts, cf_base)])
    assert row["sufficiency"] == pytest.approx(1.0) and row["necessity"] == pytest.approx(1.0, abs=1e-5)
    assert row["control"]["IO"][1] == pytest.approx(1.0, abs=1e-5) and row["fvu"] == 0.0
    # a patch that moves nothing leaves control undefined, not a ratio of noise
    row = score(model, Exact(), task, HOOK, end, acts, ioi_attributes(task), mean, base, [(cf, cf_acts, {"prompt": prompt, "patched": prompt + 0.01})])
    assert row["control"]["IO"][1] is None


def test_evaluation_scores_the_supervised_dictionary_and_each_family(monkeypatch):
    model = planted_model()
    monkeypatch.setitem(tasks.BUILDERS, "ioi", byte_ioi)
    cfg = TaskEvalConfig(hook=HOOK, prompts=60, fit_prompts=400, archs=["topk", "gradient", "codebook"], latents=32, k=4,
                         steps=60, batch_size=64, min_accuracy=0)
    result, trained = evaluate_on_task(model, cfg, progress=False)
    assert [row["name"] for row in result["rows"]] == ["supervised", "topk", "gradient", "codebook"]
    assert set(trained) == {"topk", "gradient", "codebook"} and cfg.archs == ["topk", "gradient", "codebook"]
    supervised = result["rows"][0]
    # the supervised features are the attribute values themselves: perfect detectors, one per value
    assert all(v["best_f1"] == 1.0 for v in supervised["interpretability"].values())
    assert supervised["l0"] == 3.0 and set(supervised["control"]) == {"IO", "S", "order"}
    # the planted node carries both names: exchanging the supervised IO feature moves the answer
    assert supervised["control"]["IO"][2] > 0.5
    for row in result["rows"][1:]:
        assert row["l0"] <= 4.0 + 1e-6 and set(row["control"]["IO"]) == {1, 2, 4, 8, 16}


def test_cli_writes_the_evaluation_and_refuses_bad_input(monkeypatch, tmp_path):
    monkeypatch.setitem(tasks.BUILDERS, "ioi", byte_ioi)
    monkeypatch.setattr(ModelConfig, "load", lambda self: planted_model())
    out = tmp_path / "eval"
    common = ["circuit", "evaluate", "--model", TINY_MODEL, "--hook", HOOK, "--prompts", "60", "--fit-prompts", "300",
              "--latents", "16", "--k", "2", "--steps", "30", "--min-accuracy", "0"]
    args = [*common, "--arch", "topk", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "evaluation.json").read_text())
    assert [row["name"] for row in written["rows"]] == ["supervised", "topk"]
    assert (out / "evaluation.html").is_file() and (out / "coders" / "topk").is_dir() and "sufficiency" in result.output
    again = CliRunner().invoke(app, [*common, "--arch", "none", "--coder", str(out / "coders" / "topk"), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    rows = json.loads((tmp_path / "again" / "evaluation.json").read_text())["rows"]
    assert [row["name"] for row in rows] == ["supervised", str(out / "coders" / "topk")]
    # the saved coder scores as it did when it was trained
    assert rows[1]["sufficiency"] == pytest.approx(written["rows"][1]["sufficiency"], abs=1e-6)
    assert rows[1]["control"] == written["rows"][1]["control"]
    bad = CliRunner().invoke(app, [*args[:-2], "--role", "XYZ", "--out", str(out)])
    assert bad.exit_code == 2 and "no role" in bad.output
    bad = CliRunner().invoke(app, [*common, "--arch", "jumprelu", "--out", str(out)])
    assert bad.exit_code == 2 and "cannot be trained" in bad.output


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_evaluation_page_renders_in_chromium(monkeypatch, tmp_path):
    monkeypatch.setitem(tasks.BUILDERS, "ioi", byte_ioi)
    cfg = TaskEvalConfig(hook=HOOK, prompts=40, fit_prompts=200, archs=["batchtopk"], latents=16, k=2, steps=20, min_accuracy=0)
    result, _ = evaluate_on_task(planted_model(), cfg, progress=False)
    columns, rows = evaluation_table(result)
    assert [row[0] for row in rows] == ["supervised", "batchtopk"] and len(columns) == len(rows[0])
    dom = dump_dom(write_evaluation_page(result, tmp_path / "evaluation.html").as_uri(), tmp_path / "profile")
    assert 'data-rendered="circuit"' in dom, dom[-2000:]
    assert dom.count('class="main-svg"') >= 1 and "sufficiency" in dom and "batchtopk" in dom
