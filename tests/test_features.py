"""The feature pass against a brute-force recount, reloading without the model, logit lens,
search, plots, the dashboard file, and the `features` / `steer` commands."""

import json
import re

import pytest
import torch
from interp.cli.main import app
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from interp import features
from interp.dashboard import parse_features, write_dashboard
from interp.data import DataConfig, iter_texts, iter_token_batches
from interp.errors import BadInput
from interp.features import (
    FeatureConfig,
    collect_features,
    decoder_neighbours,
    feature_activations,
    features_on_text,
    load_features,
    search_features,
)
from interp.plots import (
    activation_histogram,
    density_histogram,
    neighbours_figure,
    text_heatmap,
)
from interp.sae import create_coder

CFG = FeatureConfig(tokens=2000, top_k=5, samples=8, left=4, right=2, selection="float32", data=DataConfig(context_size=32, model_batch=4))


def tiny_coder(hook="blocks.1.hook_resid_post", target_hook=None):
    torch.manual_seed(0)
    return create_coder("topk", d_in=64, n_latents=96, k=4, hook=hook, target_hook=target_hook, model="tiny-llama").eval()


@pytest.fixture(scope="module")
def collected(tiny_model):
    coder = tiny_coder()
    return coder, collect_features(tiny_model, coder, CFG, progress=False)


def brute_force(model, coder):
    """Every firing (feature, value, sequence row, position) of the same text, the slow way."""
    batches = iter_token_batches(model.tokenizer, iter_texts("builtin"), 32, 4)
    firings, seen, rows = [], 0, []
    for batch in batches:
        if seen >= CFG.tokens:
            break
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens_bt, names_filter=[coder.cfg.hook])
        code = coder.encode(cache[coder.cfg.hook][batch.mask_bt])
        where = batch.mask_bt.nonzero()
        for t in range(len(where)):
            for f, v in zip(code.indices_bk[t].tolist(), code.values_bk[t].tolist()):
                if v > 0:
                    firings.append((f, v, len(rows) + int(where[t, 0]), int(where[t, 1])))
        rows.extend(batch.tokens_bt.tolist())
        seen += len(where)
    return firings, rows, seen


def test_pass_agrees_with_brute_force(tiny_model, collected):
    coder, results = collected
    firings, rows, seen = brute_force(tiny_model, coder)
    assert results.n_tokens == seen
    counts = torch.bincount(torch.tensor([f for f, *_ in firings]), minlength=96)
    assert torch.equal(results.tensors["fires_n"], counts)
    assert int(results.tensors["hist_nb"].sum()) == len(firings)
    for feature in counts.nonzero().squeeze(1).tolist()[:10]:
        mine = sorted((v for f, v, *_ in firings if f == feature), reverse=True)
        tops = results.top_contexts(feature)
        assert [c.value for c in tops] == pytest.approx(mine[: CFG.top_k], rel=1e-5)
        # The window is the real text around the firing, with the feature's activation on each token.
        best = next(x for x in firings if x[0] == feature and x[1] == pytest.approx(tops[0].value, rel=1e-6))
        _, value, row, pos = best
        start = max(0, pos - CFG.left)
        assert tops[0].token_ids == rows[row][start : pos + CFG.right + 1]
        assert tops[0].acts[tops[0].center] == pytest.approx(value, rel=1e-6)
        here = {p: v for f, v, r, p in firings if f == feature and r == row}
        assert tops[0].acts == pytest.approx([here.get(p, 0.0) for p in range(start, start + len(tops[0].acts))], rel=1e-5)
        # The sample is drawn from this feature's firings, as many as it holds up to its size.
        sampled = [c.value for _, cs in results.quantile_contexts(feature, per_quantile=100) for c in cs]
        assert len(sampled) == min(CFG.samples, len(mine))
        assert all(any(v == pytest.approx(m, rel=1e-6) for m in mine) for v in sampled)


def test_results_reload_without_the_model(tmp_path, collected, tiny_model):
    coder, results = collected
    results.save(tmp_path)
    loaded = load_features(tmp_path)
    assert loaded.n_tokens == results.n_tokens and loaded.vocab == results.vocab
    assert all(torch.equal(loaded.tensors[k], v) for k, v in results.tensors.items())
    f = int(results.density_n.argmax())
    assert loaded.top_contexts(f) == results.top_contexts(f)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no feature results"):
        load_features(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_features(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="out of range: the coder has 96 latents"):
        loaded.top_contexts(96)


def test_logit_lens_reads_the_direction_through_the_final_norm(tiny_model, collected):
    coder, results = collected
    direction = coder.W_dec[7].detach() / coder.out_scale
    logits = tiny_model.unembed(tiny_model.ln_final(direction[None, None]))[0, 0]
    top, bottom = results.logit_lens(7)
    assert top[0][0] == results.vocab[int(logits.argmax())]
    assert bottom[0][0] == results.vocab[int(logits.argmin())]
    # Ranks match the model's own norm + unembedding, up to the unembedding bias it shares with every input.
    ids = results.tensors["lens_top_ids_nt"][7]
    assert torch.equal(ids, (logits - tiny_model.unembed.b_U if hasattr(tiny_model.unembed, "b_U") else logits).topk(len(ids)).indices)


def test_search_and_text_features(tiny_model, collected):
    coder, results = collected
    f = int(results.density_n.argmax())
    centre = results.top_contexts(f)[0]
    token = results.vocab[centre.token_ids[centre.center]]
    assert f in [m.feature for m in search_features(results, token, limit=200)]
    with pytest.raises(ValueError, match="empty"):
        search_features(results, "")
    per_token = features_on_text(tiny_model, coder, "Hello there", top=3)
    assert len(per_token) == len("Hello there") and all(len(t.features) <= 3 for t in per_token)
    tokens, acts = feature_activations(tiny_model, coder, "Hello there", per_token[0].features[0][0])
    assert acts[0] == pytest.approx(per_token[0].features[0][1])
    neighbours = decoder_neighbours(coder, f, 5)
    assert len(neighbours) == 5 and f not in [n for n, _ in neighbours]
    assert neighbours[0][1] >= neighbours[-1][1]


def test_plots(tiny_model, collected):
    coder, results = collected
    f = int(results.density_n.argmax())
    assert len(density_histogram(results).data[0].x) == int((results.density_n > 0).sum())
    assert sum(activation_histogram(results, f).data[0].y) == int(results.tensors["fires_n"][f])
    heat = text_heatmap(["a", "b", "c"], [0.0, 1.0, 2.0], per_row=2)
    assert [list(row) for row in heat.data[0].z] == [[0.0, 1.0], [2.0, None]]
    assert len(neighbours_figure(coder, f, 4).data[0].x) == 4
    with pytest.raises(ValueError, match="3 tokens but 2"):
        text_heatmap(["a", "b", "c"], [0.0, 1.0])


def test_dashboard_is_one_offline_file(tmp_path, collected):
    _, results = collected
    page = write_dashboard(results, tmp_path / "dash.html").read_text()
    assert page.count(get_plotlyjs()) == 1
    assert not re.search(r"<script[^>]*\ssrc=|<link[^>]*href=", page)  # nothing fetched at view time
    live = int((results.density_n > 0).sum())
    assert page.count('"quantiles"') == live  # one entry per feature that fired
    # A subset for sharing: only the features named (those of them that fired), by range or density.
    densest = results.density_n.argsort(descending=True)[:5].tolist()
    for spec, chosen in (("0-9,20", [*range(10), 20]), ("top5", densest)):
        data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', write_dashboard(
            results, tmp_path / "part.html", parse_features(spec, results)).read_text()).group(1))["runs"][0]
        expected = sorted(f for f in chosen if results.density_n[f] > 0)
        assert data["ids"] == expected and sorted(map(int, data["features"])) == expected
    for spec, message in (("5-200", "outside the coder's latents 0 to 95"), ("top0", "positive N"), ("a-b", "ids and ranges")):
        with pytest.raises(ValueError, match=message):
            parse_features(spec, results)


def test_transcoder_features(tiny_model):
    coder = tiny_coder("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
    cfg = FeatureConfig(tokens=500, top_k=3, samples=4, data=DataConfig(context_size=32, model_batch=4))
    results = collect_features(tiny_model, coder, cfg, progress=False)
    assert results.n_tokens >= 500 and results.has_logit_lens


def test_bad_hook(tiny_model):
    coder = tiny_coder("blocks.7.hook_resid_post")
    with pytest.raises(ValueError, match="unknown hook 'blocks.7.hook_resid_post'"):
        collect_features(tiny_model, coder, CFG, progress=False)


def interp(*args):
    # In-process: a subprocess per call would pay for importing torch and the model again.
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_features_and_steer(tmp_path):
    run = tiny_coder().save(tmp_path / "run")
    made = interp("features", run, "--tokens", "600", "--context-size", "32", "--model-batch", "4", "--search", "e")
    assert made.exit_code == 0, made.output
    assert (run / "dashboard.html").exists() and (run / "features" / "features.safetensors").exists()
    assert "features matching 'e'" in made.stdout
    again = interp("features", run)
    assert again.exit_code == 0 and "using the feature results" in again.stdout
    steered = interp("steer", run, "--feature", "3", "--feature", "5", "--strength", "80", "--prompt", "Hi",
                     "--max-new-tokens", "4", "--samples", "2")
    assert steered.exit_code == 0, steered.output
    assert "baseline (seed 1)" in steered.stdout and "steered (seed 1)" in steered.stdout
    for args, message in [
        (("steer", run, "--feature", "96", "--ablate", "--prompt", "Hi"), "feature 96 is out of range"),
        (("steer", run, "--feature", "1", "--strength", "nan", "--prompt", "Hi"), "strength must be a finite number"),
        (("steer", run, "--feature", "1", "--prompt", "Hi"), "give exactly one of --strength"),
        (("features", tmp_path), "not a saved sparse coder"),
    ]:
        bad = interp(*args)
        assert bad.exit_code == 2 and message in bad.stderr, bad.output


KILLED_PASS = """
import sys
from interp.data import DataConfig
from interp.features import FeatureConfig, collect_features
from interp.models import TINY_MODEL, load_model
from interp.sae import load_sae
cfg = FeatureConfig(tokens=int(sys.argv[3]), top_k=5, samples=8, checkpoint_every=600, data=DataConfig(context_size=32, model_batch=4))
collect_features(load_model(TINY_MODEL), load_sae(sys.argv[1]), cfg, progress=False, checkpoint=sys.argv[2])
"""


def test_killed_pass_resumes_where_it_stopped(tmp_path, tiny_model, monkeypatch):
    import subprocess
    import sys
    import time

    coder = tiny_coder()
    run = coder.save(tmp_path / "run")
    checkpoint, tokens = tmp_path / "partial.safetensors", 30_000
    process = subprocess.Popen([sys.executable, "-c", KILLED_PASS, str(run), str(checkpoint), str(tokens)])
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()
    assert checkpoint.exists(), "the pass ended or failed before its first checkpoint"
    cfg = FeatureConfig(tokens=tokens, top_k=5, samples=8, checkpoint_every=600, data=DataConfig(context_size=32, model_batch=4))
    calls = []
    counted = features.capture
    monkeypatch.setattr(features, "capture", lambda *a, **k: calls.append(1) or counted(*a, **k))
    resumed = collect_features(tiny_model, coder, cfg, progress=False, checkpoint=checkpoint)
    resumed_batches = len(calls)
    monkeypatch.setattr(features, "capture", counted)
    whole = collect_features(tiny_model, coder, cfg, progress=False)
    # It went on from the checkpoint (fewer batches than the whole pass) to the same results.
    assert resumed_batches < whole.n_tokens / cfg.data.tokens_per_batch - 1
    assert resumed.n_tokens == whole.n_tokens
    assert all(torch.equal(resumed.tensors[k], v) for k, v in whole.tensors.items())
    assert not checkpoint.exists()
    # A checkpoint of other settings is not resumed from.
    features.write_tensors(checkpoint, features.FeaturePass(96, cfg).state(), metadata={"identity": "another pass"})
    assert torch.equal(collect_features(tiny_model, coder, cfg, progress=False, checkpoint=checkpoint).tensors["fires_n"],
                       whole.tensors["fires_n"])


def test_bfloat16_selection_chooses_what_float32_does(tiny_model):
    """TopK's selection from bfloat16 pre-activations is certified exact (tokens without the margin
    are chosen again in float32); every family's activations are exact."""
    torch.manual_seed(0)
    x = torch.randn(512, 64) * 3
    for arch in ("topk", "batchtopk", "gradient"):
        coder = create_coder(arch, d_in=64, n_latents=4096, k=8, hook="blocks.1.hook_resid_post").eval()
        with torch.no_grad():
            exact, fast = coder.encode(x), coder.encode(x, select_dtype=torch.bfloat16)
        keep = fast.indices_bk >= 0
        dense = torch.relu(coder.encoder_input(coder.normalized_input(x)) @ coder.W_enc.t() + coder.b_enc)
        # Whatever is chosen carries its exact activation.
        torch.testing.assert_close(fast.values_bk[keep], dense.gather(1, fast.indices_bk.clamp_min(0))[keep], rtol=1e-5, atol=1e-5)
        if arch != "batchtopk":  # thresholds choose from the rounded values (documented)
            assert torch.equal(exact.indices_bk.sort(1).values, fast.indices_bk.sort(1).values)
    # With the margin forced away every token is chosen again in float32: still the same choice.
    coder = create_coder("topk", d_in=64, n_latents=4096, k=8, hook="blocks.1.hook_resid_post").eval()
    with torch.no_grad():
        coder.b_enc.fill_(1e6)
        coder.b_enc[:100] += torch.arange(100.0)  # ties far below bf16 resolution at 1e6
        exact, fast = coder.encode(x), coder.encode(x, select_dtype=torch.bfloat16)
    assert torch.equal(exact.indices_bk.sort(1).values, fast.indices_bk.sort(1).values)


def test_auto_selection_takes_the_faster_product(monkeypatch):
    """`auto` picks whichever dtype's timed product took less time: a fake clock charges each
    product 1 unit, or 10 in the dtype made slow, so the choice is known whatever this CPU is.
    Named precisions and CUDA need no timing; bad names are refused."""
    for slow, faster in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        clock, made = [0.0], []

        def mm(x, w, out, slow=slow, clock=clock, made=made):
            clock[0] += 10.0 if x.dtype == slow else 1.0
            made.append(x.dtype)
            return out

        monkeypatch.setattr(features.time, "perf_counter", lambda clock=clock: clock[0])
        monkeypatch.setattr(features.torch, "mm", mm)
        features._faster_cpu_dtype.cache_clear()
        assert features.selection_dtype("auto", torch.device("cpu")) == faster
        assert set(made) == {torch.float32, torch.bfloat16}
    features._faster_cpu_dtype.cache_clear()
    assert features.selection_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert features.selection_dtype("float32", torch.device("cuda")) == torch.float32
    with pytest.raises(BadInput, match="'auto', 'bfloat16' or 'float32', not 'half'"):
        FeatureConfig(selection="half")


def test_cli_dashboard_subset(tmp_path):
    run = tiny_coder().save(tmp_path / "run")
    made = interp("features", run, "--tokens", "600", "--context-size", "32", "--model-batch", "4",
                  "--out", tmp_path / "share.html", "--features", "top10")
    assert made.exit_code == 0 and "(10 features chosen)" in made.stdout, made.output
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', (tmp_path / "share.html").read_text()).group(1))
    assert len(data["runs"][0]["features"]) == 10 and not (run / "dashboard.html").exists()
    bad = interp("features", run, "--features", "90-100")
    assert bad.exit_code == 2 and "outside the coder's latents 0 to 95" in bad.stderr, bad.output
