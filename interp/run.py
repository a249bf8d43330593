"""A training run from settings to a saved, evaluated coder: what `interp train`, `interp cache`
and `interp eval` do, callable from Python.

A run folder holds `run.json` (these settings), the coder (`cfg.json`, `weights.safetensors`),
`checkpoint.safetensors`, `metrics.jsonl` and `eval.json`.
"""

from __future__ import annotations

import json
import math
import re
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
    transcode: bool = False
    """Train a transcoder: read --hook, reconstruct --target-hook (by default the MLP output of the block whose MLP input, blocks.L.ln2.hook_normalized, is --hook)."""
    target_hook: str | None = None
    """Hook a transcoder reconstructs, e.g. blocks.L.hook_mlp_out (implies --transcode)."""
    skip: bool = False
    """Skip transcoder (Paulo et al. 2025): also learn a linear map from the input hook to the target."""
    coder_options: dict = field(default_factory=dict)
    """Architecture-specific settings: fields of the architecture's config class (e.g. beta, zipf_exponent)."""
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


def hook_widths(model, hooks: list[str]) -> dict[str, int]:
    """Per-token width of each hook, from one short forward pass."""
    check_hooks(model, hooks)
    shapes = hook_shapes(model)
    return {hook: math.prod(shapes[hook]) for hook in hooks}


MLP_INPUT = re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")


def target_hook(cfg: RunConfig) -> str | None:
    """The hook the coder reconstructs when it is a transcoder; None for an SAE."""
    if cfg.skip and not (cfg.transcode or cfg.target_hook):
        raise ValueError("--skip makes a skip transcoder: it needs --transcode (and a target hook)")
    if cfg.target_hook or not cfg.transcode:
        return cfg.target_hook
    match = MLP_INPUT.fullmatch(cfg.hook)
    if not match:
        raise ValueError(
            f"--transcode reads {cfg.hook!r}, which is not an MLP input (blocks.L.ln2.hook_normalized); "
            f"name what it reconstructs with --target-hook"
        )
    return f"blocks.{match.group(1)}.hook_mlp_out"


def heldout_token_batches(model, cfg: RunConfig, n_tokens: int):
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
    batches = heldout_token_batches(model, cfg, cfg.eval_tokens)
    source = ModelChunks(model, lambda: iter(batches), hooks)
    return [source.run(b) for b in batches]


def evaluate_coder(model, coder: SparseCoder, cfg: RunConfig, progress: bool = True, activations: list | None = None) -> dict:
    """Reconstruction and splice metrics of `coder` on held-out text (see interp.metrics);
    `activations` are the held-out activations when the caller already has them."""
    if activations is None:
        hooks = [coder.cfg.hook] + ([coder.cfg.target_hook] if coder.cfg.target_hook else [])
        activations = heldout_activations(model, cfg, hooks)
    metrics = reconstruction_metrics(coder, activations)
    metrics.update(splice_metrics(model, coder, heldout_token_batches(model, cfg, cfg.splice_tokens), progress=progress))
    return metrics


def train_run(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, evaluate: bool = True
) -> tuple[SparseCoder, TrainResult, dict]:
    """Train a coder as `cfg` says into the run folder `out`; evaluate it (unless `evaluate` is
    False: then the metrics hold only the training speed and eval.json is not written); save."""
    out = Path(out)
    if resume:
        cfg = read_run_config(out)
    cls = coder_class(cfg.arch)
    model = load_model(cfg.model, cfg.device, cfg.dtype)
    target = target_hook(cfg)
    hooks = [cfg.hook] + ([target] if target else [])
    keys = store_keys(hooks, getattr(cls, "needs_grad", False))
    if cfg.activations:
        manifest = read_manifest(Path(cfg.activations))
        _check_store_matches(manifest, cfg, hooks)
        # Held-out evaluation runs on the text the store was made from.
        cfg.data = DataConfig(manifest.dataset, manifest.context_size, cfg.data.text_field)
        source = StoreChunks(cfg.activations, keys)
        widths = manifest.widths
    else:
        source = ModelChunks(model, lambda: _train_batches(model, cfg), hooks, with_grads=getattr(cls, "needs_grad", False))
        widths = hook_widths(model, hooks)
    d_in = widths[cfg.hook]
    n_latents = cfg.latents or cfg.expansion * d_in
    torch.manual_seed(cfg.train.seed)
    coder = create_coder(
        cfg.arch, d_in=d_in, n_latents=n_latents, k=cfg.k, hook=cfg.hook, target_hook=target,
        d_out=widths[target] if target else None, skip=cfg.skip, model=cfg.model, **cfg.coder_options,
    ).to(cfg.device)
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
    metrics = {"train_tokens_per_s": result.tokens_per_second}
    if evaluate:
        metrics = {**evaluate_coder(model, coder, cfg, progress=progress, activations=eval_acts), **metrics}
        coder.meta["eval"] = metrics
        write_json(out / EVAL_FILE, metrics)
    coder.save(out)
    return coder, result, metrics


def _train_batches(model, cfg: RunConfig):
    return iter_token_batches(
        model.tokenizer, iter_texts(cfg.data.dataset, "train", cfg.data.text_field), cfg.data.context_size, cfg.model_batch
    )


def _check_store_matches(manifest: StoreManifest, cfg: RunConfig, hooks: list[str]) -> None:
    missing = [hook for hook in hooks if hook not in manifest.hooks]
    if missing:
        raise ValueError(f"the activation store {cfg.activations} holds hooks {manifest.hooks}, not {missing}")
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
