"""Sparse coders judged by a task whose mechanism is known (Makelov, Lange & Nanda 2024, "Towards
Principled Evaluations of Sparse Autoencoders for Interpretability and Control"), against a
supervised dictionary built from the task's attributes (`interp.circuits.supervised`).

A node is one activation of the circuit: a hook (what a coder reads, for example a layer's
`hook_z`) at one role's position (END by default, where IOI's name movers and S-inhibition heads
write). Every dictionary, supervised or learned, is scored on held-out prompts on three axes:

- approximation. Sufficiency: the metric with the node replaced by its reconstruction,
  (m_recon - m_mean) / (m_clean - m_mean), where m_mean replaces the node by its mean over the
  fitting prompts (1: as good as the activation, 0: no better than its mean). Necessity: the
  metric with the reconstruction's part taken out and its mean put back (a - a_hat + E[a_hat]),
  (m_clean - m_without) / (m_clean - m_mean) (1: what the dictionary explains is all that matters).
- control. For each attribute a counterfactual prompt differs in its value alone (IOI: another
  IO name, another S name, or the IO and S1 tokens swapped, which flips the order), and LD' is
  the logit difference the change should move (the new IO against S; IO against the new S; for
  the order, S against IO: the name movers, sent to the other position, would copy S). The
  target is the node's whole activation patched from the counterfactual, the most an edit at
  this node can do; the node is edited instead by exchanging features (supervised: u[A, old]
  out, u[A, new] in, two features; a learned coder: the `size` latents whose contribution
  changes most between the prompt and its counterfactual, moved to the counterfactual's values,
  the reconstruction error kept). Success is the share of the patch's effect the edit reaches,
  (mean LD'_edit - mean LD'_prompt) / (mean LD'_patched - mean LD'_prompt), at each edit size;
  it is left out (None) where the patch itself moves LD' by less than `MIN_PATCH_EFFECT`: the
  attribute is not used at this node.
- interpretability. Each latent, active or not, as a detector of each attribute value: its
  precision, recall and F1; an attribute's score is the mean over its values of the best F1 of
  any latent. Occlusion shows when one attribute has no detector (best F1 < 0.5) while another
  has good ones (>= 0.8); over-splitting when a value's precise detectors (precision >= 0.8,
  recall >= 0.05, among the latents that detect this value better than any other) number two or
  more on average.

What differs from the paper: nodes are whole hooks at one position, as interp's coders read them
(the paper's are single heads at their positions, several at once); the supervised dictionary is
the least-squares fit, not the conditional means; the learned coders are trained on the task's
prompts at the node by interp's trainer at one k for every family, and any saved coder reading
the node's hook is scored beside them.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from interp.circuits.supervised import SupervisedDictionary
from interp.circuits.tasks import Task, TaskConfig, baseline, build_task, check_model_does_task
from interp.errors import BadInput, check_positive
from interp.hooks import capture, check_coder_fits, grad_key, patched_logits
from interp.sae import coder_class, create_coder
from interp.sae.base import SparseCoder
from interp.train import train_in_memory

EDIT_SIZES = (1, 2, 4, 8, 16)
FAMILIES = ["topk", "batchtopk", "mutual_choice", "feature_choice", "gradient", "codebook"]
CONTROLLED = ("IO", "S", "order")
MIN_PATCH_EFFECT = 0.1
"""Nats of LD' below which patching the node from the counterfactual counts as no effect."""


@dataclass
class TaskEvalConfig(TaskConfig):
    """`prompts` are the held-out prompts every dictionary is scored on; `fit_prompts` others
    (built with seed + 1) fit the supervised dictionary and train the coders."""

    hook: str = ""
    """The node's hook; by default the hook the given coders read."""
    role: str = "END"
    """The node's position: a role of the task (IOI: IO, S1, S2, END)."""
    fit_prompts: int = 2048
    """Prompts that fit the supervised dictionary and train the coders."""
    archs: list[str] = field(default_factory=lambda: list(FAMILIES), metadata={"flag": "arch"})
    """Coder families trained at the node (none with --arch none: score only the given coders)."""
    latents: int = 256
    """Latents of each trained coder."""
    k: int = 8
    """Active latents per activation of each trained coder (matched sparsity)."""
    steps: int = 1500
    """Training steps of each trained coder."""
    batch_size: int = 256
    """Rows per training step."""

    def __post_init__(self):
        super().__post_init__()
        if self.archs == ["none"]:
            self.archs = []
        for arch in self.archs:
            if not coder_class(arch).trainable:
                raise BadInput(f"architecture {arch!r} cannot be trained at a node; choose from {', '.join(FAMILIES)}")
        for name in ("fit_prompts", "latents", "k", "steps", "batch_size"):
            check_positive(name, getattr(self, name))


# --- the task's attributes and counterfactuals ----------------------------------------------------

def ioi_attributes(task: Task) -> dict[str, torch.Tensor]:
    """{attribute: (prompts,)}: IO and S as token ids, order 1 where the IO comes first (ABB)."""
    rows = torch.arange(len(task))
    return {"IO": task.clean_nt[rows, task.roles["IO"]], "S": task.clean_nt[rows, task.roles["S1"]],
            "order": (task.roles["IO"] < task.roles["S1"]).long()}


ATTRIBUTES = {"ioi": ioi_attributes}


def attributes_of(task: Task) -> dict[str, torch.Tensor]:
    if task.name not in ATTRIBUTES:
        raise BadInput(f"task {task.name!r} has no attributes defined; the evaluation is defined for {', '.join(ATTRIBUTES)}")
    return ATTRIBUTES[task.name](task)


@dataclass
class Counterfactual:
    attribute: str
    tokens_nt: torch.Tensor
    """The prompts with the attribute's value changed."""
    answer_n: torch.Tensor
    """LD' = logit(answer) - logit(wrong), what the change of value should raise."""
    wrong_n: torch.Tensor
    new_n: torch.Tensor
    """The attribute's new value on each prompt."""


def counterfactual(task: Task, attribute: str, seed: int) -> Counterfactual:
    """IOI prompts with the IO name (at the IO position) or the S name (at S1 and S2) replaced by
    another name of the task, drawn with `seed`, that is neither of the prompt's; or with the IO
    and S1 tokens swapped (the order flipped, the names kept)."""
    if attribute not in CONTROLLED:
        raise BadInput(f"no counterfactual is defined for attribute {attribute!r}; choose one of {', '.join(CONTROLLED)}")
    values = ioi_attributes(task)
    tokens = task.clean_nt.clone()
    rows = torch.arange(len(task))
    if attribute == "order":
        tokens[rows, task.roles["IO"]], tokens[rows, task.roles["S1"]] = values["S"], values["IO"]
        return Counterfactual(attribute, tokens, values["S"], values["IO"], 1 - values["order"])
    names = sorted(set(values["IO"].tolist()) | set(values["S"].tolist()))
    rng = random.Random(seed)
    new = torch.tensor([rng.choice([t for t in names if t not in (io, s)])
                        for io, s in zip(values["IO"].tolist(), values["S"].tolist())])
    if attribute == "IO":
        tokens[rows, task.roles["IO"]] = new
        return Counterfactual(attribute, tokens, new, values["S"], new)
    tokens[rows, task.roles["S1"]] = new
    tokens[rows, task.roles["S2"]] = new
    return Counterfactual(attribute, tokens, values["IO"], new, new)


def logit_diff_n(logits_ntv: torch.Tensor, answer_n: torch.Tensor, wrong_n: torch.Tensor) -> torch.Tensor:
    last = logits_ntv[:, -1].float()
    rows = torch.arange(len(last))
    return last[rows, answer_n.to(last.device)] - last[rows, wrong_n.to(last.device)]


# --- the node -------------------------------------------------------------------------------------

def node_mask(tokens_nt: torch.Tensor, positions_n: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(tokens_nt, dtype=torch.bool)
    mask[torch.arange(len(tokens_nt)), positions_n] = True
    return mask


PASS_PROMPTS = 128
"""Prompts per forward pass when capturing a node over many prompts (a pass to the logits holds
prompts x positions x vocabulary floats)."""


def node_acts(model, tokens_nt: torch.Tensor, hook: str, positions_n: torch.Tensor) -> torch.Tensor:
    """(prompts, d): the node's activation on each prompt."""
    return torch.cat([capture(model, tokens_nt[i : i + PASS_PROMPTS], [hook], node_mask(tokens_nt[i : i + PASS_PROMPTS], positions_n[i : i + PASS_PROMPTS]))[hook]
                      for i in range(0, len(tokens_nt), PASS_PROMPTS)])


def node_grads(model, task: Task, hook: str, positions_n: torch.Tensor) -> torch.Tensor:
    """(prompts, d): the gradient of the mean metric over all the prompts at the node (what the
    gradient family selects by)."""
    grads = []
    for i in range(0, len(task), PASS_PROMPTS):
        part = task.subset(slice(i, i + PASS_PROMPTS))
        acts = capture(model, part.clean_nt, [hook], node_mask(part.clean_nt, positions_n[i : i + PASS_PROMPTS]), with_grads=True,
                       objective=lambda logits, p=part: p.metric_n(logits).sum() / len(task))
        grads.append(acts[grad_key(hook)])
    return torch.cat(grads)


@torch.no_grad()
def with_node(model, tokens_nt: torch.Tensor, hook: str, positions_n: torch.Tensor, value_nd: torch.Tensor | None) -> torch.Tensor:
    """(prompts, 1, vocab): the last position's logits with the node set to `value_nd` (the rest
    of the pass recomputed), or of the plain model where `value_nd` is None."""
    last = []
    for i in range(0, len(tokens_nt), PASS_PROMPTS):
        tokens = tokens_nt[i : i + PASS_PROMPTS]
        if value_nd is None:
            last.append(model(tokens.to(model.cfg.device))[:, -1:])
            continue
        rows, value = torch.arange(len(tokens)), value_nd[i : i + PASS_PROMPTS]

        def patch(act, rows=rows, value=value, positions=positions_n[i : i + PASS_PROMPTS]):
            act = act.clone()
            act[rows, positions] = value.to(act).view(len(rows), *act.shape[2:])
            return act

        last.append(patched_logits(model, tokens, {hook: patch})[:, -1:])
    return torch.cat(last)


# --- dictionaries as the evaluation sees them ---------------------------------------------------

class Supervised:
    """The supervised dictionary: features from the attributes, never from the activation."""

    name = "supervised"

    def __init__(self, dictionary: SupervisedDictionary):
        self.dictionary = dictionary

    def reconstruct(self, acts_nd, attributes):
        return self.dictionary.reconstruct(attributes).to(acts_nd)

    def active(self, acts_nd, attributes):
        return self.dictionary.active(attributes)

    def edits(self, acts_nd, cf_acts_nd, attributes, cf: Counterfactual) -> dict[int, torch.Tensor]:
        return {2: self.dictionary.edit(acts_nd, cf.attribute, attributes[cf.attribute], cf.new_n)}


class Learned:
    """A sparse coder: features are its latents, read from the activation."""

    def __init__(self, name: str, coder: SparseCoder):
        self.name, self.coder = name, coder

    @torch.no_grad()
    def dense(self, acts_nd: torch.Tensor) -> torch.Tensor:
        """(n, latents): each latent's value (0 where it is off)."""
        code = self.coder.encode(acts_nd.float())
        dense = torch.zeros(len(acts_nd), self.coder.cfg.n_latents + 1)
        dense.scatter_(1, torch.where(code.indices_bk < 0, self.coder.cfg.n_latents, code.indices_bk), code.values_bk.float())
        return dense[:, :-1]

    @torch.no_grad()
    def reconstruct(self, acts_nd, attributes):
        return self.coder.reconstruct(acts_nd.float()).to(acts_nd)

    def active(self, acts_nd, attributes):
        return self.dense(acts_nd) > 0

    @torch.no_grad()
    def edits(self, acts_nd, cf_acts_nd, attributes, cf: Counterfactual) -> dict[int, torch.Tensor]:
        W_dec = self.coder.model_units().W_dec.float()
        change_nl = self.dense(cf_acts_nd) - self.dense(acts_nd)
        size_nl = change_nl.abs() * W_dec.norm(dim=1)
        edits = {}
        for size in EDIT_SIZES:
            if size > self.coder.cfg.n_latents:
                break
            keep = torch.zeros_like(change_nl, dtype=torch.bool).scatter_(1, size_nl.topk(size, dim=1).indices, True)
            edits[size] = acts_nd + ((change_nl * keep) @ W_dec).to(acts_nd)
        return edits


# --- the three evaluations ------------------------------------------------------------------------

def detectors(active_nf: torch.Tensor, attributes: dict[str, torch.Tensor]) -> dict:
    """Per attribute: the mean over its values of the best latent's F1 as a detector of the value;
    the mean number per value of precise detectors (precision >= 0.8, recall >= 0.05) that belong
    to it, a latent belonging to the attribute value it detects best (so a name's latent that
    happens to fire mostly on one order does not count for the order); and the best F1 per value."""
    active = active_nf.float()
    fires = active.sum(0)
    labels = [(name, int(value), (values == value).float())
              for name, values in attributes.items() for value in torch.unique(values).tolist()]
    label_vn = torch.stack([label for *_, label in labels])
    tp_vf = label_vn @ active
    precision = tp_vf / fires.clamp(min=1)
    recall = tp_vf / label_vn.sum(1, keepdim=True)
    f1_vf = torch.where(tp_vf > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp_vf))
    owner_f = f1_vf.argmax(0)
    belongs_vf = owner_f[None] == torch.arange(len(labels))[:, None]
    precise_vf = (precision >= 0.8) & (recall >= 0.05) & belongs_vf & (fires > 0)
    out = {}
    for name in attributes:
        rows = [i for i, (owner, _, _) in enumerate(labels) if owner == name]
        best = {labels[i][1]: float(f1_vf[i].max()) for i in rows}
        out[name] = {"best_f1": sum(best.values()) / len(best), "precise_per_value": float(precise_vf[rows].sum(1).float().mean()),
                     "by_value": best}
    return out


def symptoms(interpretability: dict) -> dict:
    scores = {name: v["best_f1"] for name, v in interpretability.items()}
    occluded = sorted(name for name, s in scores.items() if s < 0.5) if max(scores.values()) >= 0.8 else []
    split = sorted(name for name, v in interpretability.items() if v["precise_per_value"] >= 2)
    return {"occluded": occluded, "over_split": split}


def score(model, dictionary, task: Task, hook: str, positions_n: torch.Tensor, acts_nd: torch.Tensor,
          attributes: dict, recon_mean_d: torch.Tensor, base: dict,
          counterfactuals: list[tuple[Counterfactual, torch.Tensor, dict]]) -> dict:
    """One dictionary's row: approximation, control and interpretability on the held-out prompts."""
    def metric(value_nd):
        return float(task.metric_n(with_node(model, task.clean_nt, hook, positions_n, value_nd)).mean())

    recon_nd = dictionary.reconstruct(acts_nd, attributes)
    gap = base["clean"] - base["mean_ablated"]
    row = {
        "name": dictionary.name,
        "fvu": float(((acts_nd - recon_nd) ** 2).sum() / ((acts_nd - acts_nd.mean(0)) ** 2).sum()),
        "sufficiency": (metric(recon_nd) - base["mean_ablated"]) / gap,
        "necessity": (base["clean"] - metric(acts_nd - recon_nd + recon_mean_d.to(acts_nd))) / gap,
        "l0": float(dictionary.active(acts_nd, attributes).sum(1).float().mean()),
        "control": {},
    }
    for cf, cf_acts_nd, cf_base in counterfactuals:
        target = cf_base["patched"] - cf_base["prompt"]
        closed = {}
        for size, edited in dictionary.edits(acts_nd, cf_acts_nd, attributes, cf).items():
            if abs(target) < MIN_PATCH_EFFECT:
                closed[size] = None
                continue
            moved = float(logit_diff_n(with_node(model, task.clean_nt, hook, positions_n, edited), cf.answer_n, cf.wrong_n).mean())
            closed[size] = (moved - cf_base["prompt"]) / target
        row["control"][cf.attribute] = closed
    row["interpretability"] = detectors(dictionary.active(acts_nd, attributes), attributes)
    row.update(symptoms(row["interpretability"]))
    return row


# --- everything in one call -----------------------------------------------------------------------

def train_node_coder(arch: str, cfg: TaskEvalConfig, acts_nd: torch.Tensor, grads_nd: torch.Tensor | None, model_name: str) -> SparseCoder:
    torch.manual_seed(cfg.seed)
    coder = create_coder(arch, d_in=acts_nd.shape[1], n_latents=cfg.latents, hook=cfg.hook, k=min(cfg.k, cfg.latents), model=model_name)
    data = {cfg.hook: acts_nd}
    if coder.needs_grad:
        data[grad_key(cfg.hook)] = grads_nd
    return train_in_memory(coder, data, cfg.batch_size, cfg.steps, cfg.seed)


def evaluate_on_task(model, cfg: TaskEvalConfig, coders: dict[str, SparseCoder] | None = None, model_name: str = "",
                     progress: bool = True) -> tuple[dict, dict[str, SparseCoder]]:
    """The evaluation's result (evaluation.json's content) for the supervised dictionary, each
    family of `cfg.archs` trained at the node, and each given coder (name -> coder, reading
    `cfg.hook`); and the coders it trained (recording `model_name` as their model)."""
    coders = dict(coders or {})
    if not cfg.hook:
        hooks = {c.cfg.hook for c in coders.values()}
        if len(hooks) != 1:
            raise BadInput("give --hook, the node's hook (the coders' hooks: " + (", ".join(sorted(hooks)) or "no coders given") + ")")
        cfg = replace(cfg, hook=hooks.pop())
    for name, coder in coders.items():
        check_coder_fits(model, coder)
        if coder.cfg.hook != cfg.hook:
            raise BadInput(f"coder {name} reads {coder.cfg.hook}, not the node's hook {cfg.hook}")
    test = build_task(cfg.task, model.tokenizer, n=cfg.prompts, seed=cfg.seed)
    fit = build_task(cfg.task, model.tokenizer, n=cfg.fit_prompts, seed=cfg.seed + 1)
    if cfg.role not in test.roles:
        raise BadInput(f"task {test.name} has no role {cfg.role!r}; its roles: {', '.join(test.roles)}")
    attributes, fit_attributes = attributes_of(test), attributes_of(fit)
    check_model_does_task(baseline(model, test), test, cfg.min_accuracy)

    positions = test.roles[cfg.role]
    fit_acts = node_acts(model, fit.clean_nt, cfg.hook, fit.roles[cfg.role])
    acts = node_acts(model, test.clean_nt, cfg.hook, positions)
    base = {name: float(test.metric_n(with_node(model, test.clean_nt, cfg.hook, positions, value)).mean())
            for name, value in (("clean", None), ("mean_ablated", fit_acts.mean(0).expand_as(acts)))}
    if abs(base["clean"] - base["mean_ablated"]) < 1e-6:
        raise BadInput(f"mean-ablating {cfg.hook} at {cfg.role} does not change the metric: this node is not part of the circuit")

    counterfactuals = []
    for attribute in CONTROLLED:
        cf = counterfactual(test, attribute, cfg.seed)
        cf_acts = node_acts(model, cf.tokens_nt, cfg.hook, positions)
        passes = {"prompt": (test.clean_nt, None), "patched": (test.clean_nt, cf_acts), "counterfactual": (cf.tokens_nt, None)}
        cf_base = {name: float(logit_diff_n(with_node(model, tokens, cfg.hook, positions, value), cf.answer_n, cf.wrong_n).mean())
                   for name, (tokens, value) in passes.items()}
        counterfactuals.append((cf, cf_acts, cf_base))

    supervised = SupervisedDictionary.fit(fit_acts, fit_attributes)
    trained = {}
    if cfg.archs:
        fit_grads = node_grads(model, fit, cfg.hook, fit.roles[cfg.role]) if any(coder_class(a).needs_grad for a in cfg.archs) else None
        for arch in tqdm(cfg.archs, desc="training at the node", disable=not progress):
            trained[arch] = train_node_coder(arch, cfg, fit_acts, fit_grads, model_name)
    dictionaries = [(Supervised(supervised), supervised.reconstruct(fit_attributes).mean(0))]
    for name, coder in {**trained, **coders}.items():
        learned = Learned(name, coder)
        dictionaries.append((learned, learned.reconstruct(fit_acts, fit_attributes).mean(0)))
    rows = [score(model, dictionary, test, cfg.hook, positions, acts, attributes, recon_mean, base, counterfactuals)
            for dictionary, recon_mean in tqdm(dictionaries, desc="scoring dictionaries", disable=not progress)]
    result = {"config": asdict(cfg), "task": test.name, "prompts": len(test), "fit_prompts": len(fit), "node": [cfg.hook, cfg.role],
              "baseline": base, "counterfactual_baseline": {cf.attribute: b for cf, _, b in counterfactuals},
              "attribute_values": {name: len(torch.unique(v)) for name, v in attributes.items()}, "rows": rows}
    return result, trained
