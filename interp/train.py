"""Train any registered sparse coder from any activation source.

Adam with linear warm-up and a linear decay to zero over the last part of training, gradient
clipping, unit-norm decoder rows (their parallel gradient removed before each step, the norm
restored after), decoder bias and input scale initialised from the first batch, dead latents
tracked by tokens since each last fired (fed to the family's auxiliary loss), periodic evaluation,
a JSON-lines metrics log, and atomic checkpoints.

A checkpoint holds the coder, the optimiser state, the dead-latent counters and the activation
buffer's position (`BufferState`). Resuming rebuilds the same batches from that position, so a
killed run resumed with `resume=True` ends in the same state as one never interrupted.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from interp import distributed
from interp.activations import BufferState, ShuffleBuffer, TensorChunks
from interp.allocator import retain_freed_memory
from interp.atomic import write_tensors
from interp.errors import (
    AlreadyExists,
    BadInput,
    InterpError,
    MissingPackage,
    NotFound,
    check_positive,
)
from interp.hooks import grad_key, output_hook
from interp.sae import REGISTRY
from interp.sae.base import SelectContext, SparseCoder

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    tokens: int = 400_000
    """Training tokens (activations) to consume (the default is one pass over the built-in corpus)."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    lr: float | None = None
    """Adam learning rate; default 4e-4 * sqrt(16384 / latents): twice Gao et al.'s, scaled down with width as theirs (see learning_rate)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up."""
    decay_start: float = 0.8
    """Fraction of training after which the learning rate decays linearly to zero."""
    grad_clip: float = 1.0
    """Maximum global gradient norm."""
    dead_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead (Gao et al. use 10M at scale)."""
    max_norm_ratio: float | None = None
    """Leave out tokens whose activation norm exceeds this multiple of the first batch's median norm: massive-activation tokens (attention sinks; in SmolLM2's layer 12, 8 to 80 times the median) that would otherwise dominate the loss. Sets the coder's max_input_norm."""
    b_dec_init: str = "geometric_median"
    """Decoder bias initialisation from the first batch: 'geometric_median' or 'mean'."""
    eval_every: int = 100
    """Steps between held-out evaluations (0: never)."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    log_every: int = 10
    """Steps between lines of the metrics log."""
    seed: int = 0
    """Seed for the coder's initialisation and the data order."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""

    def __post_init__(self):
        for name in ("tokens", "batch_size", "dead_tokens", "checkpoint_every", "log_every"):
            check_positive(name, getattr(self, name))
        for name in ("warmup_steps", "eval_every"):
            check_positive(name, getattr(self, name), zero_ok=True)
        if self.lr is not None and not self.lr > 0:
            raise BadInput(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.decay_start <= 1 or not self.grad_clip > 0:
            raise BadInput(f"decay_start must lie in [0, 1] and grad_clip be > 0, got {self.decay_start} and {self.grad_clip}")
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise BadInput(f"max_norm_ratio multiplies the median token norm and must be > 1, got {self.max_norm_ratio}")

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.batch_size)

    def learning_rate(self, n_latents: int) -> float:
        """`lr`, or by default twice Gao et al.'s 2e-4 * sqrt(16384 / latents), the rate sparsify
        also uses. sparsify trains better at that rate than interp does: its encoder starts as
        torch's nn.Linear (rows of norm about 1/sqrt(3)), ours as the unit-norm decoder, so the same
        Adam step moves sparsify's encoder 1.7 times as far relative to its weights. Twice the rate
        closes that gap without sparsify's dead latents; bench/topk_recipe.py measures it (one
        pass of SmolLM2 activations, 400 steps; the figures are in docs/results.md). Gao et al.
        fitted their rate to far longer runs; for such runs, try theirs (--lr)."""
        return self.lr if self.lr is not None else 4e-4 * math.sqrt(16384 / n_latents)


def norm_bound(x: torch.Tensor, ratio: float) -> float:
    """`ratio` times the median token norm of `x`: the max_input_norm that max_norm_ratio sets."""
    return ratio * x.float().norm(dim=1).median().item()


class NonFiniteLoss(InterpError, RuntimeError):
    pass


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_second: float
    last: dict


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    decay_from = int(cfg.decay_start * cfg.steps)
    decay = 1.0 if step < decay_from else max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_from))
    return warm * decay


class Trainer:
    def __init__(
        self,
        coder: SparseCoder,
        buffer: ShuffleBuffer,
        cfg: TrainConfig,
        run_dir: str | Path,
        evaluate: Callable[[SparseCoder], dict] | None = None,
        data_parallel: bool = False,
    ):
        if not coder.trainable:
            raise BadInput(
                f"interp does not train {coder.arch} coders (it reads them from other libraries); "
                "train one of: " + ", ".join(a for a, c in REGISTRY.items() if c.trainable)
            )
        self.coder = coder
        self.buffer = buffer
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.evaluate = evaluate
        # The fused Adam kernel (CPU and CUDA) costs a quarter of the per-parameter loop.
        self.optimizer = torch.optim.Adam(
            coder.parameters(), lr=cfg.learning_rate(coder.cfg.n_latents), betas=(0.9, 0.999), fused=True
        )
        device = coder.W_dec.device
        if device.type == "cpu":
            retain_freed_memory()
        self.tokens_since_fired = torch.zeros(coder.cfg.n_latents, dtype=torch.long, device=device)
        self.step = 0
        self.buffer_state = BufferState()
        # Under torchrun, each rank holds a share of every batch (see interp.distributed).
        self.data_parallel = data_parallel and distributed.launched()

    # --- checkpoints -----------------------------------------------------------------------

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything a resume needs of this coder's training: (tensors, plain metadata)."""
        tensors = {f"coder.{k}": v for k, v in self.coder.state_dict().items()}
        tensors.update({f"training.{k}": v for k, v in self.coder.training_state().items()})
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{index}.{name}": value for name, value in state.items()})
        tensors["tokens_since_fired"] = self.tokens_since_fired
        return tensors, {"step": self.step, "train": asdict(self.cfg)}

    def save_checkpoint(self, buffers: list[dict] | None = None) -> None:
        """Write the checkpoint and the coder; `buffers`: every rank's buffer position, under data parallelism."""
        tensors, meta = self.state()
        meta["buffer"] = asdict(self.buffer_state)
        if buffers is not None:
            meta["buffers"] = buffers
        write_tensors(self.run_dir / CHECKPOINT, tensors, metadata={"state": json.dumps(meta)})
        self.coder.save(self.run_dir)

    def load_checkpoint(self) -> None:
        tensors, meta = read_checkpoint(self.run_dir / CHECKPOINT)
        self.restore(tensors, meta)
        self.buffer_state = buffer_position(meta, self.data_parallel)

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Take the state `state()` returned (read back from a checkpoint)."""
        saved_cfg = {k: v for k, v in meta["train"].items() if k != "wandb_project"}
        current = {k: v for k, v in asdict(self.cfg).items() if k != "wandb_project"}
        if saved_cfg != current:
            changed = {k: (saved_cfg.get(k), v) for k, v in current.items() if saved_cfg.get(k) != v}
            raise BadInput(f"cannot resume: training settings differ from the checkpoint's (saved, now): {changed}")
        coder_state = {k[len("coder."):]: v for k, v in tensors.items() if k.startswith("coder.")}
        training = {k[len("training."):]: v for k, v in tensors.items() if k.startswith("training.")}
        # Checkpoints from before the coder format 2 kept training-only buffers among the coder's
        # and the input-norm bound in their metadata.
        for name in self.coder.training_state():
            if name not in training and name in coder_state:
                training[name] = coder_state.pop(name)
        if "input_bound" not in coder_state:
            bound = meta.get("max_input_norm")
            coder_state["input_bound"] = torch.tensor(math.inf if bound is None else float(bound))
        self.coder.load_state_dict(coder_state)
        self.coder.load_training_state(training)
        optim = self.optimizer.state_dict()
        for index in range(len(list(self.coder.parameters()))):
            prefix = f"optim.{index}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optim["state"][index] = state
        self.optimizer.load_state_dict(optim)
        self.tokens_since_fired.copy_(tensors["tokens_since_fired"])
        self.step = meta["step"]
        if not self.data_parallel or distributed.rank() == 0:  # rank 0 alone keeps the log
            self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint: the resumed run writes them again."""
        path = self.run_dir / METRICS
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    # --- the loop --------------------------------------------------------------------------

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict:
        coder, cfg = self.coder, self.cfg
        batch = self.covered(batch)
        x, target = self.inputs(batch)
        # A gradient SAE's gradient is the one at the space its decoder writes into.
        grad = batch[grad_key(output_hook(coder))] if coder.needs_grad else None
        ctx = SelectContext(dead_mask=self.tokens_since_fired > cfg.dead_tokens, grad=grad)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.learning_rate(coder.cfg.n_latents) * lr_factor(self.step, cfg)
        with distributed.batch_across_ranks(self.data_parallel):
            out = coder(x, target, ctx)
            loss = out.fvu + out.aux_loss
            # under data parallelism each rank's loss is its share of the global batch's
            losses = distributed.sum_over_ranks(torch.stack([loss, out.fvu, out.aux_loss]).detach().float())
        if not torch.isfinite(losses[0]):
            raise NonFiniteLoss(
                f"the loss became {losses[0].item()} at step {self.step}; nothing after the last checkpoint "
                f"was saved. Lower the learning rate (--lr) or check the activations for inf/nan."
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.data_parallel:
            self._sum_grads()
        coder.remove_parallel_grads()
        grads = [p.grad.flatten() for p in coder.parameters() if p.grad is not None]
        # BLAS dot products: faster on the CPU than get_total_norm's per-tensor norms.
        total_norm = torch.stack([torch.dot(g, g).float() for g in grads]).sum().sqrt()
        if total_norm > cfg.grad_clip:  # scaling by 1 would be a wasted pass over every gradient
            torch.nn.utils.clip_grads_with_norm_(coder.parameters(), cfg.grad_clip, total_norm)
        self.optimizer.step()
        coder.normalize_decoder()
        with torch.no_grad(), distributed.batch_across_ranks(self.data_parallel):
            # Counting each latent's firings (empty slots hold 0 and count for none) costs a third
            # of selecting the fired entries and indexing with them.
            fired_bk = (out.code.values_bk > 0).float()
            firings_n = torch.zeros_like(self.tokens_since_fired, dtype=fired_bk.dtype)
            firings_n.index_add_(0, out.code.indices_bk.clamp(min=0).flatten(), fired_bk.flatten())
            counts = distributed.sum_over_ranks(torch.cat([firings_n, torch.tensor([float(len(x)), float(fired_bk.sum())], device=firings_n.device)]))
            firings_n, tokens, fired = counts[:-2], counts[-2], counts[-1]
            self.tokens_since_fired += int(tokens)
            self.tokens_since_fired.masked_fill_(firings_n > 0, 0)
        self.step += 1
        return {
            "loss": losses[0].item(),
            "fvu": losses[1].item(),
            "aux_loss": losses[2].item(),
            "l0": (fired / tokens).item(),
            "dead_frac": (self.tokens_since_fired > cfg.dead_tokens).float().mean().item(),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    def _sum_grads(self) -> None:
        """Every rank's gradients summed (one reduction of them all): the global batch's gradient."""
        params = [p for p in self.coder.parameters() if p.grad is not None]
        flat = torch.cat([p.grad.flatten() for p in params])
        with distributed.batch_across_ranks():
            distributed.sum_over_ranks(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    def initialize(self, batch: dict[str, torch.Tensor]) -> None:
        """Input/target scales, decoder bias and the input-norm bound from the first batch (a
        fresh run only; under data parallelism the global first batch, gathered from every rank,
        so that every rank computes the same)."""
        coder = self.coder
        if self.data_parallel:
            keys = {coder.cfg.hook, output_hook(coder)}
            batch = {key: distributed.gather_rows(value) for key, value in batch.items() if key in keys}
        if self.cfg.max_norm_ratio is not None and coder.max_input_norm is None:
            coder.set_max_input_norm(norm_bound(batch[coder.cfg.hook], self.cfg.max_norm_ratio))
        x, target = self.inputs(self.covered(batch))
        coder.fit_normalization(x, target)
        coder.init_from_data(x if target is None else target, self.cfg.b_dec_init)

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what the coder reads, what it reconstructs: None for an SAE, which reconstructs its input)."""
        written = output_hook(self.coder)
        return batch[self.coder.cfg.hook], None if written == self.coder.cfg.hook else batch[written]

    def covered(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's rows whose input the coder covers (all of them, uncopied, without a norm
        bound), at the keys this coder reads (a batch of several coders' hooks holds others')."""
        coder = self.coder
        keys = {coder.cfg.hook, output_hook(coder), grad_key(output_hook(coder))}
        mine = {key: value for key, value in batch.items() if key in keys}
        if coder.max_input_norm is None:
            return mine
        keep = coder.inliers(mine[coder.cfg.hook])
        return {key: value[keep] for key, value in mine.items()}

    def run(self, resume: bool = False) -> TrainResult:
        return TrainerGroup([self], self.buffer, self.run_dir).run(resume)[0]

    def log_step(self, log, logger, last: dict) -> None:
        """Append this step's record to the metrics log (every log_every steps, at evaluations and at the end)."""
        cfg = self.cfg
        record = None
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            record = {"step": self.step, "tokens": self.step * cfg.batch_size, **last}
        if self.evaluate and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
            record = record or {"step": self.step, "tokens": self.step * cfg.batch_size, **last}
            record["eval"] = self.evaluate(self.coder)
        if record:
            log.write(json.dumps(record) + "\n")
            log.flush()
            if logger:
                logger.log(record, step=self.step)


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not path.exists():
        raise NotFound(f"cannot resume: {path} does not exist (no checkpoint was written)")
    try:
        tensors = load_file(path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(json.loads(f.read(header_len))["__metadata__"]["state"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise BadInput(f"cannot resume: checkpoint {path} is corrupt ({err}); delete it to start over") from err
    return tensors, meta


def buffer_position(meta: dict, data_parallel: bool) -> BufferState:
    """This process's buffer position in a checkpoint's metadata: under data parallelism each
    rank's own (the checkpoint must come from as many processes as this run has)."""
    buffers = meta.get("buffers", [meta["buffer"]])
    world = distributed.world_size() if data_parallel else 1
    if len(buffers) != world:
        raise BadInput(f"cannot resume: the checkpoint was written by {len(buffers)} data-parallel processes, this run has {world}")
    return BufferState(**buffers[distributed.rank() if data_parallel else 0])


class TrainerGroup:
    """Several coders trained step by step on the same batches of one buffer: one forward pass of
    the model (or one read of a store) feeds them all. Each keeps its own optimiser, dead-latent
    counters, metrics log and folder; their checkpoint is one file in `run_dir` (atomic, so a kill
    never leaves coders at different steps). A group of one is a plain run: its checkpoint is the
    coder's own, in its folder."""

    def __init__(self, trainers: list[Trainer], buffer: ShuffleBuffer, run_dir: str | Path, checkpoint: str = CHECKPOINT,
                 progress: bool = True, rank: int = 0):
        steps = {(t.cfg.steps, t.cfg.batch_size, t.cfg.checkpoint_every) for t in trainers}
        if len(steps) != 1:
            raise BadInput("coders trained together share their steps, batch size and checkpoint interval")
        self.trainers, self.buffer, self.run_dir = trainers, buffer, Path(run_dir)
        self.checkpoint, self.progress, self.rank = self.run_dir / checkpoint, progress, rank
        # Data-parallel ranks hold replicas of the same coders: rank 0 writes for them all.
        self.data_parallel = trainers[0].data_parallel
        self.buffer_state = BufferState()

    @property
    def single(self) -> bool:
        return len(self.trainers) == 1 and self.trainers[0].run_dir == self.run_dir

    def save_checkpoint(self) -> None:
        buffers = distributed.gather_objects(asdict(self.buffer_state)) if self.data_parallel else None
        if self.rank != 0 and self.data_parallel:
            return
        if self.single:
            self.trainers[0].buffer_state = self.buffer_state
            self.trainers[0].save_checkpoint(buffers)
            return
        tensors, metas = {}, []
        for i, trainer in enumerate(self.trainers):
            state, meta = trainer.state()
            tensors.update({f"{i}.{k}": v for k, v in state.items()})
            metas.append(meta)
        meta = {"step": self.trainers[0].step, "buffer": asdict(self.buffer_state), "coders": metas}
        if buffers is not None:
            meta["buffers"] = buffers
        write_tensors(self.checkpoint, tensors, metadata={"state": json.dumps(meta)})
        for trainer in self.trainers:
            trainer.coder.save(trainer.run_dir)

    def load_checkpoint(self) -> None:
        if self.single:
            self.trainers[0].load_checkpoint()
            self.buffer_state = self.trainers[0].buffer_state
            return
        tensors, meta = read_checkpoint(self.checkpoint)
        if len(meta["coders"]) != len(self.trainers):
            raise BadInput(f"cannot resume: the checkpoint holds {len(meta['coders'])} coders, this run trains {len(self.trainers)}")
        for i, trainer in enumerate(self.trainers):
            prefix = f"{i}."
            trainer.restore({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["coders"][i])
        self.buffer_state = buffer_position(meta, self.data_parallel)

    def run(self, resume: bool = False) -> list[TrainResult]:
        trainers, first = self.trainers, self.trainers[0]
        cfg = first.cfg
        for trainer in trainers:
            trainer.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        elif self.checkpoint.exists():
            raise AlreadyExists(
                f"{self.run_dir} already holds a training checkpoint; pass --resume to continue it "
                f"or choose another --out"
            )
        # a data-parallel rank other than 0 keeps no log: rank 0's is the run's
        writes = self.rank == 0 or not self.data_parallel
        loggers = [_wandb(t.cfg, t.coder) if t.cfg.wandb_project and writes else None for t in trainers]
        batches = self.buffer.batches(self.buffer_state)
        start_step, started = first.step, time.perf_counter()
        lasts: list[dict] = [{} for _ in trainers]
        bar = tqdm(total=cfg.steps, initial=first.step, desc="train", unit="step", dynamic_ncols=True, disable=not self.progress)
        with bar, ExitStack() as stack:
            logs = [stack.enter_context((t.run_dir / METRICS).open("a")) for t in trainers] if writes else []
            while first.step < cfg.steps:
                batch = next(batches)
                for i, trainer in enumerate(trainers):
                    if trainer.step == 0:
                        trainer.initialize(batch)
                    lasts[i] = trainer.train_step(batch)
                self.buffer_state = BufferState(**asdict(self.buffer.state))
                elapsed = time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(_postfix(lasts))
                for trainer, last in zip(trainers, lasts):
                    last["tokens_per_s"] = (trainer.step - start_step) * cfg.batch_size / max(elapsed, 1e-9)
                for trainer, log, logger, last in zip(trainers, logs, loggers, lasts):
                    trainer.log_step(log, logger, last)
                if first.step % cfg.checkpoint_every == 0 or first.step == cfg.steps:
                    self.save_checkpoint()
        seconds = time.perf_counter() - started
        trained = (first.step - start_step) * cfg.batch_size
        return [TrainResult(t.step, t.step * cfg.batch_size, seconds, trained / max(seconds, 1e-9), last)
                for t, last in zip(trainers, lasts)]


def _postfix(lasts: list[dict]) -> dict[str, str]:
    """The live metrics on the progress bar: one coder's, or each coder's in order, compactly."""
    if len(lasts) == 1:
        last = lasts[0]
        return {"loss": f"{last['loss']:.4f}", "fvu": f"{last['fvu']:.3f}", "l0": f"{last['l0']:.1f}", "dead": f"{last['dead_frac']:.3f}"}
    return {"fvu": " ".join(f"{last['fvu']:.2f}" for last in lasts), "l0": " ".join(f"{last['l0']:.0f}" for last in lasts),
            "dead": " ".join(f"{last['dead_frac']:.2f}" for last in lasts)}


def _wandb(cfg: TrainConfig, coder: SparseCoder):
    try:
        import wandb
    except ImportError as err:
        raise MissingPackage("--wandb-project needs Weights & Biases: pip install 'interp[wandb]'") from err
    return wandb.init(project=cfg.wandb_project, config={"train": asdict(cfg), "coder": asdict(coder.cfg)})


def train_in_memory(coder: SparseCoder, acts: dict[str, torch.Tensor], batch_size: int, steps: int, seed: int) -> SparseCoder:
    """Train `coder` for `steps` batches of `batch_size` rows drawn with `seed` from activations
    already in memory ({coder's hook: (rows, d)}, and the gradient under `grad_key` for a family
    that selects by it): seconds of work, so its checkpoints go to a scratch folder."""
    rows = len(acts[coder.cfg.hook])
    batch = min(batch_size, rows)
    cfg = TrainConfig(tokens=batch * steps, batch_size=batch, warmup_steps=min(50, steps // 10),
                      dead_tokens=batch * max(1, steps // 5), eval_every=0, checkpoint_every=steps, seed=seed)
    buffer = ShuffleBuffer(TensorChunks({key: value.float() for key, value in acts.items()}), rows, batch, seed)
    with tempfile.TemporaryDirectory() as scratch:
        Trainer(coder, buffer, cfg, scratch).run()
    return coder.eval()
