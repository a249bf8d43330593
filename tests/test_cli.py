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


def in_process(*args):
    from interp.cli.main import app
    from typer.testing import CliRunner

    return CliRunner().invoke(app, [str(a) for a in args])


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
    # In-process (the entry point itself is exercised above): each subprocess pays for imports.
    result = in_process("train", *SMALL, *args, "--out", str(tmp_path / "run"))
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = in_process("train", *SMALL, "--dataset", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "run"))
    assert result.exit_code == 2 and "no text" in result.stderr


def test_every_setting_is_an_option_declared_once(tmp_path):
    """Every field of the configs `interp train` builds is an option, with its docstring as help;
    the four the old hand-written CLI could not set reach the run."""
    import dataclasses

    from interp.cli.options import coder_options, config_options

    from interp.run import RunConfig

    options = config_options(RunConfig, exclude=["coder_options"]) + coder_options()
    leaves = {f.name for f in dataclasses.fields(RunConfig)} - {"data", "train", "coder_options"}
    from interp.data import DataConfig
    from interp.train import TrainConfig

    leaves |= {f.name for f in dataclasses.fields(DataConfig)} | {f.name for f in dataclasses.fields(TrainConfig)}
    assert leaves | {"k", "k_aux", "aux_coef", "beta", "threshold_rate", "density_rate", "underuse_factor", "aux_mask", "zipf_exponent", "capacity_order"} == {
        o.path[-1] for o in options
    }
    assert all(o.help for o in options)
    extra = ["--grad-clip", "0.5", "--decay-start", "0.5", "--b-dec-init", "mean", "--log-every", "2", "--aux-coef", "0.1"]
    result = in_process("train", *SMALL, *extra, "--eval-every", "0", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["train"]["grad_clip"] == 0.5 and saved["train"]["decay_start"] == 0.5
    assert saved["train"]["b_dec_init"] == "mean" and saved["train"]["log_every"] == 2
    assert saved["coder_options"] == {"k": 4, "aux_coef": 0.1}
    assert load_sae(tmp_path / "run").cfg.aux_coef == 0.1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tokens", "0"], "tokens must be a whole number >= 1"),
        (["--batch-size", "-4"], "batch size must be a whole number >= 1"),
        (["--model-batch", "0"], "model batch must be a whole number >= 1"),
        (["--context-size", "1"], "context_size must be at least 2"),
        (["--device", "cuda"], "use --device cpu"),
        (["--device", "tpu9"], "unknown device"),
        (["--lr", "-1"], "lr must be > 0"),
    ],
)
def test_bad_numbers_and_devices_are_clear_errors(tmp_path, args, message):
    result = in_process("train", *SMALL, *args, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr


def test_resume_takes_no_other_settings(tmp_path):
    result = in_process("train", "--resume", "--out", tmp_path / "run", "--k", "8")
    assert result.exit_code == 2 and "--resume continues" in result.stderr and "--k" in result.stderr


def test_a_bug_is_not_reported_as_bad_input(tmp_path, monkeypatch):
    """Only the library's InterpError is bad input; anything else propagates with its traceback."""
    import interp.run

    def broken(*args, **kwargs):
        raise KeyError("an internal bug")

    monkeypatch.setattr(interp.run, "train_runs", broken)
    result = in_process("train", *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 1 and isinstance(result.exception, KeyError)
    assert "error:" not in result.stderr
