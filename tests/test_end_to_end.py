"""The whole path on the real embedded model: model -> activations -> a short TopK training ->
save -> load -> identical outputs -> metrics."""

import math

import torch

from interp.data import DataConfig
from interp.run import RunConfig, train_run
from interp.sae import load_sae
from interp.train import TrainConfig


def test_smollm2_train_save_load_evaluate(tmp_path, smollm2):
    cfg = RunConfig(
        model="smollm2-135m", hooks=["blocks.3.hook_resid_post"], coder_options={"k": 16}, latents=1152,
        data=DataConfig(context_size=64, model_batch=16), buffer_tokens=8192,
        eval_tokens=2048, splice_tokens=504,
        train=TrainConfig(tokens=24_576, batch_size=1024, warmup_steps=5, eval_every=12, checkpoint_every=12),
    )
    coder, result, metrics = train_run(cfg, tmp_path / "run", progress=False)
    assert result.steps == 24
    loaded = load_sae(tmp_path / "run")
    x = torch.randn(64, 576) * 5
    assert torch.equal(loaded(x).x_hat, coder(x).x_hat)
    assert loaded.meta["eval"] == metrics
    assert metrics["l0"] <= 16 and 0 < metrics["fvu"] < 0.9
    assert metrics["loss_clean"] < metrics["loss_spliced"] < metrics["loss_zero"]
    assert 0 < metrics["loss_recovered"] < 1 and metrics["kl"] > 0
    assert all(math.isfinite(v) for v in metrics.values())
