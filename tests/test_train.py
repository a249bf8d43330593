import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from interp.activations import ShuffleBuffer
from interp.sae import SelectContext, create_coder, load_sae
from interp.train import (
    CHECKPOINT,
    METRICS,
    NonFiniteLoss,
    TrainConfig,
    Trainer,
    lr_factor,
)

HOOK = "blocks.0.hook_resid_post"


class SyntheticChunks:
    """Sparse-ish synthetic activations, the same for the same chunk index."""

    def __init__(self, d=16, rows=64):
        self.d, self.rows = d, rows
        g = torch.Generator().manual_seed(0)
        self.atoms = torch.randn(48, d, generator=g)

    def chunks(self, start=0):
        index = start
        while True:
            g = torch.Generator().manual_seed(index)
            codes = torch.rand(self.rows, 48, generator=g) * (torch.rand(self.rows, 48, generator=g) < 0.08)
            yield {HOOK: codes @ self.atoms + 0.5}
            index += 1


def make_trainer(run_dir, steps=12, arch="topk", **overrides):
    torch.manual_seed(0)
    coder = create_coder(arch, d_in=16, n_latents=64, k=4, hook=HOOK, model="tiny-llama")
    cfg = TrainConfig(tokens=steps * 32, batch_size=32, lr=3e-3, warmup_steps=3, checkpoint_every=5,
                      log_every=1, eval_every=0, dead_tokens=64, **overrides)
    buffer = ShuffleBuffer(SyntheticChunks(), buffer_tokens=128, batch_tokens=32, seed=1)
    return Trainer(coder, buffer, cfg, run_dir)


def kill_at(trainer, step, monkeypatch):
    """Run `trainer` until it is killed as it starts step `step` (its checkpoints stay)."""
    original_step = Trainer.train_step

    def dies(self, batch):
        if self.step == step:
            raise KeyboardInterrupt("killed")
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.setattr(Trainer, "train_step", original_step)


def test_training_lowers_the_loss_and_writes_a_run(tmp_path):
    trainer = make_trainer(tmp_path, steps=60)
    trainer.run()
    lines = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 61))
    assert lines[-1]["fvu"] < 0.5 * lines[0]["fvu"]
    loaded = load_sae(tmp_path)
    assert torch.equal(loaded.W_dec, trainer.coder.W_dec)
    torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(64))


# The batch-level coders also carry training-only state (moving averages' start, densities),
# which the checkpoint and not the saved coder keeps.
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "mutual_choice", "feature_choice"])
def test_killed_run_resumes_to_the_same_final_state(tmp_path, monkeypatch, arch):
    reference = make_trainer(tmp_path / "full", arch=arch)
    reference.run()

    kill_at(make_trainer(tmp_path / "killed", arch=arch), 8, monkeypatch)

    resumed = make_trainer(tmp_path / "killed", arch=arch)
    resumed.run(resume=True)
    assert resumed.step == 12
    for name, tensor in reference.coder.state_dict().items():
        assert torch.equal(tensor, resumed.coder.state_dict()[name]), name
    for name, tensor in reference.coder.training_state().items():
        assert torch.equal(tensor, resumed.coder.training_state()[name]), name
    assert torch.equal(reference.tokens_since_fired, resumed.tokens_since_fired)
    full_log = (tmp_path / "full" / METRICS).read_text().splitlines()
    resumed_log = (tmp_path / "killed" / METRICS).read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(l).items() if k != "tokens_per_s"} for l in lines]  # noqa: E731,E741
    assert strip(full_log) == strip(resumed_log)


def test_non_finite_loss_stops_without_losing_the_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    original_step = Trainer.train_step

    def poison_at_step_7(self, batch):
        if self.step == 7:
            batch = {k: v * float("nan") for k, v in batch.items()}
        return original_step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", poison_at_step_7)
    with pytest.raises(NonFiniteLoss, match="at step 7"):
        trainer.run()
    saved = load_sae(tmp_path)
    assert torch.isfinite(saved.W_dec).all()


def test_resume_rejects_corrupt_or_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make_trainer(tmp_path).run(resume=True)
    (tmp_path / CHECKPOINT).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        make_trainer(tmp_path).run(resume=True)


def test_fresh_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    make_trainer(tmp_path, steps=5).run()
    with pytest.raises(FileExistsError, match="--resume"):
        make_trainer(tmp_path, steps=5).run()


def test_resume_with_other_settings_is_refused(tmp_path):
    make_trainer(tmp_path, steps=5).run()
    with pytest.raises(ValueError, match="settings differ"):
        make_trainer(tmp_path, steps=5, grad_clip=2.0).run(resume=True)


def test_learning_rate_schedule():
    cfg = TrainConfig(tokens=100 * 10, batch_size=10, warmup_steps=10, decay_start=0.8)
    factors = [lr_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1 and factors[79] == 1
    assert factors[90] == pytest.approx(0.5) and factors[-1] == pytest.approx(0.05)


def test_tokens_above_the_norm_bound_are_left_out_of_training(tmp_path):
    chunk = next(SyntheticChunks(rows=32).chunks())[HOOK]
    huge = chunk[:3] * 500  # massive-activation tokens, as attention sinks have
    with_outliers = torch.cat([chunk[:10], huge, chunk[10:]])

    def trained(batch, **overrides):
        trainer = make_trainer(tmp_path / str(len(batch)), **overrides)
        trainer.initialize({HOOK: batch})
        for _ in range(3):
            trainer.train_step({HOOK: batch})
        return trainer.coder

    bounded = trained(with_outliers, max_norm_ratio=10.0)
    median = with_outliers.norm(dim=1).median().item()
    assert bounded.max_input_norm == pytest.approx(10 * median)
    clean = trained(chunk)
    for name, tensor in clean.state_dict().items():
        if name != "input_bound":  # the bound itself, checked above
            assert torch.equal(tensor, bounded.state_dict()[name]), name


def test_the_norm_bound_survives_resume_and_must_exceed_the_median(tmp_path):
    trainer = make_trainer(tmp_path, max_norm_ratio=4.0)
    trainer.run()
    resumed = make_trainer(tmp_path, max_norm_ratio=4.0)
    resumed.load_checkpoint()
    assert resumed.coder.max_input_norm == trainer.coder.max_input_norm is not None
    assert load_sae(tmp_path).max_input_norm == trainer.coder.max_input_norm
    with pytest.raises(ValueError, match="must be > 1"):
        TrainConfig(max_norm_ratio=0.5)


@pytest.mark.parametrize("grad_clip", [1e-3, 1e6])
def test_gradients_are_clipped_to_the_bound_only_above_it(tmp_path, grad_clip):
    trainer = make_trainer(tmp_path, grad_clip=grad_clip)
    batch = next(trainer.buffer.batches(trainer.buffer_state))
    trainer.initialize(batch)
    twin = copy.deepcopy(trainer.coder)
    out = twin(batch[HOOK], ctx=SelectContext(dead_mask=trainer.tokens_since_fired > trainer.cfg.dead_tokens))
    (out.fvu + out.aux_loss).backward()
    twin.remove_parallel_grads()
    unclipped = torch.nn.utils.get_total_norm([p.grad for p in twin.parameters()]).item()
    seen = []
    step = trainer.optimizer.step

    def recording_step():
        seen.append(torch.nn.utils.get_total_norm([p.grad for p in trainer.coder.parameters()]).item())
        step()

    trainer.optimizer.step = recording_step
    trainer.train_step(batch)
    assert unclipped > 1e-3
    assert seen == [pytest.approx(min(grad_clip, unclipped), rel=1e-5)]


def test_a_step_resets_exactly_the_latents_that_fired(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = next(trainer.buffer.batches(trainer.buffer_state))
    trainer.initialize(batch)
    trainer.tokens_since_fired.fill_(100)
    code = copy.deepcopy(trainer.coder)(batch[HOOK]).code
    fired = torch.zeros(64, dtype=torch.bool)
    fired[code.indices_bk[code.values_bk > 0]] = True
    assert 0 < int(fired.sum()) < 64
    stats = trainer.train_step(batch)
    assert torch.equal(trainer.tokens_since_fired, torch.where(fired, 0, 100 + len(batch[HOOK])))
    assert stats["l0"] == pytest.approx((code.values_bk > 0).sum().item() / len(batch[HOOK]))


def test_a_checkpoint_from_before_format_2_resumes(tmp_path, monkeypatch):
    """Checkpoints written before training-only buffers and the norm bound moved kept both among
    the coder's tensors and in the metadata: such a checkpoint resumes to the same final state."""
    reference = make_trainer(tmp_path / "full", arch="mutual_choice", max_norm_ratio=3.0)
    reference.run()
    kill_at(make_trainer(tmp_path / "old", arch="mutual_choice", max_norm_ratio=3.0), 6, monkeypatch)
    # Rewrite the checkpoint in the old layout.
    path = tmp_path / "old" / CHECKPOINT
    tensors = load_file(path)
    with open(path, "rb") as f:
        meta = json.loads(json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]["state"])
    bound = float(tensors.pop("coder.input_bound"))
    old = {(f"coder.{k[len('training.'):]}" if k.startswith("training.") else k): v for k, v in tensors.items()}
    save_file(old, path, metadata={"state": json.dumps({**meta, "max_input_norm": bound})})
    resumed = make_trainer(tmp_path / "old", arch="mutual_choice", max_norm_ratio=3.0)
    resumed.run(resume=True)
    for name, tensor in reference.coder.state_dict().items():
        assert torch.equal(tensor, resumed.coder.state_dict()[name]), name



@pytest.mark.parametrize("aux", [{"aux_coef": 0.0}, {"aux_coef": 1 / 32, "aux_mask": "dead"}], ids=["aux-off", "auxk-mask"])
def test_mutual_choice_trains_exactly_as_batchtopk_but_for_its_auxiliary_mask(tmp_path, aux):
    """Mutual choice selects as BatchTopK does; the auxiliary loss's mask is all that tells them
    apart. With the loss off, or with AuxK's mask (latents dead for the window), both must hold
    the same weights after every step, bit for bit; dead_tokens below a batch makes the dead
    mask non-empty from the second step, so the AuxK path is exercised."""
    trainers = {}
    for arch in ("batchtopk", "mutual_choice"):
        torch.manual_seed(0)
        options = {"aux_coef": aux["aux_coef"]} if arch == "batchtopk" else aux
        coder = create_coder(arch, d_in=16, n_latents=64, k=4, hook=HOOK, model="tiny-llama", **options)
        cfg = TrainConfig(tokens=12 * 32, batch_size=32, lr=3e-3, warmup_steps=3, eval_every=0, dead_tokens=16)
        trainers[arch] = Trainer(coder, None, cfg, tmp_path / arch)
    batches = ShuffleBuffer(SyntheticChunks(), buffer_tokens=128, batch_tokens=32, seed=1).batches(trainers["batchtopk"].buffer_state)
    aux_losses = []
    for step in range(12):
        batch = next(batches)
        for trainer in trainers.values():
            if step == 0:
                trainer.initialize(batch)
            aux_losses.append(trainer.train_step(batch)["aux_loss"])
        reference, mutual = (trainers[arch].coder for arch in ("batchtopk", "mutual_choice"))
        for name, value in reference.state_dict().items():
            assert torch.equal(value, mutual.state_dict()[name]), f"{name} differs after step {step + 1}"
    assert (max(aux_losses) > 0) == (aux["aux_coef"] > 0)
