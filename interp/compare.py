"""Train several architectures on the same cached activations at matched sparsity, and compare.

Every (architecture, k, seed) is one `train_run` on the same activation store with the same
width, tokens, batch size and schedule; k is the sparsity budget (exactly k latents per token for
TopK and g-SAE, k per token on average for the batch-level coders). Each run is evaluated on the
same held-out text, so the table's mean L0 says how well the budgets were matched at inference.

With `max_norm_ratio`, the token-norm bound is computed once from the store and shared by every
run, so all of them are trained and evaluated on the same tokens.

All runs are trained first, then evaluated together: the held-out activations and the clean and
zero-ablated model passes, which every run shares, are computed once.

The output folder holds one run folder per training run (a finished run is read back, not
retrained, so an interrupted comparison continues where it stopped), `compare.json` (every run's
metrics and the per-(k, architecture) means), `compare.md` (the table) and `compare.html` (a
self-contained plotly figure).

Besides the held-out metrics, each run gets (computed once, kept in `extra.json`, so runs
evaluated before these existed are reused): its FVU under the batch allocation it trained with
(batch-level coders only, on the held-out tokens in batches of the training batch size), and its
steering effect (`interp.steering_effect`: KL per unit of added norm and the rise of the
features' logit-lens tokens, over a seeded sample of live features, at one norm for every run).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from interp.activation_store import read_manifest
from interp.atomic import write_json
from interp.errors import BadInput
from interp.hooks import coder_hooks
from interp.metrics import reconstruction_metrics, splice_metrics_many
from interp.run import (
    EVAL_FILE,
    RunConfig,
    heldout_activations,
    heldout_token_batches,
    train_run,
)
from interp.sae import coder_class, load_sae
from interp.sae.batchtopk import BatchTopKSAE
from interp.steering_effect import SteeringEffectConfig, live_features, steering_effect
from interp.train import CHECKPOINT, TrainConfig, norm_bound

COLUMNS = {
    "fvu": "FVU",
    "fvu_allocation": "FVU, batch allocation",
    "l0": "mean L0",
    "dead_frac": "dead frac",
    "loss_recovered": "loss recovered",
    "kl": "KL",
    "kl_per_norm": "steer KL / norm",
    "lens_rise": "steer lens rise",
    "train_tokens_per_s": "train tok/s",
}
"""Metric key -> column title, in table order."""
SPEED_FILE = "train_speed.json"
EXTRA_FILE = "extra.json"
LOWER_IS_BETTER = {"fvu": True, "dead_frac": True, "kl": True, "loss_recovered": False, "kl_per_norm": False, "lens_rise": False}


@dataclass
class CompareConfig:
    base: RunConfig = field(default_factory=lambda: RunConfig(hooks=[], train=TrainConfig(eval_every=0)))
    """Settings every run shares; `activations` must name a store (from `interp cache`), whose model is used and whose first hook is the default (no --hook)."""
    archs: list[str] = field(default_factory=lambda: ["topk", "batchtopk", "mutual_choice", "feature_choice", "gradient"], metadata={"flag": "arch"})
    """Architecture to compare; repeat for several."""
    ks: list[int] = field(default_factory=lambda: [16, 48], metadata={"flag": "k"})
    """Sparsity budget k (active latents per token, on average for batch-level coders); repeat for several."""
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"flag": "seed"})
    """Training seed; repeat for several (the ranking is checked for agreement across them)."""
    steering: SteeringEffectConfig = field(default_factory=SteeringEffectConfig)
    """How each run's steering effect is measured."""


def run_name(arch: str, k: int, seed: int) -> str:
    return f"{arch}-k{k}-s{seed}"


def compare(cfg: CompareConfig, out: str | Path, progress: bool = True) -> dict:
    """Train (or read back) every run, evaluate them together, then write compare.json,
    compare.md and compare.html."""
    if not cfg.base.activations:
        raise BadInput("a comparison trains every architecture on the same cached activations: pass --activations")
    unknown = set(cfg.base.coder_options) - set().union(*(option_names(arch) for arch in cfg.archs))
    if unknown:
        raise BadInput(f"options {sorted(unknown)} belong to none of the compared architectures {cfg.archs}")
    manifest = read_manifest(Path(cfg.base.activations))
    # Every run trains on the store's model and hook, and is evaluated on the text it was made from.
    base = replace(
        copy.deepcopy(cfg.base), model=manifest.model, hooks=cfg.base.hooks or manifest.hooks[:1],
        data=replace(cfg.base.data, dataset=manifest.dataset, context_size=manifest.context_size),
    )
    bound = None
    if base.train.max_norm_ratio is not None:
        # One bound for every run (from the store's first shard), so that all runs cover the same
        # tokens and share the clean and zero-ablated passes.
        first_shard = load_file(Path(base.activations) / manifest.shards[0]["file"])
        bound = norm_bound(first_shard[base.hook], base.train.max_norm_ratio)
    out = Path(out)
    keys = [(arch, k, seed) for k in cfg.ks for arch in cfg.archs for seed in cfg.seeds]
    folders = {key: out / "runs" / run_name(*key) for key in keys}
    for key in keys:
        if not (folders[key] / SPEED_FILE).exists():
            _train(base, *key, folders[key], bound, progress)
    pending = [folders[key] for key in keys if not (folders[key] / EVAL_FILE).exists()]
    if pending:
        evaluate_together(base, pending, progress)
    pending = [folder for folder in folders.values() if not (folder / EXTRA_FILE).exists()]
    if pending:
        evaluate_extra(base, cfg.steering, pending, progress)
    runs = []
    for (arch, k, seed), folder in folders.items():
        metrics = json.loads((folder / EVAL_FILE).read_text()) | json.loads((folder / EXTRA_FILE).read_text())
        runs.append({"arch": arch, "k": k, "seed": seed, **{key: metrics[key] for key in COLUMNS}})
    summary = summarize(runs, cfg)
    result = {"settings": asdict(replace(cfg, base=base)), "runs": runs, **summary}
    write_json(out / "compare.json", result)
    (out / "compare.md").write_text(markdown_table(result))
    write_figure(result, out / "compare.html")
    return result


def option_names(arch: str) -> set[str]:
    return {f.name for f in fields(coder_class(arch).config_class)}


def _train(base: RunConfig, arch: str, k: int, seed: int, run_dir: Path, bound: float | None, progress: bool) -> None:
    # An architecture-specific option (say g-SAE's beta) goes to the architectures that have it.
    options = {name: v for name, v in base.coder_options.items() if name in option_names(arch)}
    cfg = replace(copy.deepcopy(base), arch=arch, coder_options={**options, "k": k}, train=replace(base.train, seed=seed))
    resume = (run_dir / CHECKPOINT).exists()  # a comparison killed mid-run continues it
    metrics = train_run(cfg, run_dir, resume=resume, progress=progress, evaluate=False, max_input_norm=bound)[2]
    write_json(run_dir / SPEED_FILE, metrics)


def evaluate_together(base: RunConfig, run_dirs: list[Path], progress: bool) -> None:
    """Held-out metrics of several coders of one hook: the model, the held-out activations and
    the clean and zero-ablated passes are computed once for all of them."""
    coders = [load_sae(folder, device=base.device) for folder in run_dirs]
    model = base.load()
    heldout = heldout_activations(model, base.data, coder_hooks(coders[0]), base.eval_tokens)
    spliced = splice_metrics_many(model, coders, heldout_token_batches(model, base.data, base.splice_tokens), progress)
    for folder, coder, splice in zip(run_dirs, coders, spliced):
        metrics = {**reconstruction_metrics(coder, heldout), **splice, **json.loads((folder / SPEED_FILE).read_text())}
        coder.meta["eval"] = metrics
        coder.save(folder)
        write_json(folder / EVAL_FILE, metrics)


def evaluate_extra(base: RunConfig, steering: SteeringEffectConfig, run_dirs: list[Path], progress: bool) -> None:
    """Allocation FVU and steering effect of each run (see the module docstring), into extra.json."""
    coders = [load_sae(folder, device=base.device) for folder in run_dirs]
    model = base.load()
    heldout = heldout_activations(model, base.data, coder_hooks(coders[0]), base.eval_tokens)
    hook, size = coders[0].cfg.hook, base.train.batch_size
    x_nd = torch.cat([batch[hook] for batch in heldout])
    whole = [{hook: x_nd[i:i + size]} for i in range(0, len(x_nd) - size + 1, size)]
    if not whole:
        raise BadInput(f"the {len(x_nd)} held-out tokens (--eval-tokens) do not fill one training batch of {size}")
    strength = steering.steer_strength_ratio * float(x_nd.norm(dim=1).mean())
    batches = heldout_token_batches(model, base.data, steering.steer_tokens)
    for folder, coder in zip(tqdm(run_dirs, desc="steering and allocation", disable=not progress, leave=False), coders):
        fvu_allocation = (reconstruction_metrics(coder, whole, allocation=True)["fvu"] if isinstance(coder, BatchTopKSAE)
                          else float("nan"))
        features = live_features(coder, heldout, steering.steer_features, steering.steer_seed)
        effect = steering_effect(model, coder.eval(), batches, features, strength, steering.steer_lens_tokens)
        write_json(folder / EXTRA_FILE, {"fvu_allocation": fvu_allocation, **effect})


def summarize(runs: list[dict], cfg: CompareConfig) -> dict:
    """Mean and spread over seeds per (k, arch); per k and metric, whether every seed ranks the
    architectures in the same order."""
    rows = []
    for k in cfg.ks:
        for arch in cfg.archs:
            mine = [r for r in runs if r["k"] == k and r["arch"] == arch]
            row = {"k": k, "arch": arch}
            for key in COLUMNS:
                values = [r[key] for r in mine]
                row[key] = statistics.fmean(values)
                row[f"{key}_spread"] = max(values) - min(values)
            rows.append(row)
    stable = {}
    for k in cfg.ks:
        for key, lower in LOWER_IS_BETTER.items():
            orders = set()
            for seed in cfg.seeds:
                scored = {r["arch"]: r[key] for r in runs if r["k"] == k and r["seed"] == seed and not math.isnan(r[key])}
                orders.add(tuple(sorted(scored, key=scored.get, reverse=not lower)))
            stable[f"k{k}:{key}"] = len(orders) == 1
    return {"table": rows, "ranking_stable_across_seeds": stable}


def markdown_table(result: dict) -> str:
    seeds = result["settings"]["seeds"]
    header = "| k | architecture | " + " | ".join(COLUMNS.values()) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for row in result["table"]:
        cells = []
        for key in COLUMNS:
            if key == "train_tokens_per_s":
                cells.append(f"{row[key]:,.0f}")
            elif math.isnan(row[key]):
                cells.append("-")
            else:
                cells.append(f"{row[key]:.4f} ± {row[key + '_spread'] / 2:.4f}")
        lines.append(f"| {row['k']} | {row['arch']} | " + " | ".join(cells) + " |")
    stable = result["ranking_stable_across_seeds"]
    lines.append("")
    lines.append(f"Means over seeds {seeds}; ± is half the range across seeds.")
    lines.append("Ranking identical across seeds: " + ", ".join(f"{key} {'yes' if ok else 'no'}" for key, ok in stable.items()))
    return "\n".join(lines) + "\n"


def write_figure(result: dict, path: Path) -> None:
    """One panel per metric, architectures grouped by k, error bars spanning the seeds."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    keys = list(COLUMNS)
    fig = make_subplots(rows=3, cols=3, subplot_titles=[COLUMNS[key] for key in keys])
    ks = result["settings"]["ks"]
    for index, key in enumerate(keys):
        for k_index, k in enumerate(ks):
            rows = [row for row in result["table"] if row["k"] == k]
            fig.add_trace(
                go.Bar(
                    x=[row["arch"] for row in rows], y=[row[key] for row in rows], name=f"k={k}",
                    legendgroup=f"k={k}", showlegend=index == 0, marker_color=["#1f77b4", "#ff7f0e", "#2ca02c"][k_index % 3],
                    error_y={"type": "data", "array": [row[f"{key}_spread"] / 2 for row in rows]},
                ),
                row=index // 3 + 1, col=index % 3 + 1,
            )
    base = result["settings"]["base"]
    fig.update_layout(
        barmode="group", height=1000, width=1200,
        title=f"{base['model']} {(base.get('hooks') or [base.get('hook')])[0]}: sparse coders at matched sparsity ({base['train']['tokens']:,} training tokens)",
    )
    fig.write_html(path, include_plotlyjs=True)
