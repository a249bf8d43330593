"""`interp serve`: the routes answer what the feature results and the model say, nothing outside
the routes is ever served, bad requests do not stop the server, and the page works in Debian's
headless Chromium against the running server (index of a 32,768-latent coder, a feature page,
the prompt box, the steering box)."""

import http.client
import json
import re
import threading
import time
import urllib.parse

import pytest
import torch
from test_dashboard_browser import SKIP_WITHOUT_BROWSER, dump_dom

from interp.data import DataConfig
from interp.features import (
    FeatureConfig,
    FeaturePass,
    FeatureResults,
    coder_info,
    collect_features,
    features_on_text,
    logit_lens,
    token_strings,
)
from interp.sae import create_coder
from interp.sae.base import SparseCode
from interp.serve import Dashboard, make_server
from interp.steering import GenerateConfig, add_feature, compare_generations

WIDE = 32768


def wide_results(model, coder, cfg, batches=40):
    """Feature results of a 32,768-latent coder in which nearly every latent fired: the pass's own
    bookkeeping (`FeaturePass`) fed the tiny model's text with random codes, so the index has the
    size a trained coder's would."""
    state = FeaturePass(coder.cfg.n_latents, cfg)
    generator = torch.Generator().manual_seed(0)
    for _, batch in zip(range(batches), cfg.data.batches(model.tokenizer, "train")):
        tokens = int(batch.mask_bt.sum())
        indices = torch.randint(0, coder.cfg.n_latents, (tokens, 16), generator=generator)
        state.feed(batch.tokens_bt, batch.mask_bt, SparseCode(indices, torch.rand(tokens, 16, generator=generator) * 4))
    tensors = state.tensors() | logit_lens(model, coder, cfg.logit_tokens)
    return FeatureResults(cfg, coder_info(coder), state.tokens, token_strings(model), tensors)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """A running server of two coders on the tiny model: a 32,768-latent SAE and a transcoder."""
    base = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    cfg = FeatureConfig(tokens=2_000, top_k=5, samples=8, data=DataConfig(context_size=32, model_batch=16))
    wide = create_coder("topk", d_in=64, n_latents=WIDE, k=8, hook="blocks.1.hook_resid_post", model="tiny-llama").eval()
    transcoder = create_coder("topk", d_in=64, n_latents=128, k=4, hook="blocks.0.ln2.hook_normalized",
                              target_hook="blocks.0.hook_mlp_out", model="tiny-llama").eval()
    results = [wide_results(tiny_model, wide, cfg), collect_features(tiny_model, transcoder, cfg, progress=False)]
    runs = [wide.save(base / "wide"), transcoder.save(base / "transcoder")]
    for result, run in zip(results, runs):
        result.save(run)
    dashboard = Dashboard.open(runs)
    dashboard.models["tiny-llama"] = tiny_model  # the model the results were collected with
    server = make_server(dashboard, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, dashboard, results, runs
    server.shutdown()
    server.server_close()


def request(server, path, body=None, raw_body=None):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=120)
    payload = raw_body if raw_body is not None else (None if body is None else json.dumps(body).encode())
    # The path goes out exactly as written (no client-side normalisation of '..').
    conn.putrequest("POST" if payload is not None else "GET", path, skip_accept_encoding=True)
    if payload is not None:
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(payload)))
    conn.endheaders()
    if payload is not None:
        conn.send(payload)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def test_index_and_feature_data(served):
    server, _, results, _ = served
    status, data = request(server, "/api/runs")
    assert status == 200 and [r["n_latents"] for r in json.loads(data)] == [WIDE, 128]
    wide = results[0]
    status, data = request(server, "/api/runs/0/index")
    index = json.loads(data)
    fired = (wide.density_n > 0).nonzero().squeeze(1).tolist()
    assert status == 200 and index["ids"] == fired and len(fired) > 0.9 * WIDE
    assert index["density"] == pytest.approx(wide.density_n[fired].tolist(), rel=1e-3)
    feature = int(wide.density_n.argmax())
    status, data = request(server, f"/api/runs/0/features/{feature}")
    page = json.loads(data)
    # The rows read from disk on demand are the pass's own contexts.
    assert status == 200 and [c[3] for c in page["top"]] == pytest.approx([c.value for c in wide.top_contexts(feature, 10)], abs=1e-3)
    best = wide.top_contexts(feature)[0]
    assert page["top"][0][0] == best.token_ids and page["top"][0][2] == best.center
    never = int((wide.density_n == 0).nonzero()[0]) if (wide.density_n == 0).any() else None
    if never is not None:
        assert request(server, f"/api/runs/0/features/{never}")[0] == 404


def test_nothing_outside_the_routes(served):
    server, _, _, runs = served
    secrets = [(runs[0] / "cfg.json").read_bytes()[:40], (runs[0] / "features" / "features.json").read_bytes()[:40]]
    for path in ["/../cfg.json", "/cfg.json", "/%2e%2e/cfg.json", "/features/features.json", "/api/runs/0/../../cfg.json",
                 "/api/runs/0/features/../../cfg.json", "/api/runs/0/features/abc", "/api/runs/0/features/-1",
                 f"/api/runs/0/features/{WIDE}", "/api/runs/9/index", "/api/runs/0/index/../../../etc/passwd",
                 "//etc/passwd", "/api/runs/0/features/1%2f..%2f..%2fcfg.json", "/plotly.js/../cfg.json", "/?x=../cfg.json"]:
        status, data = request(server, path)
        assert status == 404, path
        assert not any(secret in data for secret in secrets) and b"root:" not in data, path


def test_bad_requests_never_stop_the_server(served):
    server, _, _, _ = served
    for body, raw, message in [
        (None, b"not json", "not JSON"), (None, b"[1]", "JSON object"), ({"text": ""}, None, "non-empty string"),
        ({"text": 3}, None, "non-empty string"),
    ]:
        status, data = request(server, "/api/runs/0/prompt", body, raw)
        assert status == 400 and message in json.loads(data)["error"]
    status, data = request(server, "/api/runs/0/steer", {"feature": WIDE, "prompt": "Hi", "strength": 1.0})
    assert status == 400 and "out of range" in json.loads(data)["error"]
    status, data = request(server, "/api/runs/0/steer", {"feature": 1, "prompt": "Hi", "strength": "big"})
    assert status == 400 and "strength" in json.loads(data)["error"]
    assert request(server, "/api/runs/0/index", raw_body=b"{}")[0] == 404
    assert request(server, "/api/runs")[0] == 200  # still serving


def test_prompt_and_steer_answer_what_the_library_computes(served, tiny_model):
    server, dashboard, _, _ = served
    coder = dashboard.runs[0].coder
    text = "The cat sat on the mat."
    status, data = request(server, "/api/runs/0/prompt", {"text": text})
    expected = features_on_text(tiny_model, coder, text, top=5)
    tokens = json.loads(data)["tokens"]
    assert status == 200 and [t for t, _ in tokens] == [t.token for t in expected]
    assert [[f for f, _ in feats] for _, feats in tokens] == [[f for f, _ in t.features] for t in expected]
    status, data = request(server, "/api/runs/0/steer", {"feature": 7, "prompt": "Hello", "strength": 50.0, "max_new_tokens": 5})
    pair = compare_generations(tiny_model, "Hello", [add_feature(coder, 7, 50.0)], GenerateConfig(max_new_tokens=5, samples=2, positions="new"))
    assert status == 200 and json.loads(data) == {"baseline": pair.baseline, "steered": pair.steered}


def timed_dom(url, profile):
    start = time.perf_counter()
    dom = dump_dom(url, profile)
    return dom, time.perf_counter() - start


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_served_pages_in_chromium(served, tmp_path, tiny_model):
    server, _, results, _ = served
    base = "http://{}:{}/".format(*server.server_address)
    _, blank = timed_dom("about:blank", tmp_path / "profile")
    index, seconds = timed_dom(base + "#r0", tmp_path / "profile")
    assert 'data-rendered="index"' in index and "data-error" not in index, index[-3000:]
    # The index of the 32,768-latent coder within 2 s, beyond the browser's own start on a blank page.
    assert seconds - blank < 2.0, (seconds, blank)
    wide = results[0]
    densest = int(wide.density_n.argmax())
    assert f'href="#r0/f{densest}"' in index and "page 1 of" in index

    dom = dump_dom(f"{base}#r0/f{densest}", tmp_path / "profile")
    assert f'data-rendered="feature-{densest}"' in dom and "data-error" not in dom
    best = wide.top_contexts(densest)[0]
    assert f">{best.value:.2f}</span>" in dom and 'class="center"' in dom and 'class="main-svg"' in dom

    transcoder = int(results[1].density_n.argmax())
    dom = dump_dom(f"{base}#r1/f{transcoder}", tmp_path / "profile")
    assert f'data-rendered="feature-{transcoder}"' in dom and "data-error" not in dom
    assert "Reads (at blocks.0.ln2.hook_normalized)" in dom and "Writes (to blocks.0.hook_mlp_out)" in dom

    text = "The cat sat on the mat."
    dom = dump_dom(f"{base}#r0/prompt/{urllib.parse.quote(text)}", tmp_path / "profile")
    assert 'data-rendered="prompt"' in dom and "data-error" not in dom, dom[-3000:]
    result = re.search(r'<div id="prompt-result">(.*?)</div>', dom, re.DOTALL).group(1)
    expected = features_on_text(tiny_model, served[1].runs[0].coder, text, top=5)
    assert result.count("<tr>") == len(expected) + 1  # a header, then one row per token
    assert result.count('href="#r0/f') == sum(len(t.features) for t in expected)

    dom = dump_dom(f"{base}#r0/f{densest}/steer/40/{urllib.parse.quote('Hello')}", tmp_path / "profile")
    assert f'data-rendered="steer-{densest}"' in dom and "data-error" not in dom, dom[-3000:]
    assert dom.count('class="gen"') == 4  # two samples, baseline and steered side by side


def test_serve_command(served, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from interp.cli.main import app
    from typer.testing import CliRunner

    _, _, _, runs = served
    bare = create_coder("topk", d_in=64, n_latents=16, k=2, hook="blocks.1.hook_resid_post", model="tiny-llama").save(tmp_path / "bare")
    for args, message in ((["serve", str(bare)], "holds no feature results"), (["serve", str(tmp_path / "none")], "no such")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in result.stderr.lower(), result.output
    # The installed command: it says where it listens, and answers there.
    process = subprocess.Popen([str(Path(sys.executable).parent / "interp"), "serve", str(runs[1]), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        url = re.search(r"http://[\d.]+:\d+/", line).group(0)
        host, port = url[len("http://"):-1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("GET", "/api/runs")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())[0]["n_latents"] == 128
        assert host == "127.0.0.1"
    finally:
        process.terminate()
        process.wait(timeout=60)
