"""Which attention heads a task uses, from discrete codes (O'Neill & Bui 2024, "Sparse Autoencoders
Enable Scalable and Reliable Circuit Identification in Language Models"), checked against exact
activation patching, with attribution patching beside it.

The code method, as the paper's code (charlieoneill11/sae-circuits) does it:
- positives are the task's clean prompts (the model predicts the answer), negatives its corrupt
  ones (it cannot); each head's output is averaged over a prompt's positions (BOS included);
- one coder is shared by every head of every layer, trained by interp's trainer on the heads'
  vectors of a few prompts drawn from positives and negatives together (the paper: 10);
- a head's code on a prompt is the latent of largest activation (-1 when none fires: the paper's
  argmax would call that latent 0);
- a head's score is the number of codes it takes on positives and never on negatives; an edge
  (h1, h2)'s score is the number of code pairs the two take together on positives and never on
  negatives.
What differs from the paper: the head's vector is `hook_z` (its d_head mixture of values, before
W_O) by default, as this issue asks; `space="result"` takes z @ W_O[h], the paper's d_model
`hook_result`. The coder is any family interp trains (the paper's is a ReLU SAE with an L1
penalty, a family interp does not train); `codebook` with k = 1 is a discretiser by construction.

The reference, as ground truth for SmolLM2 is not published, is exact patching
(`interp.circuits.head_effects`): a head's effect is the metric's change with its z alone patched
from the corrupt prompts, and the reference circuit is the heads whose |effect| reaches
`reference_share` of the clean-corrupt gap; edges among its strongest heads come from path
patching. Attribution patching estimates both, for query heads and for key/value heads (whose
keys and values several query heads read), and is scored beside the codes.
Scores are compared with the reference by ROC-AUC, by precision, recall and F1 at the cut that
keeps as many heads as the reference has, and by the paper's "F1", 2 TPR (1 - FPR) / (TPR + 1 -
FPR), at its best threshold (it is not a precision/recall F1; both are reported, named so).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from interp.circuits.head_effects import (
    KINDS,
    attribution_effects,
    edge_attribution_effects,
    head_acts,
    heads_of,
    patching_effects,
    path_patching_effects,
)
from interp.circuits.tasks import Task, TaskConfig, baseline, build_task, check_model_does_task
from interp.errors import BadInput, check_positive
from interp.sae import create_coder
from interp.sae.base import SparseCoder
from interp.train import train_in_memory

SPACES = ("z", "result")


@dataclass
class HeadsConfig(TaskConfig):
    """Clean prompts are the positives, corrupt ones the negatives; the seed also draws the
    coder's training prompts and starts its training."""

    train_prompts: int = 10
    """Prompts drawn from positives and negatives together whose heads' vectors train the coder."""
    space: str = "z"
    """A head's vector: its hook_z ("z", d_head) or its output z @ W_O[h] ("result", d_model, the paper's)."""
    arch: str = "codebook"
    """The coder family that discretises the heads' vectors (any family interp trains)."""
    latents: int = 200
    """The coder's latents (the paper: 200)."""
    k: int = 1
    """Active latents per vector (codes summed, for a codebook)."""
    steps: int = 500
    """Full-batch training steps (the paper: 500)."""
    reference_share: float = 0.05
    """A head belongs to the reference circuit when patching it alone moves the metric by this share of the clean-corrupt gap."""
    edge_heads: int = 8
    """Edges are path-patched (their reference) among this many of the reference's strongest heads."""

    def __post_init__(self):
        super().__post_init__()
        if self.space not in SPACES:
            raise BadInput(f"unknown space {self.space!r}; choose one of {', '.join(SPACES)}")
        for name in ("train_prompts", "latents", "k", "steps", "edge_heads"):
            check_positive(name, getattr(self, name))
        if self.train_prompts > 2 * self.prompts:
            raise BadInput(f"train_prompts ({self.train_prompts}) cannot exceed the {2 * self.prompts} positive and negative prompts")
        if not 0 < self.reference_share < 1:
            raise BadInput(f"reference_share must be between 0 and 1, got {self.reference_share}")


def head_names(model) -> list[str]:
    return [f"L{layer}H{head}" for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]


# --- the heads' activations ---------------------------------------------------------------------

def head_vectors(model, z_lnthd: torch.Tensor, space: str) -> torch.Tensor:
    """(prompts, layers x heads, d): each head's vector per prompt, averaged over positions."""
    mean_lnhd = z_lnthd.mean(2)
    if space == "result":
        mean_lnhd = torch.einsum("lnhd,lhdm->lnhm", mean_lnhd, model.W_O.detach().to(mean_lnhd))
    n_layers, n, n_heads, d = mean_lnhd.shape
    return mean_lnhd.permute(1, 0, 2, 3).reshape(n, n_layers * n_heads, d)


# --- the code method ----------------------------------------------------------------------------

def train_head_coder(vectors_rd: torch.Tensor, cfg: HeadsConfig, space_key: str) -> SparseCoder:
    """One coder for every head's vectors `vectors_rd`, trained full-batch by interp's trainer
    (seconds: its checkpoints go to a scratch folder)."""
    torch.manual_seed(cfg.seed)
    options = {} if cfg.arch == "jumprelu" else {"k": min(cfg.k, cfg.latents)}
    coder = create_coder(cfg.arch, d_in=vectors_rd.shape[1], n_latents=cfg.latents, hook=space_key, **options)
    return train_in_memory(coder, {space_key: vectors_rd}, len(vectors_rd), cfg.steps, cfg.seed)


@torch.no_grad()
def head_codes(coder: SparseCoder, vectors_nhd: torch.Tensor) -> torch.Tensor:
    """(prompts, heads) int64: the latent of largest activation of each head's vector, -1 if none fires."""
    n, h, d = vectors_nhd.shape
    code = coder.encode(vectors_nhd.reshape(n * h, d).float())
    best = code.values_bk.argmax(1, keepdim=True)
    latent = code.indices_bk.gather(1, best)[:, 0]
    fired = code.values_bk.gather(1, best)[:, 0] > 0
    return torch.where(fired, latent, torch.full_like(latent, -1)).view(n, h)


def node_scores(codes_pos_nh: torch.Tensor, codes_neg_nh: torch.Tensor) -> torch.Tensor:
    """(heads,): how many codes each head takes on positives and never on negatives."""
    scores = torch.zeros(codes_pos_nh.shape[1])
    for head in range(codes_pos_nh.shape[1]):
        positive, negative = set(codes_pos_nh[:, head].tolist()), set(codes_neg_nh[:, head].tolist())
        scores[head] = len(positive - negative)
    return scores


def edge_scores(codes_pos_nh: torch.Tensor, codes_neg_nh: torch.Tensor, pairs: list[tuple[int, int]], n_codes: int) -> torch.Tensor:
    """(pairs,): how many code pairs each head pair (h1, h2) takes together on positives and never
    on negatives. Codes are -1..n_codes-1."""
    if not pairs:
        return torch.zeros(0)
    first = torch.tensor([a for a, _ in pairs])
    second = torch.tensor([b for _, b in pairs])
    base = n_codes + 1
    index = torch.arange(len(pairs))

    def keys(codes_nh):
        combined_np = (codes_nh[:, first] + 1) * base + (codes_nh[:, second] + 1)
        return torch.unique(index * base * base + combined_np)

    positive, negative = keys(codes_pos_nh), keys(codes_neg_nh)
    only = positive[~torch.isin(positive, negative)]
    return torch.bincount(only // (base * base), minlength=len(pairs)).float()


# --- scoring against the reference --------------------------------------------------------------

def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float | None:
    """The probability that a positive outranks a negative, ties counted half (Mann-Whitney);
    None when the reference holds every head or none."""
    positive, negative = scores[labels], scores[~labels]
    if len(positive) == 0 or len(negative) == 0:
        return None
    greater = (positive[:, None] > negative[None]).float().sum()
    ties = (positive[:, None] == negative[None]).float().sum()
    return float((greater + 0.5 * ties) / (len(positive) * len(negative)))


def agreement(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """How a score finds the reference: ROC-AUC; precision, recall and F1 keeping as many top
    heads as the reference holds; the best precision/recall F1 and the best of the paper's
    2 TPR (1 - FPR) / (TPR + 1 - FPR) over every threshold."""
    n_true = int(labels.sum())
    order = scores.argsort(descending=True, stable=True)
    kept = torch.zeros_like(labels)
    kept[order[:n_true]] = True
    hits = int((kept & labels).sum())
    precision = recall = hits / n_true if n_true else 0.0
    best_f1 = best_paper = 0.0
    for threshold in scores.unique():
        chosen = scores >= threshold
        tp = int((chosen & labels).sum())
        fp = int((chosen & ~labels).sum())
        tpr, fpr = tp / max(n_true, 1), fp / max(int((~labels).sum()), 1)
        p = tp / max(int(chosen.sum()), 1)
        if p + tpr:
            best_f1 = max(best_f1, 2 * p * tpr / (p + tpr))
        if tpr + 1 - fpr:
            best_paper = max(best_paper, 2 * tpr * (1 - fpr) / (tpr + 1 - fpr))
    return {"roc_auc": roc_auc(scores, labels), "precision_at_n": precision, "recall_at_n": recall,
            "f1_at_n": precision, "best_f1": best_f1, "best_paper_f1": best_paper}


# --- everything in one call ---------------------------------------------------------------------

def find_heads(model, cfg: HeadsConfig, task: Task | None = None, progress: bool = True) -> tuple[dict, SparseCoder]:
    """The code method, the exact-patching reference and attribution patching on one task, their
    agreement and runtimes (heads.json's content), and the coder that made the codes."""
    task = task or build_task(cfg.task, model.tokenizer, n=cfg.prompts, seed=cfg.seed)
    base = baseline(model, task)
    check_model_does_task(base, task, cfg.min_accuracy)
    names = head_names(model)
    seconds = {}

    start = time.perf_counter()
    # every kind in the pass the codes need: attribution patching reads the key and value heads too
    clean_acts, corrupt_acts = head_acts(model, task.clean_nt, KINDS), head_acts(model, task.corrupt_nt, KINDS)
    z_clean, z_corrupt = clean_acts["z"], corrupt_acts["z"]
    positive, negative = head_vectors(model, z_clean, cfg.space), head_vectors(model, z_corrupt, cfg.space)
    drawn = torch.randperm(2 * len(task), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train_prompts]
    both = torch.cat([positive, negative])
    coder = train_head_coder(both[drawn].reshape(-1, both.shape[-1]), cfg, f"heads.hook_{cfg.space}")
    codes_pos, codes_neg = head_codes(coder, positive), head_codes(coder, negative)
    code_nodes = node_scores(codes_pos, codes_neg)
    seconds["codes"] = time.perf_counter() - start

    start = time.perf_counter()
    attribution = attribution_effects(model, task, clean_acts, corrupt_acts)
    seconds["attribution"] = time.perf_counter() - start

    start = time.perf_counter()
    with tqdm(total=len(names), desc="patching heads", disable=not progress) as bar:
        exact = patching_effects(model, task, base.mean_clean, z_corrupt, progress=bar.update)
    seconds["patching"] = time.perf_counter() - start

    gap = base.mean_clean - base.mean_corrupt
    labels = exact.abs() >= cfg.reference_share * abs(gap)
    strongest = [int(h) for h in exact.abs().argsort(descending=True)[: min(cfg.edge_heads, int(labels.sum()))]]
    pairs = sorted((a, b) for a in strongest for b in strongest
                   if a // model.cfg.n_heads < b // model.cfg.n_heads)
    start = time.perf_counter()
    with tqdm(total=len(pairs), desc="path patching", disable=not progress) as bar:
        path = path_patching_effects(model, task, base.mean_clean, z_clean, z_corrupt, pairs, progress=bar.update)
    seconds["path_patching"] = time.perf_counter() - start
    start = time.perf_counter()
    edge_attribution = edge_attribution_effects(model, task, z_clean, z_corrupt, pairs)
    seconds["edge_attribution"] = time.perf_counter() - start
    code_edges = edge_scores(codes_pos, codes_neg, pairs, cfg.latents)
    edge_labels = path.abs() >= cfg.reference_share * abs(gap)

    n_kv = heads_of(model, "k")
    result = {
        "config": asdict(cfg), "task": task.name, "prompts": len(task), "heads": names,
        "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads, "n_kv_heads": n_kv,
        "baseline": asdict(base), "reference_heads": [names[h] for h in labels.nonzero()[:, 0].tolist()],
        "exact_effect": exact.tolist(), "attribution_effect": attribution["z"].tolist(), "code_score": code_nodes.tolist(),
        "kv_heads": [f"L{layer}KV{head}" for layer in range(model.cfg.n_layers) for head in range(n_kv)],
        "kv_attribution_effect": {kind: attribution[kind].tolist() for kind in ("k", "v")},
        "distinct_codes": int(torch.unique(torch.cat([codes_pos, codes_neg])).numel()),
        "nodes": {"codes": agreement(code_nodes, labels), "attribution": agreement(attribution["z"].abs(), labels)},
        "edges": {
            "pairs": [[names[a], names[b]] for a, b in pairs], "path_effect": path.tolist(),
            "attribution_effect": edge_attribution.tolist(),
            "code_score": code_edges.tolist(), "reference": [bool(x) for x in edge_labels],
        },
        "seconds": seconds,
    }
    if pairs:
        result["edges"]["codes"] = agreement(code_edges, edge_labels)
        result["edges"]["attribution"] = agreement(edge_attribution.abs(), edge_labels)
    return result, coder
