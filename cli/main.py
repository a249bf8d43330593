"""The `interp` command: parse, call the library, print. Option help comes from the docstrings of
the library's config dataclasses."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from interp.cli.fielddocs import field_docs
from interp.data import DataConfig
from interp.run import EVAL_FILE, RunConfig
from interp.sae import REGISTRY
from interp.train import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and explore sparse coders on transformer activations.")

RUN, TRAIN, DATA = RunConfig(), TrainConfig(), DataConfig()
RUN_DOC, TRAIN_DOC, DATA_DOC = field_docs(RunConfig), field_docs(TrainConfig), field_docs(DataConfig)
# Help for architecture-specific options, from the config classes that define them.
CODER_DOC = {name: doc for cls in REGISTRY.values() for name, doc in field_docs(cls.config_class).items()}
ARCHS = ", ".join(REGISTRY)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, ImportError)


# Architecture-specific options, shared by `train` and `compare` (None: the architecture's default).
KAux = Annotated[Optional[int], typer.Option(help=CODER_DOC["k_aux"])]
AuxCoef = Annotated[Optional[float], typer.Option(help=CODER_DOC["aux_coef"])]
Beta = Annotated[Optional[float], typer.Option(help=CODER_DOC["beta"])]
ThresholdRate = Annotated[Optional[float], typer.Option(help=CODER_DOC["threshold_rate"])]
ZipfExponent = Annotated[Optional[float], typer.Option(help=CODER_DOC["zipf_exponent"])]
DensityRate = Annotated[Optional[float], typer.Option(help=CODER_DOC["density_rate"])]
UnderuseFactor = Annotated[Optional[float], typer.Option(help=CODER_DOC["underuse_factor"])]
MaxNormRatio = Annotated[Optional[float], typer.Option(help=TRAIN_DOC["max_norm_ratio"])]


def coder_options(**options) -> dict:
    return {name: value for name, value in options.items() if value is not None}


def user_errors(command):
    """Turn the library's errors about bad input into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            typer.secho(f"error: {message}", fg="red", err=True)
            raise typer.Exit(code=2) from err

    return wrapper


def _print_metrics(metrics: dict) -> None:
    for name, value in metrics.items():
        typer.echo(f"  {name:<20} {value:.4f}" if isinstance(value, float) else f"  {name:<20} {value}")


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages (e.g. which kernel backend runs).")] = False):
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
@user_errors
def train(
    model: Annotated[str, typer.Option(help=RUN_DOC["model"])] = RUN.model,
    hook: Annotated[str, typer.Option(help=RUN_DOC["hook"])] = RUN.hook,
    arch: Annotated[str, typer.Option(help=f"{RUN_DOC['arch']} One of: {ARCHS}.")] = RUN.arch,
    transcode: Annotated[bool, typer.Option(help=RUN_DOC["transcode"])] = False,
    target_hook: Annotated[Optional[str], typer.Option(help=RUN_DOC["target_hook"])] = None,
    skip: Annotated[bool, typer.Option(help=RUN_DOC["skip"])] = False,
    k_aux: KAux = None,
    aux_coef: AuxCoef = None,
    beta: Beta = None,
    threshold_rate: ThresholdRate = None,
    zipf_exponent: ZipfExponent = None,
    density_rate: DensityRate = None,
    underuse_factor: UnderuseFactor = None,
    dataset: Annotated[str, typer.Option(help=DATA_DOC["dataset"])] = DATA.dataset,
    context_size: Annotated[int, typer.Option(help=DATA_DOC["context_size"])] = DATA.context_size,
    text_field: Annotated[str, typer.Option(help=DATA_DOC["text_field"])] = DATA.text_field,
    k: Annotated[int, typer.Option(help=RUN_DOC["k"])] = RUN.k,
    expansion: Annotated[int, typer.Option(help=RUN_DOC["expansion"])] = RUN.expansion,
    latents: Annotated[Optional[int], typer.Option(help=RUN_DOC["latents"])] = None,
    tokens: Annotated[int, typer.Option(help=TRAIN_DOC["tokens"])] = TRAIN.tokens,
    batch_size: Annotated[int, typer.Option(help=TRAIN_DOC["batch_size"])] = TRAIN.batch_size,
    lr: Annotated[Optional[float], typer.Option(help=TRAIN_DOC["lr"])] = None,
    warmup_steps: Annotated[int, typer.Option(help=TRAIN_DOC["warmup_steps"])] = TRAIN.warmup_steps,
    dead_tokens: Annotated[int, typer.Option(help=TRAIN_DOC["dead_tokens"])] = TRAIN.dead_tokens,
    max_norm_ratio: MaxNormRatio = None,
    eval_every: Annotated[int, typer.Option(help=TRAIN_DOC["eval_every"])] = TRAIN.eval_every,
    checkpoint_every: Annotated[int, typer.Option(help=TRAIN_DOC["checkpoint_every"])] = TRAIN.checkpoint_every,
    seed: Annotated[int, typer.Option(help=TRAIN_DOC["seed"])] = TRAIN.seed,
    activations: Annotated[Optional[Path], typer.Option(help=RUN_DOC["activations"])] = None,
    model_batch: Annotated[int, typer.Option(help=RUN_DOC["model_batch"])] = RUN.model_batch,
    buffer_tokens: Annotated[int, typer.Option(help=RUN_DOC["buffer_tokens"])] = RUN.buffer_tokens,
    eval_tokens: Annotated[int, typer.Option(help=RUN_DOC["eval_tokens"])] = RUN.eval_tokens,
    splice_tokens: Annotated[int, typer.Option(help=RUN_DOC["splice_tokens"])] = RUN.splice_tokens,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
    dtype: Annotated[str, typer.Option(help=RUN_DOC["dtype"])] = RUN.dtype,
    wandb_project: Annotated[Optional[str], typer.Option(help=TRAIN_DOC["wandb_project"])] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<model>-<hook>-<arch>-k<k>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the killed run in --out from its last checkpoint, with its saved settings.")] = False,
):
    """Train a sparse coder on a model's activations and evaluate it on held-out text."""
    from interp.run import train_run

    options = coder_options(
        k_aux=k_aux, aux_coef=aux_coef, beta=beta, threshold_rate=threshold_rate, zipf_exponent=zipf_exponent,
        density_rate=density_rate, underuse_factor=underuse_factor,
    )
    cfg = RunConfig(
        model=model, hook=hook, arch=arch, k=k, expansion=expansion, latents=latents, transcode=transcode,
        target_hook=target_hook, skip=skip, coder_options=options,
        activations=str(activations) if activations else None,
        data=DataConfig(dataset=dataset, context_size=context_size, text_field=text_field),
        model_batch=model_batch, buffer_tokens=buffer_tokens, eval_tokens=eval_tokens,
        splice_tokens=splice_tokens, device=device, dtype=dtype,
        train=TrainConfig(
            tokens=tokens, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, dead_tokens=dead_tokens,
            max_norm_ratio=max_norm_ratio, eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, wandb_project=wandb_project,
        ),
    )
    if out is None:
        if resume:
            raise ValueError("--resume needs --out: the run folder to continue")
        out = Path("runs") / f"{Path(model).name}-{hook}-{arch}-k{k}"
    coder, result, metrics = train_run(cfg, out, resume=resume)
    typer.echo(f"saved {coder.arch} coder ({coder.cfg.n_latents} latents, hook {coder.cfg.hook}) to {out}")
    typer.echo(f"trained on {result.tokens} tokens at {result.tokens_per_second:,.0f} tokens/s; held-out evaluation:")
    _print_metrics(metrics)


@app.command()
@user_errors
def cache(
    out: Annotated[Path, typer.Option(help="Folder of the activation store (created, or resumed if it exists).")],
    model: Annotated[str, typer.Option(help=RUN_DOC["model"])] = RUN.model,
    hook: Annotated[list[str], typer.Option(help="Hook point to cache; repeat for several (one forward pass).")] = [RUN.hook],  # noqa: B006
    dataset: Annotated[str, typer.Option(help=DATA_DOC["dataset"])] = DATA.dataset,
    context_size: Annotated[int, typer.Option(help=DATA_DOC["context_size"])] = DATA.context_size,
    text_field: Annotated[str, typer.Option(help=DATA_DOC["text_field"])] = DATA.text_field,
    tokens: Annotated[int, typer.Option(help="Tokens to cache.")] = TRAIN.tokens,
    model_batch: Annotated[int, typer.Option(help=RUN_DOC["model_batch"])] = RUN.model_batch,
    shard_tokens: Annotated[int, typer.Option(help="About how many tokens go in each shard file.")] = 65_536,
    with_grads: Annotated[bool, typer.Option(help="Also store the gradient of the next-token loss at each hook (for gradient SAEs).")] = False,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
    dtype: Annotated[str, typer.Option(help=RUN_DOC["dtype"])] = RUN.dtype,
):
    """Write activations at one or more hooks to an on-disk store that `interp train --activations` reads."""
    from interp.run import cache_run

    manifest = cache_run(
        model, hook, out, tokens, DataConfig(dataset, context_size, text_field), model_batch=model_batch,
        shard_tokens=shard_tokens, with_grads=with_grads, device=device, dtype=dtype,
    )
    typer.echo(f"cached {manifest.tokens} tokens of {', '.join(manifest.hooks)} in {len(manifest.shards)} shards at {out}")


@app.command("eval")
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A saved coder's folder (a run folder of `interp train`).")],
    dataset: Annotated[Optional[str], typer.Option(help="Evaluate on this dataset's held-out split instead of the training dataset's.")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help=RUN_DOC["eval_tokens"])] = None,
    splice_tokens: Annotated[Optional[int], typer.Option(help=RUN_DOC["splice_tokens"])] = None,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
):
    """Evaluate a saved coder: FVU, L0, dead/dense fractions, spliced loss, loss recovered, KL."""
    from interp.atomic import write_json
    from interp.run import evaluate_saved

    metrics = evaluate_saved(run_dir, dataset, eval_tokens, splice_tokens, device)
    write_json(run_dir / EVAL_FILE, metrics)
    typer.echo(f"evaluation of {run_dir} (also in {run_dir / EVAL_FILE}):")
    _print_metrics(metrics)


@app.command()
@user_errors
def info(
    model: Annotated[str, typer.Argument(help=RUN_DOC["model"])] = RUN.model,
    filter: Annotated[Optional[str], typer.Option("--filter", help="Only hooks whose name contains this text.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print {hook: shape} as JSON.")] = False,
):
    """List the model's hook points and the per-token shape of each."""
    from interp.models import hook_shapes, load_model

    loaded = load_model(model)
    shapes = {name: shape for name, shape in hook_shapes(loaded).items() if not filter or filter in name}
    if as_json:
        typer.echo(json.dumps({name: list(shape) for name, shape in shapes.items()}, indent=1))
        return
    cfg = loaded.cfg
    typer.echo(f"{model}: {cfg.n_layers} layers, d_model {cfg.d_model}, vocab {cfg.d_vocab}; {len(shapes)} hook points (shape per token)")
    for name, shape in shapes.items():
        typer.echo(f"  {name:<45} {tuple(shape)}")


@app.command("compare")
@user_errors
def compare_archs(
    activations: Annotated[Path, typer.Option(help="Activation store (from `interp cache`; with --with-grads to include 'gradient') that every run trains on.")],
    arch: Annotated[list[str], typer.Option(help=f"Architecture to compare; repeat for several (default: all of {ARCHS}).")] = [],  # noqa: B006
    k: Annotated[list[int], typer.Option(help="Sparsity budget k; repeat for several (default: 16 and 48).")] = [],  # noqa: B006
    seed: Annotated[list[int], typer.Option(help="Training seed; repeat for several (default: 0 and 1).")] = [],  # noqa: B006
    hook: Annotated[Optional[str], typer.Option(help="Hook to train on (default: the store's first hook).")] = None,
    expansion: Annotated[int, typer.Option(help=RUN_DOC["expansion"])] = RUN.expansion,
    latents: Annotated[Optional[int], typer.Option(help=RUN_DOC["latents"])] = None,
    tokens: Annotated[int, typer.Option(help=TRAIN_DOC["tokens"])] = TRAIN.tokens,
    batch_size: Annotated[int, typer.Option(help=TRAIN_DOC["batch_size"])] = TRAIN.batch_size,
    lr: Annotated[Optional[float], typer.Option(help=TRAIN_DOC["lr"])] = None,
    warmup_steps: Annotated[int, typer.Option(help=TRAIN_DOC["warmup_steps"])] = TRAIN.warmup_steps,
    dead_tokens: Annotated[int, typer.Option(help=TRAIN_DOC["dead_tokens"])] = TRAIN.dead_tokens,
    max_norm_ratio: MaxNormRatio = None,
    k_aux: KAux = None,
    aux_coef: AuxCoef = None,
    beta: Beta = None,
    threshold_rate: ThresholdRate = None,
    zipf_exponent: ZipfExponent = None,
    density_rate: DensityRate = None,
    underuse_factor: UnderuseFactor = None,
    buffer_tokens: Annotated[int, typer.Option(help=RUN_DOC["buffer_tokens"])] = RUN.buffer_tokens,
    eval_tokens: Annotated[int, typer.Option(help=RUN_DOC["eval_tokens"])] = RUN.eval_tokens,
    splice_tokens: Annotated[int, typer.Option(help=RUN_DOC["splice_tokens"])] = RUN.splice_tokens,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
    out: Annotated[Path, typer.Option(help="Output folder: run folders, compare.json, compare.md, compare.html.")] = Path("runs/compare"),
):
    """Train several architectures on the same cached activations at matched sparsity; write a table and a figure."""
    from interp.compare import CompareConfig, compare

    options = coder_options(
        k_aux=k_aux, aux_coef=aux_coef, beta=beta, threshold_rate=threshold_rate, zipf_exponent=zipf_exponent,
        density_rate=density_rate, underuse_factor=underuse_factor,
    )
    base = RunConfig(
        hook=hook or "", expansion=expansion, latents=latents, activations=str(activations), buffer_tokens=buffer_tokens,
        eval_tokens=eval_tokens, splice_tokens=splice_tokens, device=device, coder_options=options,
        train=TrainConfig(
            tokens=tokens, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, dead_tokens=dead_tokens,
            max_norm_ratio=max_norm_ratio, eval_every=0,
        ),
    )
    defaults = CompareConfig(base)
    cfg = CompareConfig(base, archs=arch or defaults.archs, ks=k or defaults.ks, seeds=seed or defaults.seeds)
    result = compare(cfg, out)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.html'} ({len(result['runs'])} runs)")


# --- exploring and steering features --------------------------------------------------------------

from interp.features import FeatureConfig  # noqa: E402
from interp.steering import GenerateConfig  # noqa: E402

FEAT, GEN = FeatureConfig(), GenerateConfig()
FEAT_DOC, GEN_DOC = field_docs(FeatureConfig), field_docs(GenerateConfig)


@app.command()
@user_errors
def features(
    run_dir: Annotated[Path, typer.Argument(help="A saved coder's folder (a run folder of `interp train`).")],
    tokens: Annotated[int, typer.Option(help=FEAT_DOC["tokens"])] = FEAT.tokens,
    dataset: Annotated[Optional[str], typer.Option(help="Text to run (default: the coder's training dataset); see `interp train --help`.")] = None,
    context_size: Annotated[int, typer.Option(help=DATA_DOC["context_size"])] = DATA.context_size,
    top_k: Annotated[int, typer.Option(help=FEAT_DOC["top_k"])] = FEAT.top_k,
    samples: Annotated[int, typer.Option(help=FEAT_DOC["samples"])] = FEAT.samples,
    model_batch: Annotated[int, typer.Option(help=FEAT_DOC["model_batch"])] = FEAT.model_batch,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
    recompute: Annotated[bool, typer.Option(help="Run the feature pass again even if RUN_DIR/features holds results.")] = False,
    html: Annotated[Optional[Path], typer.Option(help="Where to write the dashboard (default RUN_DIR/dashboard.html).")] = None,
    search: Annotated[Optional[str], typer.Option(help="Also print the features whose top tokens or logit-lens tokens contain this text.")] = None,
):
    """Collect each feature's top contexts, samples, density, histogram and logit lens (one pass, saved
    in RUN_DIR/features), and write a self-contained HTML dashboard."""
    from interp.dashboard import DASHBOARD_FILE, write_dashboard
    from interp.features import FEATURES_DIR, collect_features, load_features, search_features
    from interp.models import load_model
    from interp.sae import load_sae

    coder = load_sae(run_dir, device=device)
    saved = (run_dir / FEATURES_DIR / "features.json").exists()
    if saved and not recompute:
        results = load_features(run_dir)
        typer.echo(f"using the feature results in {run_dir / FEATURES_DIR} ({results.n_tokens:,} tokens; --recompute to redo)")
    else:
        trained_on = coder.meta.get("run", {}).get("data", {}).get("dataset", DATA.dataset)
        cfg = FeatureConfig(
            tokens=tokens, top_k=top_k, samples=samples, model_batch=model_batch,
            data=DataConfig(dataset=dataset or trained_on, context_size=context_size),
        )
        model = load_model(coder.cfg.model or RUN.model, device)
        results = collect_features(model, coder, cfg)
        results.save(run_dir)
        typer.echo(f"feature results for {results.n_tokens:,} tokens saved to {run_dir / FEATURES_DIR}")
    live = int((results.density_n > 0).sum())
    path = write_dashboard(results, html or run_dir / DASHBOARD_FILE)
    typer.echo(f"{live} of {results.n_latents} features fired; dashboard: {path}")
    if search is not None:
        matches = search_features(results, search)
        typer.echo(f"features matching {search!r}:" if matches else f"no feature matches {search!r}")
        for match in matches:
            top = results.logit_lens(match.feature)
            lens = " ".join(repr(t) for t, _ in top[0][:5]) if top else ""
            typer.echo(f"  {match.feature:>6}  {match.hits:>3} hits in {match.where}  density {float(results.density_n[match.feature]):.2e}  {lens}")


def _parse_positions(text: str):
    if text in ("all", "new"):
        return text
    try:
        return [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"--positions must be 'all', 'new' or comma-separated positions like 3,4,5; got {text!r}") from None


def _side_by_side(left: str, right: str, width: int) -> list[str]:
    import textwrap

    a = textwrap.wrap(left.replace("\n", " ↵ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ↵ "), width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{width}} │ {y}" for x, y in zip(a, b)]


@app.command()
@user_errors
def steer(
    run_dir: Annotated[Path, typer.Argument(help="A saved coder's folder (a run folder of `interp train`).")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")],
    feature: Annotated[list[int], typer.Option(help="Feature to steer with; repeat for several.")],
    strength: Annotated[Optional[list[float]], typer.Option(help="Add the feature's decoder direction at this activation; one value for all features or one per --feature.")] = None,
    clamp: Annotated[Optional[list[float]], typer.Option(help="Clamp the feature's activation to this value through the coder (its error kept); one for all or one per --feature.")] = None,
    scale: Annotated[Optional[list[float]], typer.Option(help="Multiply the feature's activation by this through the coder; one for all or one per --feature.")] = None,
    ablate: Annotated[bool, typer.Option(help="Remove the features' contributions through the coder (its error kept).")] = False,
    max_new_tokens: Annotated[int, typer.Option(help=GEN_DOC["max_new_tokens"])] = GEN.max_new_tokens,
    temperature: Annotated[float, typer.Option(help=GEN_DOC["temperature"])] = GEN.temperature,
    top_k: Annotated[Optional[int], typer.Option(help=GEN_DOC["top_k"])] = None,
    samples: Annotated[int, typer.Option(help=GEN_DOC["samples"])] = GEN.samples,
    seed: Annotated[int, typer.Option(help=GEN_DOC["seed"])] = GEN.seed,
    positions: Annotated[str, typer.Option(help=GEN_DOC["positions"])] = "all",
    stop_at_eos: Annotated[bool, typer.Option(help=GEN_DOC["stop_at_eos"])] = GEN.stop_at_eos,
    device: Annotated[str, typer.Option(help=RUN_DOC["device"])] = RUN.device,
):
    """Generate from a prompt with and without steering by features, and print both side by side."""
    import shutil

    from interp import steering
    from interp.models import load_model
    from interp.sae import load_sae

    modes = {"--strength": strength, "--clamp": clamp, "--scale": scale, "--ablate": [0.0] if ablate else None}
    chosen = [name for name, values in modes.items() if values]
    if len(chosen) != 1:
        raise ValueError(f"give exactly one of --strength, --clamp, --scale, --ablate (got {', '.join(chosen) or 'none'})")
    mode, values = chosen[0], modes[chosen[0]]
    if len(values) == 1:
        values = values * len(feature)
    if len(values) != len(feature):
        raise ValueError(f"{mode} takes one value, or one per --feature ({len(feature)}); got {len(values)}")
    coder = load_sae(run_dir, device=device)
    build = {"--strength": steering.add_feature, "--clamp": steering.clamp, "--scale": steering.scale,
             "--ablate": lambda c, f, _: steering.ablate(c, f)}[mode]
    interventions = [build(coder, f, v) for f, v in zip(feature, values)]
    model = load_model(coder.cfg.model or RUN.model, device)
    cfg = steering.GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                  samples=samples, seed=seed, positions=_parse_positions(positions), stop_at_eos=stop_at_eos)
    pair = steering.compare_generations(model, prompt, interventions, cfg)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    described = ", ".join(f"{f} ({mode.lstrip('-')}{'' if mode == '--ablate' else ' ' + str(v)})" for f, v in zip(feature, values))
    typer.echo(f"prompt: {prompt!r}; steering feature {described} at {coder.cfg.target_hook or coder.cfg.hook}, positions {positions}")
    for i, (base, steered) in enumerate(zip(pair.baseline, pair.steered)):
        typer.echo(f"\n{'baseline (seed ' + str(seed + i) + ')':<{width}} │ steered (seed {seed + i})")
        typer.echo("─" * width + "─┼─" + "─" * width)
        for line in _side_by_side(base, steered, width):
            typer.echo(line)
