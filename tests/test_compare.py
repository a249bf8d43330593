import json
import math

import pytest
from safetensors.torch import load_file

from interp import compare as compare_module
from interp.compare import COLUMNS, CompareConfig, compare
from interp.data import DataConfig
from interp.run import CacheConfig, RunConfig, cache_run
from interp.sae import load_sae
from interp.steering_effect import SteeringEffectConfig
from interp.train import TrainConfig


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    cfg = CacheConfig(model="tiny-llama", hooks=["blocks.0.hook_resid_post"], tokens=1024,
                      data=DataConfig(context_size=32, model_batch=4), shard_tokens=512, with_grads=True)
    cache_run(cfg, folder, progress=False)
    return folder


def test_compare_writes_table_json_and_figure(store, tmp_path, monkeypatch):
    base = RunConfig(hooks=[], expansion=2, activations=str(store), buffer_tokens=512, eval_tokens=200, splice_tokens=60,
                     train=TrainConfig(tokens=512, batch_size=128, eval_every=0))
    cfg = CompareConfig(base, archs=["topk", "feature_choice", "gradient"], ks=[4], seeds=[0, 1],
                        steering=SteeringEffectConfig(steer_features=3, steer_tokens=64))
    result = compare(cfg, tmp_path, progress=False)
    assert len(result["runs"]) == 6 and len(result["table"]) == 3
    # Read from the store, into the comparison's own copy: the caller's settings are left as they were.
    used = result["settings"]["base"]
    assert used["model"] == "tiny-llama" and used["hooks"] == ["blocks.0.hook_resid_post"]
    assert base.hooks == [] and base.model == "smollm2-135m"
    for row in result["table"]:
        assert set(COLUMNS) <= set(row) and row["train_tokens_per_s"] > 0
        assert row["kl_per_norm"] > 0 and math.isfinite(row["lens_rise"])
        # Only batch-level coders have an allocation to be scored under.
        assert math.isnan(row["fvu_allocation"]) == (row["arch"] != "feature_choice")
    table = (tmp_path / "compare.md").read_text()
    assert "| 4 | gradient |" in table and "loss recovered" in table and "Ranking identical across seeds" in table
    assert "steer KL / norm" in table and "| - |" in table
    assert json.loads((tmp_path / "compare.json").read_text())["settings"]["ks"] == [4]
    html = (tmp_path / "compare.html").read_text()
    assert "Plotly.newPlot" in html and "<script src=\"http" not in html  # plotly.js inlined: self-contained
    # A second call reads finished runs back instead of training them again.
    monkeypatch.setattr(compare_module, "train_run", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert compare(cfg, tmp_path, progress=False)["runs"] == result["runs"]
    # A run evaluated before the extra measures existed gets them, from its saved coder alone.
    (tmp_path / "runs" / "topk-k4-s1" / "extra.json").unlink()
    monkeypatch.setattr(compare_module, "evaluate_together", lambda *a, **k: pytest.fail("re-evaluated a finished run"))
    assert compare(cfg, tmp_path, progress=False)["runs"] == result["runs"]


def test_compare_needs_a_store(tmp_path):
    with pytest.raises(ValueError, match="--activations"):
        compare(CompareConfig(RunConfig()), tmp_path)


def test_compare_gives_each_architecture_its_own_options_and_one_norm_bound(store, tmp_path):
    base = RunConfig(hooks=[], expansion=2, activations=str(store), buffer_tokens=512, eval_tokens=200, splice_tokens=60,
                     coder_options={"beta": 3.0}, train=TrainConfig(tokens=256, batch_size=128, eval_every=0, max_norm_ratio=1.05))
    compare(CompareConfig(base, archs=["topk", "gradient"], ks=[4], seeds=[0]), tmp_path, progress=False)
    topk, gradient = (load_sae(tmp_path / "runs" / f"{arch}-k4-s0") for arch in ("topk", "gradient"))
    assert gradient.cfg.beta == 3.0 and not hasattr(topk.cfg, "beta")
    first_shard = load_file(store / "shard_00000.safetensors")["blocks.0.hook_resid_post"]
    bound = 1.05 * first_shard.norm(dim=1).median().item()
    assert topk.max_input_norm == gradient.max_input_norm == pytest.approx(bound)
    assert 0 < json.loads((tmp_path / "runs" / "topk-k4-s0" / "eval.json").read_text())["outlier_frac"] < 0.6


def test_compare_rejects_an_option_no_architecture_has(store, tmp_path):
    base = RunConfig(activations=str(store), coder_options={"zipf_exponent": 0.5})
    with pytest.raises(ValueError, match="none of the compared architectures"):
        compare(CompareConfig(base, archs=["topk", "gradient"]), tmp_path)
