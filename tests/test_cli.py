"""The `interp` command through its installed entry point, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from interp.sae import load_sae

INTERP = str(Path(sys.executable).parent / "interp")
SMALL = ["--model", "tiny-llama", "--hook", "blocks.0.hook_resid_post", "--k", "4", "--expansion", "2",
         "--context-size", "32", "--model-batch", "4", "--tokens", "2048", "--batch-size", "128",
         "--buffer-tokens", "512", "--eval-tokens", "300", "--splice-tokens", "100"]


def interp(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([INTERP, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_train_then_eval(tmp_path):
    result = interp("train", *SMALL, "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert f"to {tmp_path / 'run'}" in result.stdout and "loss_recovered" in result.stdout
    assert "train:" in result.stderr  # the progress bar
    coder = load_sae(tmp_path / "run")
    assert coder.cfg.n_latents == 128 and coder.cfg.hook == "blocks.0.hook_resid_post"
    evaluated = interp("eval", str(tmp_path / "run"), "--eval-tokens", "300", "--splice-tokens", "100")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert {"fvu", "l0", "dead_frac", "dense_frac", "loss_clean", "loss_spliced", "loss_zero", "loss_recovered", "kl"} <= set(metrics)
    assert metrics["l0"] <= 4


def test_cache_then_train_from_it(tmp_path):
    cached = interp("cache", "--model", "tiny-llama", "--hook", "blocks.0.hook_resid_post", "--hook", "blocks.1.hook_resid_post",
                    "--context-size", "32", "--model-batch", "4", "--tokens", "2048", "--shard-tokens", "500",
                    "--out", str(tmp_path / "store"))
    assert cached.returncode == 0, cached.stderr
    assert "blocks.0.hook_resid_post, blocks.1.hook_resid_post" in cached.stdout
    trained = interp("train", *SMALL, "--activations", str(tmp_path / "store"), "--out", str(tmp_path / "run"))
    assert trained.returncode == 0, trained.stderr


def test_resume_finishes_a_run(tmp_path):
    args = [*SMALL, "--checkpoint-every", "4", "--out", str(tmp_path / "run")]
    assert interp("train", *args).returncode == 0
    again = interp("train", *args)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = interp("train", "--resume", "--out", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr


def test_info_lists_hooks_with_shapes():
    result = interp("info", "tiny-llama", "--json")
    assert result.returncode == 0, result.stderr
    shapes = json.loads(result.stdout)
    assert shapes["blocks.1.hook_resid_post"] == [64] and shapes["blocks.0.attn.hook_z"] == [4, 16]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hook", "blocks.0.hook_resid_pst"], "did you mean blocks.0.hook_resid_post"),
        (["--dataset", "/no/such/file.txt"], "does not exist"),
        (["--k", "1000"], "k must be between 1 and the number of latents"),
        (["--dtype", "float8"], "unknown dtype"),
        (["--arch", "nope"], "unknown architecture"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    result = interp("train", *SMALL, *args, "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = interp("train", *SMALL, "--dataset", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "no text" in result.stderr
