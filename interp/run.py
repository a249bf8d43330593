"""A training run from settings to a saved, evaluated coder: what `interp train`, `interp cache`
and `interp eval` do, callable from Python.

A run folder holds `run.json` (these settings), the coder (`cfg.json`, `weights.safetensors`),
`checkpoint.safetensors`, `metrics.jsonl` and `eval.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from interp.activation_store import StoreChunks, StoreManifest, read_manifest, store_keys, write_store
from interp.activations import ModelChunks, ShuffleBuffer
from interp.atomic import write_json
from interp.data import DataConfig, iter_texts, iter_token_batches
from interp.metrics import reconstruction_metrics, splice_metrics
from interp.models import DEFAULT_MODEL, check_hooks, hook_shapes, load_model
from interp.sae import SparseCoder, coder_class, create_coder, load_sae
from interp.train import Trainer, TrainConfig, TrainResult

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    """Model: 'smollm2-135m' (embedded), 'tiny-llama', a local folder, or a Hugging Face name."""
    hook: str = "blocks.6.hook_resid_post"
    """TransformerLens hook point to train on (see `interp info MODEL`)."""
    arch: str = "topk"
    """Coder architecture (registered in interp.sae)."""
    k: int = 32
    """Active latents per token."""
    expansion: int = 8
    """Latents per input dimension (ignored when --latents is given)."""
    latents: int | None = None
    """Number of latents (default: expansion x hook width)."""
    activations: str | None = None
    """Train from an activation store written by `interp cache` instead of running the model."""
    data: DataConfig = field(default_factory=DataConfig)
    model_batch: int = 16
    """Sequences per model forward pass."""
    buffer_tokens: int = 65_536
    """Activations held in the shuffle buffer (memory: tokens x width x 4 bytes)."""
    eval_tokens: int = 16_384
    """Held-out tokens for FVU / L0 / dead-fraction evaluation."""
    splice_tokens: int = 4_096
    """Held-out tokens for the spliced-loss evaluation (three full forward passes each)."""
    device: str = "cpu"
    """Device for the model and the coder: cpu, cuda, cuda:1, ..."""
    dtype: str = "float32"
    """Model dtype: float32, bfloat16 or float16 (the coder trains in float32)."""
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["data"] = DataConfig(**data.get("data", {}))
        values["train"] = TrainConfig(**data.get("train", {}))
        return cls(**values)


def hook_width(model, hook: str) -> int:
    check_hooks(model, [hook])
    shape = hook_shapes(model)[hook]
    return math.prod(shape)


def _heldout_batches(model, cfg: RunConfig, n_tokens: int):
    per_batch = cfg.model_batch * (cfg.data.context_size - 1)
    batches = iter_token_batches(
        model.tokenizer, iter_texts(cfg.data.dataset, "test", cfg.data.text_field), cfg.data.context_size, cfg.model_batch
    )
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) * per_batch >= n_tokens:
            break
    if not out:
        raise ValueError(f"the held-out split of {cfg.data.dataset!r} is too small for one batch of {cfg.model_batch} sequences")
    return out


def heldout_activations(model, cfg: RunConfig, hooks: list[str]) -> list:
    batches = _heldout_batches(model, cfg, cfg.eval_tokens)
    source = ModelChunks(model, lambda: iter(batches), hooks)
    return [source.run(b) for b in batches]


def evaluate_coder(model, coder: SparseCoder, cfg: RunConfig, progress: bool = True) -> dict:
    """Reconstruction and splice metrics of `coder` on held-out text (see interp.metrics)."""
    hooks = [coder.cfg.hook] + ([coder.cfg.target_hook] if coder.cfg.target_hook else [])
    metrics = reconstruction_metrics(coder, heldout_activations(model, cfg, hooks))
    metrics.update(splice_metrics(model, coder, _heldout_batches(model, cfg, cfg.splice_tokens), progress=progress))
    return metrics


def train_run(cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> tuple[SparseCoder, TrainResult, dict]:
    """Train a coder as `cfg` says into the run folder `out`; evaluate it; save everything."""
    out = Path(out)
    if resume:
        cfg = read_run_config(out)
    cls = coder_class(cfg.arch)
    model = load_model(cfg.model, cfg.device, cfg.dtype)
    hooks = [cfg.hook]
    keys = store_keys(hooks, getattr(cls, "needs_grad", False))
    if cfg.activations:
        manifest = read_manifest(Path(cfg.activations))
        _check_store_matches(manifest, cfg)
        # Held-out evaluation runs on the text the store was made from.
        cfg.data = DataConfig(manifest.dataset, manifest.context_size, cfg.data.text_field)
        source = StoreChunks(cfg.activations, keys)
        d_in = manifest.widths[cfg.hook]
    else:
        source = ModelChunks(model, lambda: _train_batches(model, cfg), hooks, with_grads=getattr(cls, "needs_grad", False))
        d_in = hook_width(model, cfg.hook)
    n_latents = cfg.latents or cfg.expansion * d_in
    torch.manual_seed(cfg.train.seed)
    coder = create_coder(cfg.arch, d_in=d_in, n_latents=n_latents, k=cfg.k, hook=cfg.hook, model=cfg.model).to(cfg.device)
    coder.meta = {"run": asdict(cfg)}
    if not resume:
        write_json(out / RUN_FILE, asdict(cfg))
    eval_acts = None

    def periodic_eval(coder: SparseCoder) -> dict:
        nonlocal eval_acts
        if eval_acts is None:
            eval_acts = heldout_activations(model, cfg, hooks)
        return reconstruction_metrics(coder, eval_acts)

    buffer = ShuffleBuffer(source, cfg.buffer_tokens, cfg.train.batch_size, cfg.train.seed)
    result = Trainer(coder, buffer, cfg.train, out, evaluate=periodic_eval).run(resume=resume)
    metrics = evaluate_coder(model, coder, cfg, progress=progress)
    metrics["train_tokens_per_s"] = result.tokens_per_second
    coder.meta["eval"] = metrics
    coder.save(out)
    write_json(out / EVAL_FILE, metrics)
    return coder, result, metrics


def _train_batches(model, cfg: RunConfig):
    return iter_token_batches(
        model.tokenizer, iter_texts(cfg.data.dataset, "train", cfg.data.text_field), cfg.data.context_size, cfg.model_batch
    )


def _check_store_matches(manifest: StoreManifest, cfg: RunConfig) -> None:
    if cfg.hook not in manifest.hooks:
        raise ValueError(f"the activation store {cfg.activations} holds hooks {manifest.hooks}, not {cfg.hook!r}")
    if manifest.model != cfg.model:
        raise ValueError(
            f"the activation store {cfg.activations} was made with model {manifest.model!r}, but this run uses "
            f"{cfg.model!r}; pass --model {manifest.model}"
        )


def read_run_config(out: Path) -> RunConfig:
    path = Path(out) / RUN_FILE
    if not path.exists():
        raise FileNotFoundError(f"cannot resume: {path} does not exist; is {out} a run folder?")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"cannot resume: {path} is malformed ({err})") from err


def cache_run(
    model_name: str,
    hooks: list[str],
    out: str | Path,
    tokens: int,
    data: DataConfig | None = None,
    model_batch: int = 16,
    shard_tokens: int = 65_536,
    with_grads: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
) -> StoreManifest:
    """Write the activations at `hooks` for `tokens` training tokens of `data` into a store."""
    data = data or DataConfig()
    model = load_model(model_name, device, dtype)
    source = ModelChunks(
        model,
        lambda: iter_token_batches(model.tokenizer, iter_texts(data.dataset, "train", data.text_field), data.context_size, model_batch),
        hooks,
        with_grads=with_grads,
    )
    tokens_per_chunk = model_batch * (data.context_size - 1)
    manifest = StoreManifest(
        model=model_name,
        hooks=list(dict.fromkeys(hooks)),
        dataset=data.dataset,
        context_size=data.context_size,
        batch_size=model_batch,
        chunks_per_shard=max(1, shard_tokens // tokens_per_chunk),
        target_tokens=tokens,
        with_grads=with_grads,
    )
    return write_store(out, source, manifest, progress=progress)


def evaluate_saved(run_dir: str | Path, dataset: str | None = None, eval_tokens: int | None = None,
                   splice_tokens: int | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate a saved coder on held-out text of its training dataset (or `dataset`)."""
    coder = load_sae(run_dir, device=device)
    run = coder.meta.get("run")
    cfg = RunConfig.from_dict(run) if run else RunConfig(model=coder.cfg.model, hook=coder.cfg.hook)
    cfg.device = device
    if dataset is not None:
        cfg.data.dataset = dataset
    if eval_tokens is not None:
        cfg.eval_tokens = eval_tokens
    if splice_tokens is not None:
        cfg.splice_tokens = splice_tokens
    model = load_model(coder.cfg.model or cfg.model, device, cfg.dtype)
    return evaluate_coder(model, coder, cfg, progress=progress)
