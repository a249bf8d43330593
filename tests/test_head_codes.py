"""Head circuits from discrete codes (interp.circuits.head_codes) on the tiny model, which has
grouped-query attention (4 query heads sharing 2 key/value heads): a planted head is found, the
scores are the paper's definitions computed by hand, attribution patching agrees with exact
patching to first order, and path patching changes the receiver alone."""

import json

import pytest
import torch
from interp.cli.main import app
from test_circuits import task_file
from test_dashboard_browser import SKIP_WITHOUT_BROWSER, dump_dom
from typer.testing import CliRunner

from interp.circuits.head_codes import HeadsConfig, agreement, edge_scores, find_heads, node_scores
from interp.circuits.head_effects import (
    attribution_effects,
    edge_attribution_effects,
    head_acts,
    head_hook,
    head_z,
    patching_effects,
    path_patching_effects,
    z_hook,
)
from interp.circuits.page import write_heads_page
from interp.circuits.tasks import Task, baseline
from interp.hooks import capture
from interp.models import TINY_MODEL, load_model
from interp.sae import load_sae

N, T = 40, 12
CLEAN_MARKS = (5, 7, 8, 9)
CORRUPT_MARKS = (6, 10, 11, 12)
LAYER, HEAD = 1, 2
TINY_HEADS = 2 * 4


def twin_model(eps=1e-4):
    """The tiny model with each corrupt mark's embedding a near twin of a clean mark's: heads that
    only read the tokens see clean and corrupt prompts as the same."""
    model = load_model(TINY_MODEL)
    with torch.no_grad():
        for clean, corrupt in zip(CLEAN_MARKS, CORRUPT_MARKS):
            model.W_E[corrupt] = model.W_E[clean] + eps * torch.randn_like(model.W_E[clean])
    return model


def prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(20, 200, (N, T), generator=g)
    clean[:, 0] = 1
    corrupt = clean.clone()
    clean[:, 1] = torch.tensor(CLEAN_MARKS).repeat(N // 4)
    corrupt[:, 1] = torch.tensor(CORRUPT_MARKS).repeat(N // 4)
    return clean, corrupt


def task_of(model, clean, corrupt):
    """Answers the clean prompts raise most against the corrupt ones, so the task is done."""
    with torch.no_grad():
        diff = model(clean)[:, -1] - model(corrupt)[:, -1]
    return Task("planted", clean, corrupt, diff.argmax(1, keepdim=True), diff.argmin(1, keepdim=True))


def plant(model):
    """Head LAYER.HEAD writes which clean mark the prompt holds (one of four directions); on
    corrupt prompts it is left as it was."""
    seen = {}

    def record(act, hook):
        seen["second"] = act[:, 1].detach()
        return act

    def write(act, hook):
        marks = torch.stack([(seen["second"] - model.W_E[j]).norm(dim=-1) < 1e-6 for j in CLEAN_MARKS], -1)
        act = act.clone()
        act[:, :, HEAD, :4] += 20 * marks[:, None, :].to(act)
        return act

    model.add_hook("hook_embed", record, is_permanent=True)
    model.add_hook(z_hook(LAYER), write, is_permanent=True)


def test_the_planted_head_scores_first_and_is_the_reference():
    model = twin_model()
    plant(model)
    task = task_of(model, *prompts())
    cfg = HeadsConfig(prompts=N, train_prompts=20, latents=16, steps=100, min_accuracy=0.5, edge_heads=4)
    result, coder = find_heads(model, cfg, task=task)
    planted = LAYER * model.cfg.n_heads + HEAD
    scores = torch.tensor(result["code_score"])
    others = torch.cat([scores[:planted], scores[planted + 1:]])
    assert (others < scores[planted]).all()
    assert result["reference_heads"] == [f"L{LAYER}H{HEAD}"]
    assert result["nodes"]["codes"]["roc_auc"] == 1.0 and result["nodes"]["codes"]["precision_at_n"] == 1.0
    assert coder.arch == "codebook" and set(result["seconds"]) == {"codes", "attribution", "patching", "path_patching", "edge_attribution"}


def test_node_and_edge_scores_are_the_papers_definitions():
    g = torch.Generator().manual_seed(1)
    pos, neg = torch.randint(-1, 5, (30, 6), generator=g), torch.randint(-1, 5, (30, 6), generator=g)
    for head in range(6):
        expected = len({int(c) for c in pos[:, head]} - {int(c) for c in neg[:, head]})
        assert node_scores(pos, neg)[head] == expected
    pairs = [(0, 1), (2, 5), (4, 3)]
    for (a, b), got in zip(pairs, edge_scores(pos, neg, pairs, n_codes=5)):
        together_pos = {(int(x), int(y)) for x, y in zip(pos[:, a], pos[:, b])}
        together_neg = {(int(x), int(y)) for x, y in zip(neg[:, a], neg[:, b])}
        assert got == len(together_pos - together_neg)


def test_agreement_by_hand():
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    labels = torch.tensor([True, False, True, False, False])
    got = agreement(scores, labels)
    # positives outrank 5 of the 6 (positive, negative) pairs
    assert got["roc_auc"] == pytest.approx(5 / 6)
    # top 2 = {0, 1}: one hit of 2
    assert got["precision_at_n"] == got["recall_at_n"] == 0.5
    # threshold 2: TPR 1, FPR 1/3, precision 2/3 -> F1 0.8; the paper's 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert got["best_f1"] == pytest.approx(0.8) and got["best_paper_f1"] == pytest.approx(0.8)


def test_attribution_patching_matches_exact_patching_for_small_differences():
    """With corrupt prompts a hair from the clean ones the metric is linear in each head's z:
    the gradient estimate must equal the patched forward passes."""
    model = twin_model(eps=3e-2)
    clean, corrupt = prompts(seed=2)
    task = task_of(model, clean, corrupt)
    z_clean, z_corrupt = head_z(model, task.clean_nt), head_z(model, task.corrupt_nt)
    exact = patching_effects(model, task, baseline(model, task).mean_clean, z_corrupt)
    estimate = attribution_effects(model, task, {"z": z_clean}, {"z": z_corrupt})["z"]
    assert exact.abs().max() > 1e-4
    torch.testing.assert_close(estimate, exact, atol=0.05 * float(exact.abs().max()), rtol=0.1)


@pytest.mark.parametrize("kind", ["k", "v"])
def test_key_value_heads_attribution_matches_exact_patching(kind):
    """A key/value head is read by two query heads here: patching it changes what both read, and
    the gradient at hook_k/hook_v sums both paths; to first order the two agree."""
    model = twin_model(eps=3e-2)
    task = task_of(model, *prompts(seed=2))
    clean_acts, corrupt_acts = head_acts(model, task.clean_nt, (kind,))[kind], head_acts(model, task.corrupt_nt, (kind,))[kind]
    assert clean_acts.shape[3] == 2
    exact = patching_effects(model, task, baseline(model, task).mean_clean, corrupt_acts, kind=kind)
    estimate = attribution_effects(model, task, {kind: clean_acts}, {kind: corrupt_acts})[kind]
    assert exact.shape == (2 * 2,) and exact.abs().max() > 1e-4
    torch.testing.assert_close(estimate, exact, atol=0.05 * float(exact.abs().max()), rtol=0.1)


@pytest.mark.parametrize("kind", ["z", "k", "v"])
def test_edge_attribution_matches_path_patching_for_small_differences(kind):
    """Every (layer-0 query head, layer-1 receiver) edge: the one-backward estimate against path
    patching, receivers query heads (z) or key/value heads (k, v)."""
    model = twin_model(eps=3e-2)
    task = task_of(model, *prompts(seed=2))
    z_clean, z_corrupt = head_z(model, task.clean_nt), head_z(model, task.corrupt_nt)
    receivers = 4 if kind == "z" else 2
    pairs = [(sender, receivers + receiver) for sender in range(4) for receiver in range(receivers)]
    exact = path_patching_effects(model, task, baseline(model, task).mean_clean, z_clean, z_corrupt, pairs, kind=kind)
    estimate = edge_attribution_effects(model, task, z_clean, z_corrupt, pairs, kind=kind)
    assert exact.abs().max() > 1e-5
    torch.testing.assert_close(estimate, exact, atol=0.05 * float(exact.abs().max()), rtol=0.1)


def test_path_patching_changes_the_receiver_alone_under_grouped_query_attention():
    """The receiver's z comes from the pass where its input holds the sender's corrupt output;
    its sibling query heads, which share its key and value head, keep their clean z."""
    model = twin_model(eps=0.5)
    task = task_of(model, *prompts(seed=3))
    z_clean, z_corrupt = head_z(model, task.clean_nt), head_z(model, task.corrupt_nt)
    n_heads = model.cfg.n_heads
    sender, receiver = 0 * n_heads + 1, 1 * n_heads + 2
    clean = baseline(model, task).mean_clean
    effect = path_patching_effects(model, task, clean, z_clean, z_corrupt, [(sender, receiver)])
    # By hand: the receiver's input is the clean residual plus the sender's output change.
    delta = (z_corrupt[0, :, :, 1] - z_clean[0, :, :, 1]) @ model.W_O[0, 1]
    moved = capture(model, task.clean_nt, [z_hook(1)], patch={"blocks.1.hook_resid_pre": lambda a: a + delta})
    z_moved = moved[z_hook(1)].view(N, T, n_heads, -1)
    assert not torch.allclose(z_moved[:, :, 2], z_clean[1, :, :, 2])
    # query heads 2 and 3 share a key/value head; only head 2 may take the moved z
    patched = z_clean[1].clone()
    patched[:, :, 2] = z_moved[:, :, 2]
    with torch.no_grad():
        expected = (task.metric_n(model(task.clean_nt)).mean()
                    - task.metric_n(model.run_with_hooks(task.clean_nt, fwd_hooks=[(z_hook(1), lambda a, hook: patched)])).mean())
    assert float(effect[0]) == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="earlier layer"):
        path_patching_effects(model, task, clean, z_clean, z_corrupt, [(receiver, sender)])


def test_path_patching_into_a_key_head_reaches_every_query_head_that_reads_it():
    """A key head's keys come from the pass with the sender's corrupt output; both query heads
    that read it (2 and 3) change, the other group's heads (0 and 1) do not."""
    model = twin_model(eps=0.5)
    task = task_of(model, *prompts(seed=3))
    z_clean, z_corrupt = head_z(model, task.clean_nt), head_z(model, task.corrupt_nt)
    clean = baseline(model, task).mean_clean
    effect = path_patching_effects(model, task, clean, z_clean, z_corrupt, [(1, 2 + 1)], kind="k")
    delta = (z_corrupt[0, :, :, 1] - z_clean[0, :, :, 1]) @ model.W_O[0, 1]
    moved = capture(model, task.clean_nt, [head_hook(1, "k")], patch={"blocks.1.hook_resid_pre": lambda a: a + delta})
    k_moved = moved[head_hook(1, "k")].view(N, T, 2, -1)
    k_clean = capture(model, task.clean_nt, [head_hook(1, "k")])[head_hook(1, "k")].view(N, T, 2, -1)

    def with_key_head_1(act, hook):
        act = act.clone()
        act[:, :, 1] = k_moved[:, :, 1]
        return act

    z_patched = capture(model, task.clean_nt, [z_hook(1)], patch={head_hook(1, "k"): lambda a: with_key_head_1(a, None)})
    z_patched = z_patched[z_hook(1)].view(N, T, 4, -1)
    assert not torch.allclose(k_moved[:, :, 1], k_clean[:, :, 1])
    torch.testing.assert_close(z_patched[:, :, :2], z_clean[1, :, :, :2])
    for query_head in (2, 3):
        assert not torch.allclose(z_patched[:, :, query_head], z_clean[1, :, :, query_head])
    with torch.no_grad():
        expected = (task.metric_n(model(task.clean_nt)).mean()
                    - task.metric_n(model.run_with_hooks(task.clean_nt, fwd_hooks=[(head_hook(1, "k"), with_key_head_1)])).mean())
    assert float(effect[0]) == pytest.approx(float(expected), abs=1e-5)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown space"):
        HeadsConfig(space="q")
    with pytest.raises(ValueError, match="train_prompts"):
        HeadsConfig(prompts=4, train_prompts=9)
    with pytest.raises(ValueError, match="steps must be a whole number >= 1, got 0"):
        HeadsConfig(steps=0)
    with pytest.raises(ValueError, match="prompts must be a whole number >= 1, got 2.5"):
        HeadsConfig(prompts=2.5)


def test_cli_writes_heads_json_page_and_coder(tiny_model, tmp_path):
    path = tmp_path / "random.jsonl"
    assert task_file(tiny_model, path, 40) >= 6
    out = tmp_path / "out"
    args = ["circuit", "heads", "--model", TINY_MODEL, "--task", str(path), "--min-accuracy", "0", "--train-prompts", "6",
            "--latents", "16", "--steps", "20", "--edge-heads", "3", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    written = json.loads((out / "heads.json").read_text())
    assert len(written["exact_effect"]) == len(written["code_score"]) == TINY_HEADS
    assert load_sae(out / "coder").arch == "codebook" and (out / "heads.html").is_file()
    assert "ROC-AUC" in result.output
    bad = CliRunner().invoke(app, [*args[:-2], "--space", "q", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown space" in bad.output


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_heads_page_renders_in_chromium(tmp_path):
    model = twin_model()
    plant(model)
    task = task_of(model, *prompts())
    result, _ = find_heads(model, HeadsConfig(prompts=N, train_prompts=20, latents=16, steps=50, min_accuracy=0.5, edge_heads=4), task=task)
    page = write_heads_page(result, tmp_path / "heads.html")
    dom = dump_dom(page.as_uri(), tmp_path / "profile")
    assert 'data-rendered="circuit"' in dom, dom[-2000:]
    assert dom.count('class="main-svg"') >= 1 and "exact patching effect" in dom and f"L{LAYER}H{HEAD}" in dom
