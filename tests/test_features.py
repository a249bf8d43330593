"""The feature pass against a brute-force recount, reloading without the model, logit lens,
search, plots, the dashboard file, and the `features` / `steer` commands."""

import re

import pytest
import torch
from interp.cli.main import app
from plotly.offline import get_plotlyjs
from typer.testing import CliRunner

from interp.dashboard import write_dashboard
from interp.data import DataConfig, iter_texts, iter_token_batches
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

CFG = FeatureConfig(tokens=2000, top_k=5, samples=8, left=4, right=2, data=DataConfig(context_size=32, model_batch=4))


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
    with pytest.raises(FileNotFoundError, match="holds no feature results"):
        load_features(tmp_path / "elsewhere")
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
    assert page.count('"top_tokens"') == live


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
