"""Several coders from one pass over the activations: each must end exactly as it would trained
alone on the same data (same seed, same batches), a run killed between two coders' steps must
resume to the same final state as one never interrupted, and the run's settings must be checked.
The reference for "alone" is a plain one-coder run of interp's, which the rest of the suite
checks against its own references."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_cli import in_process

from interp.data import DataConfig
from interp.errors import BadInput
from interp.run import (
    GROUP_FILE,
    CacheConfig,
    RunConfig,
    cache_run,
    coder_runs,
    group_folders,
    parse_layers,
    train_runs,
)
from interp.sae import load_sae
from interp.train import TrainConfig, Trainer

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out",
         "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    cache_run(CacheConfig(model="tiny-llama", hooks=HOOKS, tokens=2000, data=DataConfig(context_size=16, model_batch=4), shard_tokens=240),
              out, progress=False)
    return out


def config(store, **kw) -> RunConfig:
    return RunConfig(model="tiny-llama", coder_options={"k": 4}, expansion=2, activations=str(store), buffer_tokens=512,
                     train=TrainConfig(tokens=1536, batch_size=64, eval_every=0, checkpoint_every=5, log_every=1), **kw)


def states_equal(a, b):
    return set(a.state_dict()) == set(b.state_dict()) and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("how", [{"hooks": HOOKS[:2]},
                                 {"hooks": ["blocks.{L}.ln2.hook_normalized"], "layers": "0-1", "transcode": True}])
def test_coders_trained_together_equal_each_trained_alone(store, tmp_path, how):
    together = train_runs(config(store, **how), tmp_path / "together", progress=False, evaluate=False)
    assert len(together) == 2 and group_folders(tmp_path / "together") == [folder for *_, folder in together]
    for coder, result, _, folder in together:
        alone_cfg = config(store, hooks=[coder.cfg.hook], target_hook=coder.cfg.target_hook)
        alone, alone_result, _, _ = train_runs(alone_cfg, tmp_path / f"alone-{folder.name}", progress=False, evaluate=False)[0]
        assert result.steps == alone_result.steps == 24
        assert states_equal(coder, alone), coder.cfg.hook
        log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == list(range(1, 25))


def test_a_run_killed_between_two_coders_resumes_to_the_same_final_state(store, tmp_path, monkeypatch):
    cfg = config(store, hooks=HOOKS[:2])
    reference = train_runs(cfg, tmp_path / "full", progress=False, evaluate=False)
    original = Trainer.train_step

    def dies(self, batch):
        # the second coder dies at step 13: the first has taken it, the checkpoint is from step 10
        if self.coder.cfg.hook == HOOKS[1] and self.step == 13:
            raise KeyboardInterrupt("killed")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        train_runs(cfg, tmp_path / "killed", progress=False, evaluate=False)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = train_runs(cfg, tmp_path / "killed", resume=True, progress=False, evaluate=False)
    for (coder, *_), (again, result, _, folder) in zip(reference, resumed):
        assert result.steps == 24 and states_equal(coder, again)
        full = (tmp_path / "full" / folder.name / "metrics.jsonl").read_text().splitlines()
        strip = lambda lines: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]
        assert strip(full) == strip((folder / "metrics.jsonl").read_text().splitlines())


def test_the_run_settings_are_checked(store):
    assert parse_layers("0-2,5, 7-8") == [0, 1, 2, 5, 7, 8]
    for bad in ["3-1", "a", "1,1", ""]:
        with pytest.raises(BadInput, match="--layers"):
            parse_layers(bad)
    with pytest.raises(BadInput, match="give --layers"):
        coder_runs(config(store, hooks=["blocks.{L}.hook_resid_post"]))
    with pytest.raises(BadInput, match="template"):
        coder_runs(config(store, hooks=["blocks.0.hook_resid_post"], layers="0-1"))
    with pytest.raises(BadInput, match="cannot all reconstruct"):
        coder_runs(config(store, hooks=HOOKS[2:5:2], target_hook="blocks.1.hook_mlp_out"))
    runs = coder_runs(config(store, hooks=HOOKS[2:5:2], target_hook="blocks.{L}.hook_mlp_out"))
    assert [(r.hook, r.target_hook) for r in runs] == [(HOOKS[2], HOOKS[3]), (HOOKS[4], HOOKS[5])]
    with pytest.raises(BadInput, match="several coders"):
        _ = config(store, hooks=HOOKS[:2]).hook


def test_cli_trains_several_coders_and_evaluates_them_together(store, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--activations", store, "--model", "tiny-llama", "--hook", "blocks.{L}.hook_resid_post", "--layers", "0-1",
            "--k", "4", "--expansion", "2", "--tokens", "512", "--batch-size", "64", "--buffer-tokens", "512",
            "--eval-tokens", "200", "--splice-tokens", "60", "--out", out]
    result = in_process(*args)
    assert result.exit_code == 0, result.output
    assert result.output.count("saved topk coder") == 2
    assert json.loads((out / GROUP_FILE).read_text())["coders"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    evaluated = in_process("eval", out, "--together")
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.output.count("evaluation of") == 2 and "all 2 coders spliced in at once" in evaluated.output
    assert in_process("eval", out / "blocks.0.hook_resid_post", "--together").exit_code == 2


def test_hooks_sharded_across_two_torchrun_processes_equal_each_trained_alone(store, tmp_path):
    out = tmp_path / "sharded"
    args = ["--activations", str(store), "--model", "tiny-llama", "--hook", "blocks.{L}.hook_resid_post", "--layers", "0-1",
            "--k", "4", "--expansion", "2", "--tokens", "1536", "--batch-size", "64", "--buffer-tokens", "512",
            "--checkpoint-every", "5", "--eval-every", "0", "--eval-tokens", "200", "--splice-tokens", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                           "-m", "interp", "train", *args, "--distribute-hooks", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, check=False, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert sorted(p.name for p in out.glob("checkpoint.rank*")) == ["checkpoint.rank0-of-2.safetensors", "checkpoint.rank1-of-2.safetensors"]
    folders = group_folders(out)
    assert [f.name for f in folders] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for folder in folders:
        alone, *_ = train_runs(config(store, hooks=[folder.name]), tmp_path / f"alone-{folder.name}", progress=False, evaluate=False)[0]
        assert states_equal(load_sae(folder), alone), folder.name



def test_cache_fills_hook_templates_at_layers(tmp_path):
    cfg = CacheConfig(model="tiny-llama", hooks=["blocks.{L}.ln2.hook_normalized", "blocks.{L}.hook_mlp_out"], layers="0-1", tokens=200,
                      data=DataConfig(context_size=16, model_batch=4))
    assert cfg.cached_hooks() == ["blocks.0.ln2.hook_normalized", "blocks.1.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"]
    manifest = cache_run(cfg, tmp_path / "store", progress=False)
    assert manifest.hooks == cfg.cached_hooks()
    for hooks, layers in ((["blocks.{L}.hook_mlp_out"], None), (["blocks.0.hook_mlp_out"], "0-1"), (["blocks.{L}.hook_mlp_out", "hook_embed"], "0")):
        with pytest.raises(BadInput, match="--layers"):
            CacheConfig(hooks=hooks, layers=layers)
