import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from interp.activation_store import MANIFEST, StoreChunks, read_manifest
from interp.data import DataConfig
from interp.run import CacheConfig, RunConfig, cache_run, train_run
from interp.train import TrainConfig

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def cache(out, tokens=600, **kw):
    cfg = CacheConfig(model="tiny-llama", hooks=HOOKS, tokens=tokens, data=DataConfig(context_size=16, model_batch=4), shard_tokens=120, **kw)
    return cache_run(cfg, out, progress=False)


def test_cache_writes_shards_and_manifest(tmp_path):
    manifest = cache(tmp_path / "store")
    assert manifest.complete and manifest.tokens >= 600
    assert manifest.widths == {h: 64 for h in HOOKS}
    on_disk = json.loads((tmp_path / "store" / MANIFEST).read_text())
    assert on_disk["model"] == "tiny-llama" and on_disk["hooks"] == HOOKS and on_disk["context_size"] == 16
    shard = load_file(tmp_path / "store" / manifest.shards[0]["file"])
    assert shard[HOOKS[0]].shape == (manifest.shards[0]["tokens"], 64)


def test_interrupted_cache_resumes_to_the_same_store(tmp_path):
    full = cache(tmp_path / "full")
    partial = cache(tmp_path / "part", tokens=600)
    # Simulate a run killed after two shards: the manifest lists only finished shards.
    data = json.loads((tmp_path / "part" / MANIFEST).read_text())
    for shard in data["shards"][2:]:
        (tmp_path / "part" / shard["file"]).unlink()
    data["shards"] = data["shards"][:2]
    (tmp_path / "part" / MANIFEST).write_text(json.dumps(data))
    resumed = cache(tmp_path / "part")
    assert resumed.shards == full.shards == partial.shards
    for shard in full.shards:
        a, b = load_file(tmp_path / "full" / shard["file"]), load_file(tmp_path / "part" / shard["file"])
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_store_with_other_settings_is_not_overwritten(tmp_path):
    cache(tmp_path / "store")
    with pytest.raises(ValueError, match="other settings"):
        cache_run(CacheConfig(model="tiny-llama", hooks=HOOKS[:1], tokens=600, data=DataConfig(context_size=16, model_batch=4)), tmp_path / "store", progress=False)


def test_unfinished_or_missing_hook_store_is_refused(tmp_path):
    cache(tmp_path / "store")
    with pytest.raises(ValueError, match="does not hold"):
        StoreChunks(tmp_path / "store", ["blocks.0.hook_resid_pre"])
    data = json.loads((tmp_path / "store" / MANIFEST).read_text())
    data["target_tokens"] = 10**9
    (tmp_path / "store" / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unfinished"):
        StoreChunks(tmp_path / "store", HOOKS)


def test_training_from_the_store_reads_no_model_activations(tmp_path, monkeypatch):
    cache(tmp_path / "store", tokens=1200)
    import interp.activations as activations

    def no_model(*args, **kwargs):
        raise AssertionError("training from a store must not run the model for training batches")

    cfg = RunConfig(model="tiny-llama", hooks=HOOKS[:1], coder_options={"k": 4}, expansion=2, activations=str(tmp_path / "store"),
                    eval_tokens=200, splice_tokens=100, buffer_tokens=256,
                    train=TrainConfig(tokens=1024, batch_size=64, eval_every=0))
    monkeypatch.setattr(activations.ModelChunks, "chunks", no_model)
    coder, result, metrics = train_run(cfg, tmp_path / "run", progress=False)
    assert result.steps == 16 and 0 < metrics["fvu"] < 1.5
    assert read_manifest(tmp_path / "store").dataset == "builtin"


def test_a_run_from_a_store_without_evaluation_loads_no_model(tmp_path, monkeypatch):
    cache(tmp_path / "store", tokens=1200)
    from interp.models import ModelConfig

    def refuse(self):
        raise AssertionError("this run needs no model")

    cfg = RunConfig(model="tiny-llama", hooks=HOOKS[:1], coder_options={"k": 4}, expansion=2, activations=str(tmp_path / "store"),
                    buffer_tokens=256, train=TrainConfig(tokens=512, batch_size=64, eval_every=0))
    given = copy.deepcopy(cfg)
    monkeypatch.setattr(ModelConfig, "load", refuse)
    coder, result, metrics = train_run(cfg, tmp_path / "run", progress=False, evaluate=False)
    assert result.steps == 8 and set(metrics) == {"train_tokens_per_s"}
    assert cfg == given, "the caller's settings must not be rewritten"
    assert coder.meta["run"]["data"]["context_size"] == 16  # the store's text, recorded for evaluation
