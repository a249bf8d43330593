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
from interp.train import TrainConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train, evaluate and explore sparse coders on transformer activations.")

RUN, TRAIN, DATA = RunConfig(), TrainConfig(), DataConfig()
RUN_DOC, TRAIN_DOC, DATA_DOC = field_docs(RunConfig), field_docs(TrainConfig), field_docs(DataConfig)
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, ImportError)


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
    arch: Annotated[str, typer.Option(help=RUN_DOC["arch"])] = RUN.arch,
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

    cfg = RunConfig(
        model=model, hook=hook, arch=arch, k=k, expansion=expansion, latents=latents,
        activations=str(activations) if activations else None,
        data=DataConfig(dataset=dataset, context_size=context_size, text_field=text_field),
        model_batch=model_batch, buffer_tokens=buffer_tokens, eval_tokens=eval_tokens,
        splice_tokens=splice_tokens, device=device, dtype=dtype,
        train=TrainConfig(
            tokens=tokens, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, dead_tokens=dead_tokens,
            eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, wandb_project=wandb_project,
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
