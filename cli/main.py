"""The `interp` command: parse, call the library, print. Every option is a field of a library
config dataclass (interp.cli.options). The library's bad-input errors (interp.errors.InterpError)
print as one line with exit code 2; anything else is a bug and shows its traceback."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import typer
from interp.cli.options import Given, coder_options, config_options, field_docs, takes

from interp.circuits.circuit import CircuitConfig
from interp.circuits.head_codes import HeadsConfig
from interp.circuits.task_evaluation import TaskEvalConfig
from interp.circuits.tracing import GraphConfig
from interp.compare import CompareConfig
from interp.data import DataConfig
from interp.errors import BadInput, InterpError
from interp.features import FeatureConfig
from interp.models import ModelConfig
from interp.run import CacheConfig, EvalConfig, RunConfig
from interp.steering import SteerConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Train, evaluate and explore sparse coders on transformer activations.")

RunDir = Annotated[Path, typer.Argument(help="A saved coder's folder (a run folder of `interp train`).")]
DEVICE = config_options(ModelConfig, only=["device"])


def user_errors(command):
    """Turn the library's errors about bad input into one clear line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except InterpError as err:
            typer.secho("error: " + "; ".join(str(err).splitlines()), fg="red", err=True)
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
@takes(config_options(RunConfig, exclude=["coder_options"]), coder_options())
def train(
    given: Given,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/<model>-<hook>-<arch>-k<k>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the killed run in --out from its last checkpoint, with its saved settings.")] = False,
):
    """Train a sparse coder on a model's activations and evaluate it on held-out text; with
    several --hook (or --layers and a hook template), one coder per hook from one forward pass."""
    from interp.run import default_run_folder, train_runs

    if resume and (out is None or given.values):
        raise BadInput("--resume continues the run in --out with its saved settings: give --out and no other settings"
                       + (f" (got {', '.join(given.names())})" if given.values else ""))
    cfg = given.apply(RunConfig())
    out = out or default_run_folder(cfg)
    runs = train_runs(cfg, out, resume=resume)
    for coder, result, metrics, folder in runs:
        typer.echo(f"saved {coder.arch} coder ({coder.cfg.n_latents} latents, hook {coder.cfg.hook}) to {folder}")
        typer.echo(f"trained on {result.tokens} tokens at {result.tokens_per_second:,.0f} tokens/s; held-out evaluation:")
        _print_metrics(metrics)


@app.command()
@user_errors
@takes(config_options(CacheConfig))
def cache(given: Given, out: Annotated[Path, typer.Option(help="Folder of the activation store (created, or resumed if it exists).")]):
    """Write activations at one or more hooks to an on-disk store that `interp train --activations` reads."""
    from interp.run import cache_run

    manifest = cache_run(given.apply(CacheConfig()), out)
    typer.echo(f"cached {manifest.tokens} tokens of {', '.join(manifest.hooks)} in {len(manifest.shards)} shards at {out}")


@app.command("eval")
@user_errors
@takes(config_options(EvalConfig, default_note="the run's"), config_options(DataConfig, default_note="the run's"), DEVICE)
def evaluate(
    given: Given,
    run_dir: RunDir,
    together: Annotated[bool, typer.Option(help="For a run of several coders, also the spliced loss with all of them in the model at once.")] = False,
):
    """Evaluate a saved coder: FVU, L0, dead/dense fractions, spliced loss, loss recovered, KL.
    Text options change the coder's training data (its held-out split is what is evaluated).
    For the parent folder of a run of several coders, each coder in turn."""
    from interp.run import EVAL_FILE, evaluate_saved, group_folders, saved_run_config
    from interp.sae import load_sae

    folders = group_folders(run_dir) or [run_dir]
    if together and len(folders) == 1:
        raise BadInput(f"--together splices every coder of a run of several; {run_dir} holds one coder")
    for folder in folders:
        trained = saved_run_config(load_sae(folder))
        evaluation = EvalConfig(**{f.name: getattr(trained, f.name) for f in dataclasses.fields(EvalConfig)})
        data, evaluation = given.apply(trained.data), given.apply(evaluation)
        metrics = evaluate_saved(folder, data, evaluation, given.apply(ModelConfig(trained.model)).device)
        typer.echo(f"evaluation of {folder} (also in {folder / EVAL_FILE}):")
        _print_metrics(metrics)
    if together:
        from interp.metrics import splice_together_metrics
        from interp.run import coder_model, heldout_token_batches

        device = given.apply(ModelConfig(trained.model)).device
        coders = [load_sae(folder, device=device) for folder in folders]
        model = coder_model(coders[0], device)
        metrics = splice_together_metrics(model, coders, heldout_token_batches(model, data, evaluation.splice_tokens))
        typer.echo(f"all {len(coders)} coders spliced in at once:")
        _print_metrics(metrics)


@app.command()
@user_errors
def info(
    model: Annotated[str, typer.Argument(help=field_docs(ModelConfig)["model"])] = ModelConfig.model,
    filter: Annotated[str | None, typer.Option("--filter", help="Only hooks whose name contains this text.")] = None,
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
# The store decides the model and the text; the comparison's --arch, --k and --seed list what varies.
@takes(
    config_options(CompareConfig, exclude=["model", "dtype", "dataset", "context_size", "arch", "seed"]),
    coder_options(exclude=["k"], path=("base",)),
)
def compare_archs(
    given: Given,
    out: Annotated[Path, typer.Option(help="Output folder: run folders, compare.json, compare.md, compare.html.")] = Path("runs/compare"),
):
    """Train several architectures on the same cached activations at matched sparsity; write a table and a figure."""
    from interp.compare import compare

    cfg = given.apply(CompareConfig())
    result = compare(cfg, out)
    typer.echo((out / "compare.md").read_text())
    typer.echo(f"wrote {out / 'compare.json'}, {out / 'compare.md'} and {out / 'compare.html'} ({len(result['runs'])} runs)")


@app.command()
@user_errors
@takes(config_options(FeatureConfig, exclude=["data"]), config_options(DataConfig, path=("data",), default_note="the coder's training data"), DEVICE)
def features(
    given: Given,
    run_dir: RunDir,
    recompute: Annotated[bool, typer.Option(help="Run the feature pass again even if RUN_DIR/features holds results.")] = False,
    out: Annotated[Path | None, typer.Option(help="Where to write the self-contained dashboard (default RUN_DIR/dashboard.html).")] = None,
    subset: Annotated[str | None, typer.Option("--features", help="Only these features in the dashboard file: ids and ranges (0-99,150) or the N densest (top100).")] = None,
    search: Annotated[str | None, typer.Option(help="Also print the features whose top tokens or logit-lens tokens contain this text.")] = None,
):
    """Collect each feature's top contexts, samples, density, histogram and logit lens (one pass, saved
    in RUN_DIR/features; a killed pass resumes when run again), and write a self-contained HTML
    dashboard for sharing (`interp serve` explores every feature of large coders). Text options
    change the coder's training data, which the pass reads by default."""
    from interp.dashboard import DASHBOARD_FILE, parse_features, write_dashboard
    from interp.features import FEATURES_DIR, run_features, search_features
    from interp.run import saved_run_config
    from interp.sae import load_sae

    coder = load_sae(run_dir, device=given.apply(ModelConfig()).device)
    cfg = given.apply(FeatureConfig(data=saved_run_config(coder).data))
    results, reused = run_features(run_dir, coder, cfg, recompute)
    if reused:
        typer.echo(f"using the feature results in {run_dir / FEATURES_DIR} ({results.n_tokens:,} tokens; --recompute to redo)")
    else:
        typer.echo(f"feature results for {results.n_tokens:,} tokens saved to {run_dir / FEATURES_DIR}")
    live = int((results.density_n > 0).sum())
    chosen = None if subset is None else parse_features(subset, results)
    path = write_dashboard(results, out or run_dir / DASHBOARD_FILE, chosen)
    shown = "" if chosen is None else f" ({len(chosen)} features chosen)"
    typer.echo(f"{live} of {results.n_latents} features fired; dashboard{shown}: {path}")
    if search is not None:
        matches = search_features(results, search)
        typer.echo(f"features matching {search!r}:" if matches else f"no feature matches {search!r}")
        for match in matches:
            top = results.logit_lens(match.feature)
            lens = " ".join(repr(t) for t, _ in top[0][:5]) if top else ""
            typer.echo(f"  {match.feature:>6}  {match.hits:>3} hits in {match.where}  density {float(results.density_n[match.feature]):.2e}  {lens}")


def _side_by_side(left: str, right: str, width: int) -> list[str]:
    a = textwrap.wrap(left.replace("\n", " ↵ "), width) or [""]
    b = textwrap.wrap(right.replace("\n", " ↵ "), width) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return [f"{x:<{width}} │ {y}" for x, y in zip(a, b)]


@app.command()
@user_errors
@takes(config_options(SteerConfig), DEVICE)
def steer(given: Given, run_dir: RunDir):
    """Generate from prompts with and without steering by features (all prompts as one batch), and print both side by side."""
    from interp.hooks import output_hook
    from interp.run import coder_model
    from interp.sae import load_sae
    from interp.steering import compare_generations

    cfg = given.apply(SteerConfig())
    coder = load_sae(run_dir, device=given.apply(ModelConfig()).device)
    interventions = cfg.interventions(coder)
    pairs = compare_generations(coder_model(coder, str(coder.W_dec.device)), cfg.prompts(), interventions, cfg.generate)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    typer.echo(f"steering feature {cfg.describe()} at {output_hook(coder)}, positions {cfg.generate.positions}")
    for pair in pairs:
        typer.echo(f"\nprompt: {pair.prompt!r}")
        for i, (base, steered) in enumerate(zip(pair.baseline, pair.steered)):
            seed = cfg.generate.seed + i
            typer.echo(f"\n{'baseline (seed ' + str(seed) + ')':<{width}} │ steered (seed {seed})")
            typer.echo("─" * width + "─┼─" + "─" * width)
            for line in _side_by_side(base, steered, width):
                typer.echo(line)


@app.command()
@user_errors
@takes(DEVICE)
def serve(
    given: Given,
    run_dirs: Annotated[list[Path], typer.Argument(help="Coder folders with feature results (`interp features` writes them).")],
    host: Annotated[str, typer.Option(help="Address to listen on; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8000,
):
    """Serve the dashboard of one or more coders from a local web server: every feature's page read
    on demand, a prompt box that shows which features fire on each token, and a steering box."""
    from interp.serve import Dashboard, make_server

    dashboard = Dashboard.open(run_dirs, device=given.apply(ModelConfig()).device)
    server = make_server(dashboard, host, port)
    typer.echo(f"serving {len(dashboard.runs)} coder(s) at http://{server.server_address[0]}:{server.server_address[1]}/ (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.server_close()


Format = Annotated[str, typer.Option("--to", help="Format to write: interp, saelens or sparsify.")]
Out = Annotated[Path, typer.Argument(help="Output folder (for sparsify, a run folder: the coder goes in OUT/<hookpoint>).")]


@app.command()
@user_errors
def export(run_dir: RunDir, out: Out, to: Format):
    """Write an interp coder as an SAE Lens or sparsify folder that the peer computes the same features
    and reconstruction from (scales folded in, unit decoder rows)."""
    from interp.interop import convert, detect_format

    if detect_format(run_dir) != "interp":
        raise BadInput(f"{run_dir} is not an interp folder (`interp convert` reads SAE Lens and sparsify folders)")
    typer.echo(f"wrote {convert(run_dir, to, out)}")


@app.command()
@user_errors
def convert(
    src: Annotated[Path, typer.Argument(help="An interp, SAE Lens or sparsify coder folder (or a sparsify run folder with --hookpoint).")],
    out: Out,
    to: Format,
    hookpoint: Annotated[str | None, typer.Option(help="The hookpoint of a sparsify run folder to read (layers.6, layers.6.mlp).")] = None,
):
    """Convert a coder folder between the interp, SAE Lens and sparsify formats."""
    from interp.interop import convert as convert_folder

    typer.echo(f"wrote {convert_folder(src, to, out, hookpoint=hookpoint)}")


@app.command("import-dictionary-learning")
@user_errors
def import_dictionary_learning(
    src: Annotated[Path, typer.Argument(help="A dictionary_learning folder: ae.pt (a pickle, read with torch's weights-only loader) and config.json.")],
    out: Out,
    to: Format = "interp",
    hook: Annotated[str | None, typer.Option(help="The TransformerLens hook it reads (default: from its submodule_name).")] = None,
    model: Annotated[str | None, typer.Option(help="The model it was trained on (default: its config's lm_name).")] = None,
):
    """Import a dictionary_learning dictionary. Its ae.pt is a pickle: only this command opens one,
    with torch's weights-only loader, which refuses anything but tensors and plain containers."""
    from interp.interop import import_dictionary_learning as import_folder

    typer.echo(f"wrote {import_folder(src, to, out, hook=hook, model=model)}")


circuit_app = typer.Typer(no_args_is_help=True, help="Circuits: task baselines, feature circuits, attribution graphs, weights-based transcoder connections.")
app.add_typer(circuit_app, name="circuit")
Coders = Annotated[list[Path], typer.Option("--coder", help="A saved coder folder (any format load_sae reads); repeat for several.")]


def _load_coders(paths: list[Path], device: str):
    """The coders in `paths` and the model they were trained on (one model for all)."""
    from interp.run import coder_model
    from interp.sae import load_sae

    coders = [load_sae(path, device=device) for path in paths]
    models = {c.cfg.model for c in coders}
    if len(models) > 1:
        raise BadInput(f"the coders were trained on different models ({', '.join(sorted(models))}); a circuit needs one model")
    return coders, coder_model(coders[0], device)


@circuit_app.command("task")
@user_errors
@takes(config_options(CircuitConfig, only=["task", "prompts", "seed"]), config_options(ModelConfig))
def circuit_task(given: Given):
    """Build a task and print how well the model does it (accuracy, mean metric clean and corrupt)."""
    from interp.circuits import baseline, build_task

    model = given.apply(ModelConfig()).load()
    cfg = given.apply(CircuitConfig())
    task = build_task(cfg.task, model.tokenizer, n=cfg.prompts, seed=cfg.seed)
    result = baseline(model, task)
    typer.echo(f"task {task.name}: {result.n} prompts of {task.clean_nt.shape[1]} tokens, roles {', '.join(task.roles)}")
    typer.echo(f"  accuracy {result.accuracy:.3f}, mean {task.metric} {result.mean_clean:.3f} clean, {result.mean_corrupt:.3f} corrupt")


@circuit_app.command("find")
@user_errors
@takes(config_options(CircuitConfig), DEVICE)
def circuit_find(
    given: Given,
    coder: Coders,
    out: Annotated[Path, typer.Option(help="Folder for circuit.json and circuit.html.")] = Path("runs/circuit"),
):
    """Find the feature circuit of a task through the given coders, spliced in together: the model's
    baseline on the task, node effects and edges on half the prompts, faithfulness and completeness
    on the other half."""
    from interp.atomic import write_json
    from interp.circuits import find_circuit
    from interp.circuits.page import write_circuit_page
    from interp.features import FEATURES_DIR, load_features
    from interp.hooks import output_hook

    coders, model = _load_coders(coder, given.apply(ModelConfig()).device)
    result = find_circuit(model, coders, given.apply(CircuitConfig()))
    write_json(out / "circuit.json", result)
    features = {output_hook(c): load_features(path) for c, path in zip(coders, coder) if (path / FEATURES_DIR).is_dir()}
    page = write_circuit_page(result, out / "circuit.html", features)
    typer.echo(result["summary"])
    typer.echo("top nodes (effect on the metric):")
    for node in result["nodes"][:15]:
        typer.echo(f"  {node['effect']:+.4f}  {node['id']}")
    typer.echo(f"wrote {out / 'circuit.json'} and {page}")


@circuit_app.command("heads")
@user_errors
@takes(config_options(HeadsConfig), config_options(ModelConfig))
def circuit_heads(
    given: Given,
    out: Annotated[Path, typer.Option(help="Folder for heads.json, heads.html and coder/ (the discretiser).")] = Path("runs/heads"),
):
    """Which attention heads a task uses, from discrete codes (O'Neill & Bui 2024): a coder shared
    by every head discretises each head's output per prompt; a head scores the codes it takes on
    clean prompts and never on corrupt ones. Checked against exact activation patching of each
    head (the reference) and path patching of edges among its strongest heads, with attribution
    patching beside it."""
    from interp.atomic import write_json
    from interp.circuits.head_codes import find_heads
    from interp.circuits.page import AGREEMENT, agreement_rows, format_score, write_heads_page

    model = given.apply(ModelConfig()).load()
    result, coder = find_heads(model, given.apply(HeadsConfig()))
    write_json(out / "heads.json", result)
    coder.save(out / "coder")
    page = write_heads_page(result, out / "heads.html")
    typer.echo(f"task {result['task']}: {result['prompts']} prompts; reference heads (exact patching): {', '.join(result['reference_heads'])}")
    for name, scores in agreement_rows(result):
        typer.echo(f"  {name}: " + ", ".join(f"{label} {format_score(scores[key])}" for key, label in AGREEMENT.items()))
    typer.echo("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items()))
    typer.echo(f"wrote {out / 'heads.json'}, {page} and {out / 'coder'}")


@circuit_app.command("evaluate")
@user_errors
@takes(config_options(TaskEvalConfig), config_options(ModelConfig))
def circuit_evaluate(
    given: Given,
    coder: Annotated[list[Path] | None, typer.Option("--coder", help="A saved coder reading the node's hook, scored beside the trained ones; repeat for several.")] = None,
    out: Annotated[Path, typer.Option(help="Folder for evaluation.json, evaluation.html and coders/ (the coders trained at the node).")] = Path("runs/evaluate"),
):
    """Score dictionaries at one node of a task's circuit (Makelov, Lange & Nanda 2024): a
    supervised dictionary from the task's attributes, each --arch trained on the task's prompts at
    the node at matched sparsity, and any --coder; sufficiency and necessity of the reconstruction,
    control by exchanging features toward a counterfactual, and each attribute's best detector F1."""
    from interp.atomic import write_json
    from interp.circuits.page import evaluation_table, format_cell, write_evaluation_page
    from interp.circuits.task_evaluation import evaluate_on_task

    model_cfg = given.apply(ModelConfig())
    coders, model = _load_coders(coder, model_cfg.device) if coder else ([], model_cfg.load())
    named = {str(path): c for path, c in zip(coder or [], coders)}
    model_name = coders[0].cfg.model if coders else model_cfg.model
    result, trained = evaluate_on_task(model, given.apply(TaskEvalConfig()), named, model_name)
    write_json(out / "evaluation.json", result)
    for arch, trained_coder in trained.items():
        trained_coder.save(out / "coders" / arch)
    page = write_evaluation_page(result, out / "evaluation.html")
    columns, rows = evaluation_table(result)
    typer.echo(f"task {result['task']} at {' '.join(result['node'])}: {result['prompts']} held-out prompts")
    for row in rows:
        typer.echo(f"  {row[0]}: " + ", ".join(f"{name} {format_cell(value)}" for name, value in zip(columns[1:], row[1:])))
    typer.echo(f"wrote {out / 'evaluation.json'}, {page} and {out / 'coders'}")


@circuit_app.command("graph")
@user_errors
@takes(config_options(GraphConfig), DEVICE)
def circuit_graph(
    given: Given,
    coder: Coders,
    out: Annotated[Path, typer.Option(help="Folder for graph.json, graph.html and circuit-tracer/ (its graph JSON).")] = Path("runs/graph"),
):
    """The attribution graph of one prompt through MLP transcoders (any subset of layers; the
    others become MLP-error nodes), under frozen attention patterns and norm scales: every edge
    exact (checked by the sum rule and by interventions), pruned by influence on the target, the
    strongest edges split by attention head."""
    from interp.atomic import write_json
    from interp.circuits.page import write_graph_page
    from interp.circuits.tracing import circuit_tracer_graph, trace
    from interp.features import FEATURES_DIR, load_features

    coders, model = _load_coders(coder, given.apply(ModelConfig()).device)
    names = [str(path) for path in coder]
    result = trace(model, coders, given.apply(GraphConfig()), coder_names=names, say=typer.echo)
    write_json(out / "graph.json", result)
    features = {name: load_features(path) for name, path in zip(names, coder) if (path / FEATURES_DIR).is_dir()}
    page = write_graph_page(result, out / "graph.html", features)
    slug = out.name or "graph"
    exported = circuit_tracer_graph(result, slug)
    write_json(out / "circuit-tracer" / f"{slug}.json", exported)
    write_json(out / "circuit-tracer" / "graph-metadata.json", {"graphs": [exported["metadata"]]})
    typer.echo(result["summary"])
    typer.echo("most influential nodes:")
    for node in [n for n in result["nodes"] if n["kind"] != "target"][:15]:
        detail = f" activation {node['activation']:.3f}" if "activation" in node else (f" {node['token']!r}" if "token" in node else "")
        typer.echo(f"  {node['influence']:.4f}  {node['id']} ({node['kind']}){detail}")
    typer.echo(f"built in {result['seconds']['build']:.1f} s; wrote {out / 'graph.json'}, {page} and {out / 'circuit-tracer'}")


@circuit_app.command("weights")
@user_errors
@takes(DEVICE)
def circuit_weights(
    given: Given,
    coder: Coders,
    feature: Annotated[int, typer.Option(help="The feature of the last --coder (the most downstream transcoder) to explain.")],
    prompt: Annotated[str | None, typer.Option(help="Also split its pre-activation on this prompt into its sources.")] = None,
    position: Annotated[int, typer.Option(help="Position in --prompt (negative counts from the end).")] = -1,
    top: Annotated[int, typer.Option(help="How many connections and tokens to print.")] = 10,
):
    """Weights-based transcoder circuits (Dunefsky et al. 2024): a transcoder feature's strongest
    upstream transcoder features (decoder . encoder through the residual stream), the tokens that
    drive it directly (de-embedding), and on a prompt the input-dependent contributions."""
    from interp.circuits.weights import (
        deembedding,
        input_dependent,
        upstream_connections,
    )
    from interp.hooks import output_hook

    coders, model = _load_coders(coder, given.apply(ModelConfig()).device)
    *upstream, target = coders
    typer.echo(f"feature {feature} of {target.cfg.hook} -> {output_hook(target)}")
    typer.echo("strongest input-invariant connections (W_dec[i] . v_j):")
    for c in upstream_connections(model, upstream, target, feature, top):
        typer.echo(f"  {c.weight:+.4f}  {upstream[c.coder].cfg.hook} feature {c.feature}")
    typer.echo("de-embedding (tokens driving it directly):")
    typer.echo("  " + "  ".join(f"{model.tokenizer.decode([t])!r} {v:+.3f}" for t, v in deembedding(model, target, feature, top)))
    if prompt is not None:
        tokens = model.to_tokens(prompt)[0]
        where = position % len(tokens)
        parts = input_dependent(model, upstream, target, feature, tokens, where)
        typer.echo(f"on {prompt!r} at position {where} ({model.tokenizer.decode([int(tokens[where])])!r}): pre-activation {parts.pre_activation:+.4f} =")
        items = [(f"{upstream[i].cfg.hook} feature {k}", v) for (i, k), v in parts.features.items()] + list(parts.rest.items())
        for name, value in sorted(items, key=lambda item: -abs(item[1]))[:top]:
            typer.echo(f"  {value:+.4f}  {name}")
