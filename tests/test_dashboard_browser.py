"""The dashboard in a real headless browser (Debian's chromium): the page script runs without
errors and a feature's page shows the contexts it fired on."""

import html
import os
import re
import shutil
import subprocess

import pytest
import torch

from interp.dashboard import write_dashboard
from interp.data import DataConfig
from interp.features import FeatureConfig, collect_features
from interp.sae import create_coder

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
# CI installs chromium (.ci/run), so there a missing browser is a failure, not a skip.
SKIP_WITHOUT_BROWSER = CHROMIUM is None and not os.environ.get("CI")


def dump_dom(url, profile):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000", "--dump-dom"]
    result = subprocess.run([CHROMIUM, *flags, url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(SKIP_WITHOUT_BROWSER, reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_dashboard_renders_in_chromium(tmp_path, tiny_model):
    torch.manual_seed(0)
    coder = create_coder("topk", d_in=64, n_latents=64, k=4, hook="blocks.1.hook_resid_post", model="tiny-llama").eval()
    cfg = FeatureConfig(tokens=1000, top_k=5, samples=8, data=DataConfig(context_size=32, model_batch=4))
    results = collect_features(tiny_model, coder, cfg, progress=False)
    page = write_dashboard(results, tmp_path / "dashboard.html")
    feature = int(results.density_n.argmax())
    best = results.top_contexts(feature)[0]

    index = dump_dom(page.as_uri(), tmp_path / "profile")
    assert 'data-rendered="index"' in index and "data-error" not in index
    assert f'href="#r0/f{feature}"' in index

    dom = dump_dom(f"{page.as_uri()}#f{feature}", tmp_path / "profile")
    assert f'data-rendered="feature-{feature}"' in dom and "data-error" not in dom
    assert f"Feature {feature}" in dom and "Top activations" in dom
    # The best context: its value, then each token in its own highlighted span, the firing one outlined.
    center = html.escape(results.vocab[best.token_ids[best.center]].replace("\n", "\u21b5"), quote=False)
    assert f">{best.value:.2f}</span>" in dom
    span = rf'<span (?=[^>]*title="{best.value:.3f}")(?=[^>]*class="center")(?=[^>]*background)[^>]*>{re.escape(center)}</span>'
    assert re.search(span, dom), re.findall(r"<span[^>]*center[^>]*>[^<]*</span>", dom)[:3]
    assert 'class="main-svg"' in dom  # the plotly histogram was drawn
