"""A training run from settings to a saved, evaluated coder: what `interp train`, `interp cache`
and `interp eval` do, callable from Python.

A run folder holds `run.json` (these settings), the coder (`cfg.json`, `weights.safetensors`),
`checkpoint.safetensors`, `metrics.jsonl` and `eval.json`. A run of several coders (several
hooks, or one hook template over --layers), all trained from one pass over the activations, has
a parent folder with `run.json`, `group.json` (its coders' folders), one `checkpoint.safetensors`
for them all, and a run folder per coder. The model is loaded only when a run
needs it: to make activations, or to evaluate on held-out text.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from interp.activation_store import (
    StoreChunks,
    StoreManifest,
    read_manifest,
    store_keys,
    write_store,
)
from interp.activations import ModelChunks, Share, ShuffleBuffer
from interp.atomic import write_json
from interp.data import DataConfig
from interp.distributed import barrier, local_device, rank_and_world
from interp.errors import BadInput, NotFound, check_positive
from interp.hooks import capture, coder_hooks, hook_pair
from interp.metrics import reconstruction_metrics, splice_metrics
from interp.models import ModelConfig, hook_layer, hook_widths
from interp.sae import SparseCoder, coder_class, create_coder, load_sae
from interp.train import CHECKPOINT, TrainConfig, Trainer, TrainerGroup, TrainResult

RUN_FILE = "run.json"
EVAL_FILE = "eval.json"
GROUP_FILE = "group.json"


@dataclass
class EvalConfig:
    eval_tokens: int = 16_384
    """Held-out tokens for FVU / L0 / dead-fraction evaluation."""
    splice_tokens: int = 4_096
    """Held-out tokens for the spliced-loss evaluation (three full forward passes each)."""

    def __post_init__(self):
        check_positive("eval_tokens", self.eval_tokens)
        check_positive("splice_tokens", self.splice_tokens)


@dataclass
class RunConfig(ModelConfig, EvalConfig):
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"], metadata={"flag": "hook"})
    """TransformerLens hook point to train on (see `interp info MODEL`); repeat for one coder per hook, all from one forward pass; with --layers, a template such as blocks.{L}.hook_resid_post."""
    layers: str | None = None
    """One coder per layer, all from one forward pass: layers such as 0-29 or 3,6,9 (ranges and lists), filling {L} in --hook and --target-hook."""
    arch: str = "topk"
    """Coder architecture (registered in interp.sae)."""
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
    distribute_hooks: bool = False
    """Under torchrun, give each process some of the run's coders, each trained on all the data (as sparsify's distribute_modules does)."""
    coder_options: dict = field(default_factory=dict)
    """Settings of the architecture's config class (k, and e.g. beta, zipf_exponent); unset ones keep its defaults."""
    activations: str | None = None
    """Train from an activation store written by `interp cache` instead of running the model."""
    data: DataConfig = field(default_factory=DataConfig)
    buffer_tokens: int = 65_536
    """Tokens held in the shuffle buffer, one buffer for every coder of the run (memory: tokens x the summed width of every hook read x 4 bytes)."""
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        ModelConfig.__post_init__(self)
        EvalConfig.__post_init__(self)
        check_positive("expansion", self.expansion)
        check_positive("buffer_tokens", self.buffer_tokens)
        if self.latents is not None:
            check_positive("latents", self.latents)
        if self.layers is not None:
            parse_layers(self.layers)

    @property
    def hook(self) -> str:
        """The hook of a run that trains one coder."""
        if len(self.hooks) != 1 or self.layers is not None or "{L}" in self.hooks[0]:
            raise BadInput(f"this run trains several coders ({', '.join(self.hooks)}{' at layers ' + self.layers if self.layers else ''}); "
                           "each has its own hook")
        return self.hooks[0]

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = dict(data)
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        # run.json before several coders per run named its one hook "hook".
        if "hook" in data and "hooks" not in data:
            values["hooks"] = [data["hook"]]
        data_values = dict(data.get("data", {}))
        # run.json before the config split kept k and model_batch at the top level.
        if "model_batch" in data:
            data_values.setdefault("model_batch", data["model_batch"])
        if "k" in data:
            values["coder_options"] = {"k": data["k"], **values.get("coder_options", {})}
        # Comparisons before format 2 wrote the shared norm bound into the coder options; the
        # checkpoint holds it now.
        values["coder_options"] = {k: v for k, v in values.get("coder_options", {}).items() if k != "max_input_norm"}
        values["data"] = DataConfig(**data_values)
        values["train"] = TrainConfig(**data.get("train", {}))
        return cls(**values)

    @property
    def coder_hooks(self) -> list[str]:
        """The hooks the coder of a one-coder run reads and writes."""
        return hook_pair(self.hook, target_hook(self))


MLP_INPUT = re.compile(r"blocks\.(\d+)\.ln2\.hook_normalized")
LAYER = "{L}"


def parse_layers(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    layers: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match or (match.group(2) and int(match.group(2)) < int(match.group(1))):
            raise BadInput(f"--layers takes layers such as 0-29 or 3,6,9 (ranges and lists of whole numbers), got {text!r}")
        first = int(match.group(1))
        layers += range(first, int(match.group(2) or first) + 1)
    if len(set(layers)) != len(layers):
        raise BadInput(f"--layers names a layer twice: {text!r}")
    return layers


def coder_runs(cfg: RunConfig) -> list[RunConfig]:
    """The run of each coder `cfg` trains: one per hook, or per layer of each hook template."""
    templated = [h for h in cfg.hooks if LAYER in h]
    if cfg.layers is None and templated:
        raise BadInput(f"--hook {templated[0]} is a template ({LAYER} for the layer): give --layers too")
    if cfg.layers is not None and len(templated) != len(cfg.hooks):
        raise BadInput(f"with --layers every --hook is a template with {LAYER}, e.g. blocks.{LAYER}.hook_resid_post; got {cfg.hooks}")
    if not cfg.hooks:
        raise BadInput("name at least one --hook")
    pairs = []
    for hook in cfg.hooks:
        for layer in parse_layers(cfg.layers) if cfg.layers is not None else [None]:
            read = hook if layer is None else hook.replace(LAYER, str(layer))
            layer = layer if layer is not None else hook_layer(read)
            target = cfg.target_hook
            if target and LAYER in target:
                if layer is None:
                    raise BadInput(f"--target-hook {target} fills {LAYER} with the layer of --hook, but {read} is in no block")
                target = target.replace(LAYER, str(layer))
            pairs.append((read, target))
    if len(pairs) > 1 and cfg.target_hook and LAYER not in cfg.target_hook:
        raise BadInput(f"several coders cannot all reconstruct {cfg.target_hook}: give a template with {LAYER} "
                       f"(blocks.{LAYER}.hook_mlp_out) or --transcode")
    runs = [replace(cfg, hooks=[read], target_hook=target, layers=None) for read, target in pairs]
    written = [hook_pair(r.hook, target_hook(r))[-1] for r in runs]
    if len(set(written)) != len(written):
        raise BadInput(f"two coders of this run would write the same hook: {sorted({w for w in written if written.count(w) > 1})}")
    return runs


def target_hook(cfg: RunConfig) -> str | None:
    """The hook the coder reconstructs when it is a transcoder; None for an SAE."""
    if cfg.skip and not (cfg.transcode or cfg.target_hook):
        raise BadInput("--skip makes a skip transcoder: it needs --transcode (and a target hook)")
    if cfg.target_hook or not cfg.transcode:
        return cfg.target_hook
    match = MLP_INPUT.fullmatch(cfg.hook)
    if not match:
        raise BadInput(
            f"--transcode reads {cfg.hook!r}, which is not an MLP input (blocks.L.ln2.hook_normalized); "
            f"name what it reconstructs with --target-hook"
        )
    return f"blocks.{match.group(1)}.hook_mlp_out"


def default_run_folder(cfg: RunConfig) -> Path:
    """runs/<model>-<hook>-<arch>-k<k> (k as given, else the architecture's default); for several
    coders the hooks (templates) joined, and the layers."""
    declared = coder_class(cfg.arch).config_class.__dataclass_fields__
    k = cfg.coder_options.get("k", declared["k"].default if "k" in declared else None)
    hooks = "+".join(cfg.hooks).replace(LAYER, "L") + (f"-layers{cfg.layers}" if cfg.layers else "")
    return Path("runs") / (f"{Path(cfg.model).name}-{hooks}-{cfg.arch}" + (f"-k{k}" if k is not None else ""))


def coder_folder(run: RunConfig) -> str:
    """The folder of one coder inside a run of several: its hook (and target)."""
    return run.hook + (f"--{target_hook(run)}" if target_hook(run) else "")


class _Model:
    """The run's model, loaded on first use."""

    def __init__(self, cfg: ModelConfig):
        self.cfg, self._model = cfg, None

    def __call__(self):
        if self._model is None:
            self._model = self.cfg.load()
        return self._model


def heldout_token_batches(model, data: DataConfig, n_tokens: int) -> list:
    out = []
    for batch in data.batches(model.tokenizer, "test"):
        out.append(batch)
        if len(out) * data.tokens_per_batch >= n_tokens:
            break
    if not out:
        raise BadInput(f"the held-out split of {data.dataset!r} is too small for one batch of {data.model_batch} sequences")
    return out


def heldout_activations(model, data: DataConfig, hooks: list[str], n_tokens: int) -> list:
    return [capture(model, b.tokens_bt, hooks, b.mask_bt) for b in heldout_token_batches(model, data, n_tokens)]


def evaluate_coder(model, coder: SparseCoder, data: DataConfig, evaluation: EvalConfig, progress: bool = True,
                   activations: list | None = None) -> dict:
    """Reconstruction and splice metrics of `coder` on held-out text of `data` (see interp.metrics);
    `activations` are the held-out activations when the caller already has them."""
    if activations is None:
        activations = heldout_activations(model, data, coder_hooks(coder), evaluation.eval_tokens)
    metrics = reconstruction_metrics(coder, activations)
    metrics.update(splice_metrics(model, coder, heldout_token_batches(model, data, evaluation.splice_tokens), progress=progress))
    return metrics


def run_data(cfg: RunConfig) -> DataConfig:
    """The text a run trains and evaluates on: a store's own when it trains from one."""
    if not cfg.activations:
        return cfg.data
    manifest = read_manifest(Path(cfg.activations))
    return replace(cfg.data, dataset=manifest.dataset, context_size=manifest.context_size)


def train_run(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, evaluate: bool = True,
    max_input_norm: float | None = None,
) -> tuple[SparseCoder, TrainResult, dict]:
    """Train the one coder of `cfg` into the run folder `out` (see `train_runs`)."""
    runs = train_runs(cfg, out, resume=resume, progress=progress, evaluate=evaluate, max_input_norm=max_input_norm)
    if len(runs) != 1:
        raise BadInput(f"this run trained {len(runs)} coders; train_runs returns them all")
    return runs[0][:3]


def train_runs(
    cfg: RunConfig, out: str | Path, resume: bool = False, progress: bool = True, evaluate: bool = True,
    max_input_norm: float | None = None,
) -> list[tuple[SparseCoder, TrainResult, dict, Path]]:
    """Train the coders `cfg` asks for (one per hook, or per layer of each hook template), all
    from one pass over the activations, into `out`: the run folder of a single coder, or the
    parent of one folder per coder (named by its hooks, listed in group.json); evaluate each
    (unless `evaluate` is False: then the metrics hold only the training speed and eval.json is
    not written); save. Returns (coder, training result, metrics, folder) per coder.
    `max_input_norm` fixes the coders' input-norm bound instead of deriving it from the first
    batch (`cfg.train.max_norm_ratio`)."""
    out = Path(out)
    if resume:
        cfg = read_run_config(out)
    runs = coder_runs(cfg)
    folders = [out] if len(runs) == 1 else [out / coder_folder(run) for run in runs]
    rank, world = rank_and_world(cfg.device)
    # Under torchrun: each process trains some of the coders on all the data (--distribute-hooks),
    # or every process trains every coder on its share of each batch (data parallel).
    sharded, data_parallel = world > 1 and cfg.distribute_hooks, world > 1 and not cfg.distribute_hooks
    if world > 1:
        cfg = replace(cfg, device=local_device(cfg.device))
    if sharded:
        if len(runs) < world:
            raise BadInput(f"--distribute-hooks shares {len(runs)} coders among {world} processes: give at least one coder per process")
        if len(runs) == 1:
            folders = [out / coder_folder(runs[0])]
    if data_parallel and cfg.train.batch_size % world:
        raise BadInput(f"--batch-size {cfg.train.batch_size} is the global batch: it must divide among the {world} processes")
    all_folders = folders
    if sharded:
        runs, folders = runs[rank::world], folders[rank::world]
    writer = rank == 0 or sharded
    cls = coder_class(cfg.arch)
    model = _Model(cfg)
    hooks = list(dict.fromkeys(hook for run in runs for hook in run.coder_hooks))
    data = run_data(cfg)
    if cfg.activations:
        manifest = read_manifest(Path(cfg.activations))
        _check_store_matches(manifest, cfg, hooks)
        source = StoreChunks(cfg.activations, store_keys(hooks, cls.needs_grad))
        widths = manifest.widths
    else:
        source = ModelChunks(model(), lambda: data.batches(model().tokenizer, "train"), hooks, with_grads=cls.needs_grad)
        widths = hook_widths(model(), hooks)
    if data_parallel:
        source = Share(source, rank, world)
    coders = []
    for run in runs:
        target, d_in = target_hook(run), widths[run.hook]
        # Every coder starts as it would alone: the same seed before each.
        torch.manual_seed(cfg.train.seed)
        coder = create_coder(
            cfg.arch, d_in=d_in, n_latents=cfg.latents or cfg.expansion * d_in, hook=run.hook, target_hook=target,
            d_out=widths[target] if target else None, skip=cfg.skip, model=cfg.model, **cfg.coder_options,
        ).to(cfg.device)
        coder.set_max_input_norm(max_input_norm)
        coder.meta = {"run": asdict(replace(run, data=data))}
        coders.append(coder)
    if not resume and writer:
        if rank == 0:
            write_json(out / RUN_FILE, asdict(cfg))
        if all_folders != [out]:
            for run, folder in zip(runs, folders):
                write_json(folder / RUN_FILE, asdict(run))
            if rank == 0:
                write_json(out / GROUP_FILE, {"coders": [folder.name for folder in all_folders]})
    eval_acts = None

    def periodic_eval(coder: SparseCoder) -> dict:
        nonlocal eval_acts
        if eval_acts is None:
            eval_acts = heldout_activations(model(), data, hooks, cfg.eval_tokens)
        return reconstruction_metrics(coder, eval_acts)

    # One buffer holds every hook's activations of the same tokens and feeds every coder; a
    # data-parallel rank's buffer and batches are its share (the batch size is the global one).
    share = world if data_parallel else 1
    buffer = ShuffleBuffer(source, cfg.buffer_tokens // share, cfg.train.batch_size // share, cfg.train.seed)
    trainers = [Trainer(coder, buffer, cfg.train, folder, evaluate=periodic_eval, data_parallel=data_parallel)
                for coder, folder in zip(coders, folders)]
    # a process of a sharded run keeps its own checkpoint of its coders; rank 0 alone shows progress
    checkpoint = f"checkpoint.rank{rank}-of-{world}.safetensors" if sharded else CHECKPOINT
    results = TrainerGroup(trainers, buffer, out, checkpoint=checkpoint, progress=rank == 0, rank=rank).run(resume=resume)
    done = []
    for coder, result, folder in zip(coders, results, folders):
        metrics = {"train_tokens_per_s": result.tokens_per_second}
        if not writer:
            done.append((coder, result, metrics, folder))
            continue
        if evaluate:
            metrics = {**evaluate_coder(model(), coder, data, cfg, progress=progress, activations=eval_acts), **metrics}
            coder.meta["eval"] = metrics
            write_json(folder / EVAL_FILE, metrics)
        coder.save(folder)
        done.append((coder, result, metrics, folder))
    barrier()
    return done


def group_folders(out: str | Path) -> list[Path] | None:
    """The coder folders of a run of several coders (from its group.json); None for a one-coder run."""
    path = Path(out) / GROUP_FILE
    if not path.exists():
        return None
    return [Path(out) / name for name in json.loads(path.read_text())["coders"]]


def _check_store_matches(manifest: StoreManifest, cfg: RunConfig, hooks: list[str]) -> None:
    missing = [hook for hook in hooks if hook not in manifest.hooks]
    if missing:
        raise BadInput(f"the activation store {cfg.activations} holds hooks {manifest.hooks}, not {missing}")
    if manifest.model != cfg.model:
        raise BadInput(
            f"the activation store {cfg.activations} was made with model {manifest.model!r}, but this run uses "
            f"{cfg.model!r}; pass --model {manifest.model}"
        )


def read_run_config(out: Path) -> RunConfig:
    path = Path(out) / RUN_FILE
    if not path.exists():
        raise NotFound(f"cannot resume: {path} does not exist; is {out} a run folder?")
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise BadInput(f"cannot resume: {path} is malformed ({err})") from err


@dataclass
class CacheConfig(ModelConfig):
    hooks: list[str] = field(default_factory=lambda: ["blocks.6.hook_resid_post"], metadata={"flag": "hook"})
    """Hook point to cache; repeat for several (one forward pass); with --layers, a template such as blocks.{L}.hook_resid_post."""
    layers: str | None = None
    """Cache every --hook template at these layers (0-29, 3,6,9), filling {L}."""
    tokens: int = 400_000
    """Tokens to cache."""
    shard_tokens: int = 65_536
    """About how many tokens go in each shard file."""
    with_grads: bool = False
    """Also store the gradient of the next-token loss at each hook (for gradient SAEs)."""
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self):
        super().__post_init__()
        if not self.hooks:
            raise BadInput("name at least one hook to cache")
        self.cached_hooks()

    def cached_hooks(self) -> list[str]:
        """The hooks, templates filled at --layers."""
        templated = [h for h in self.hooks if LAYER in h]
        if (self.layers is None) != (not templated) or (templated and len(templated) != len(self.hooks)):
            raise BadInput(f"--layers goes with hook templates ({LAYER} for the layer) and every --hook is one then; got {self.hooks}"
                           + (f" with --layers {self.layers}" if self.layers else ""))
        if self.layers is None:
            return list(dict.fromkeys(self.hooks))
        return [h.replace(LAYER, str(layer)) for h in self.hooks for layer in parse_layers(self.layers)]
        check_positive("tokens", self.tokens)
        check_positive("shard_tokens", self.shard_tokens)


def cache_run(cfg: CacheConfig, out: str | Path, progress: bool = True) -> StoreManifest:
    """Write the activations at `cfg.hooks` (templates filled at `cfg.layers`) for `cfg.tokens` training tokens into a store."""
    model = cfg.load()
    hooks = cfg.cached_hooks()
    source = ModelChunks(model, lambda: cfg.data.batches(model.tokenizer, "train"), hooks, with_grads=cfg.with_grads)
    manifest = StoreManifest(
        model=cfg.model,
        hooks=hooks,
        dataset=cfg.data.dataset,
        context_size=cfg.data.context_size,
        batch_size=cfg.data.model_batch,
        chunks_per_shard=max(1, cfg.shard_tokens // cfg.data.tokens_per_batch),
        target_tokens=cfg.tokens,
        with_grads=cfg.with_grads,
    )
    return write_store(out, source, manifest, progress=progress)


def saved_run_config(coder: SparseCoder) -> RunConfig:
    """The settings a saved coder was trained with (its data: what it was trained on)."""
    run = coder.meta.get("run")
    # The device it was trained on need not exist here; what runs it now says where it runs.
    return RunConfig.from_dict({**run, "device": "cpu"}) if run else RunConfig(model=coder.cfg.model, hooks=[coder.cfg.hook])


def coder_model(coder: SparseCoder, device: str = "cpu"):
    """The model a saved coder was trained on, loaded as it was (its dtype) on `device`."""
    trained = saved_run_config(coder)
    return ModelConfig(coder.cfg.model or trained.model, device, trained.dtype).load()


def evaluate_saved(run_dir: str | Path, data: DataConfig | None = None, evaluation: EvalConfig | None = None,
                   device: str = "cpu", progress: bool = True) -> dict:
    """Evaluate a saved coder on held-out text of its training data (or `data`), and write the
    metrics to the run folder's eval.json."""
    coder = load_sae(run_dir, device=device)
    trained = saved_run_config(coder)
    metrics = evaluate_coder(coder_model(coder, device), coder, data or trained.data, evaluation or trained, progress=progress)
    write_json(Path(run_dir) / EVAL_FILE, metrics)
    return metrics

