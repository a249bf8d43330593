"""Data-parallel training under torchrun (two gloo processes, launched here): each rank trains
on its share of every global batch, and the result must equal training in one process on the
global batches themselves (the two shares concatenated, built here from the same store), to
float tolerance; a two-process run killed with SIGKILL must resume to the final weights of one
never interrupted. BatchTopK, mutual choice and feature choice choose over the global batch as
one process does."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from interp.activation_store import StoreChunks
from interp.activations import BufferState, Share, ShuffleBuffer
from interp.data import DataConfig
from interp.run import CacheConfig, cache_run
from interp.sae import create_coder, load_sae
from interp.train import TrainConfig, Trainer

HOOK = "blocks.0.hook_resid_post"
SETTINGS = ["--model", "tiny-llama", "--hook", HOOK, "--k", "4", "--expansion", "2", "--batch-size", "128", "--buffer-tokens", "512",
            "--eval-every", "0", "--checkpoint-every", "5", "--log-every", "1", "--eval-tokens", "200", "--splice-tokens", "60"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    cache_run(CacheConfig(model="tiny-llama", hooks=[HOOK], tokens=2400, data=DataConfig(context_size=16, model_batch=4), shard_tokens=120),
              out, progress=False)
    return out


def torchrun(*args, port, wait=True):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port), "-m", "interp", "train", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


class GlobalBatches:
    """The global batches of a two-rank run: each rank's share, as its buffer draws it, concatenated in rank order."""

    def __init__(self, store):
        self.shares = [ShuffleBuffer(Share(StoreChunks(store, [HOOK]), rank, 2), 256, 64, seed=0) for rank in range(2)]
        self.state = BufferState()

    def batches(self, state):
        for parts in zip(*(share.batches() for share in self.shares)):
            yield {HOOK: torch.cat([p[HOOK] for p in parts])}


# The batch-level coders choose over the global batch: every rank offers its largest entries and
# all take one cut (feature choice: one per latent). Such a choice is a cut through the whole
# batch, so rounding differences of the summed gradients (about 1e-8 after two steps) move an entry across it within a few more steps and the runs part:
# it is compared over two steps, where a per-rank choice would already differ far beyond tolerance.
@pytest.mark.parametrize(("arch", "steps", "port"),
                         [("topk", 12, 29521), ("batchtopk", 2, 29526), ("mutual_choice", 2, 29527), ("feature_choice", 2, 29528)])
def test_two_processes_train_as_one_on_the_global_batch(store, tmp_path, arch, steps, port):
    done = torchrun("--activations", store, *SETTINGS, "--arch", arch, "--tokens", str(128 * steps), "--out", tmp_path / "dp", port=port)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    parallel = load_sae(tmp_path / "dp")
    torch.manual_seed(0)
    coder = create_coder(arch, d_in=64, n_latents=128, k=4, hook=HOOK, model="tiny-llama")
    cfg = TrainConfig(tokens=128 * steps, batch_size=128, eval_every=0, checkpoint_every=5, log_every=1)
    Trainer(coder, GlobalBatches(store), cfg, tmp_path / "one").run()
    for name, tensor in coder.state_dict().items():
        torch.testing.assert_close(parallel.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "dp" / "checkpoint.safetensors").is_file() and (tmp_path / "dp" / "eval.json").is_file()


def test_a_killed_two_process_run_resumes_to_the_same_weights(store, tmp_path):
    long = ["--activations", store, *SETTINGS, "--tokens", str(128 * 150)]
    done = torchrun(*long, "--out", tmp_path / "full", port=29522)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    run = torchrun(*long, "--out", tmp_path / "killed", port=29523, wait=False)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert checkpoint.exists() and not (tmp_path / "killed" / "eval.json").exists(), "the run ended before it was killed"
    resumed = torchrun("--resume", "--out", tmp_path / "killed", port=29524)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    full, again = load_sae(tmp_path / "full"), load_sae(tmp_path / "killed")
    for name, tensor in full.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
