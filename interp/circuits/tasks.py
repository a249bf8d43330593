"""Tasks a circuit explains: clean and corrupt prompts of equal token length, the answer and
wrong-answer tokens of each, a metric on the logits at the last position, and the position of
each role (IO, S1, S2, END, ...). Built offline and checked against the model's tokenizer: a
name, digit or verb that is not one token for this model is left out, and a prompt pair whose
lengths differ is an error.

- ioi: indirect object identification (Wang et al. 2022), "When Mary and John went to the store,
  John gave a drink to" -> " Mary" vs " John"; ABC corruption (three different names, so no
  name is repeated and the indirect object is not determined).
- greater_than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a tens
  digit above 3 vs one below. SmolLM2 has no multi-digit tokens, so the answer is one digit;
  the metric is the probability of the greater digits minus the smaller; corrupt start year 1701.
- induction: random tokens repeated; the answer is the token that followed the current one in
  the first half, the wrong answer a random token; corrupt: the second half is other random tokens.
- agreement: subject-verb agreement across an attractor ("The author near the cars" -> " is" vs
  " are"); corrupt: the subject's number flipped.
- from_jsonl: a user's file of {"prompt", "corrupt", "answer", "wrong"} lines.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interp.errors import BadInput, NotFound, check_positive

METRICS = ("logit_diff", "prob_diff")


@dataclass
class TaskConfig:
    """The settings every command over a task shares."""

    task: str = "ioi"
    """A built-in task (ioi, greater_than, induction, agreement) or a .jsonl file of prompt, corrupt, answer, wrong."""
    prompts: int = 64
    """Prompts built for a built-in task, each in a clean and a corrupt version."""
    seed: int = 0
    """Seed of the built-in task's prompts and of everything the command draws at random."""
    min_accuracy: float = 0.6
    """Refuse a task on which fewer clean prompts than this share have a positive metric."""

    def __post_init__(self):
        check_positive("prompts", self.prompts)
        if not 0 <= self.min_accuracy <= 1:
            raise BadInput(f"min_accuracy must be between 0 and 1, got {self.min_accuracy}")


@dataclass
class Task:
    name: str
    clean_nt: torch.Tensor
    """(prompts, tokens) token ids, BOS first."""
    corrupt_nt: torch.Tensor
    answers_na: torch.Tensor
    """(prompts, answers) token ids of the right answers, -1 padding."""
    wrong_na: torch.Tensor
    metric: str = "logit_diff"
    """logit_diff: mean logit of the answers minus mean of the wrong ones; prob_diff: summed
    probabilities of the answers minus of the wrong ones."""
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    """role -> (prompts,) its position in each prompt."""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise BadInput(f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.clean_nt.shape != self.corrupt_nt.shape:
            raise BadInput(f"task {self.name}: clean prompts {tuple(self.clean_nt.shape)} and corrupt prompts "
                           f"{tuple(self.corrupt_nt.shape)} must have the same number of tokens")
        if len(self.clean_nt) == 0:
            raise BadInput(f"task {self.name} has no prompts")
        self.roles.setdefault("END", torch.full((len(self.clean_nt),), self.clean_nt.shape[1] - 1))

    def __len__(self) -> int:
        return len(self.clean_nt)

    def subset(self, index: torch.Tensor | slice) -> Task:
        return Task(self.name, self.clean_nt[index], self.corrupt_nt[index], self.answers_na[index], self.wrong_na[index],
                    self.metric, {role: pos[index] for role, pos in self.roles.items()})

    def split(self, train_fraction: float = 0.5) -> tuple[Task, Task]:
        """(train, test): the first `train_fraction` of the prompts and the rest (builders shuffle)."""
        if not 0 < train_fraction < 1:
            raise BadInput(f"train_fraction must be between 0 and 1, got {train_fraction}")
        cut = max(1, min(len(self) - 1, round(len(self) * train_fraction)))
        if len(self) < 2:
            raise BadInput(f"task {self.name} has {len(self)} prompt; a train/test split needs at least 2")
        return self.subset(slice(0, cut)), self.subset(slice(cut, None))

    def metric_n(self, logits_ntv: torch.Tensor) -> torch.Tensor:
        """(prompts,) the metric of each prompt from the logits at its last position."""
        last_nv = logits_ntv[:, -1].float()
        if self.metric == "prob_diff":
            last_nv = last_nv.softmax(-1)

        def pick(ids_na):
            ids_na = ids_na.to(last_nv.device)
            values = last_nv.gather(1, ids_na.clamp(min=0)) * (ids_na >= 0)
            return values.sum(1) if self.metric == "prob_diff" else values.sum(1) / (ids_na >= 0).sum(1)

        return pick(self.answers_na) - pick(self.wrong_na)

    def role_of_positions(self) -> list[list[str]]:
        """For each prompt, the role of each position ("" where none)."""
        names = [[""] * self.clean_nt.shape[1] for _ in range(len(self))]
        for role, positions in self.roles.items():
            for i, t in enumerate(positions.tolist()):
                names[i][t] = role
        return names


@dataclass
class Baseline:
    """How well the model does the task, before a circuit is looked for."""

    accuracy: float
    """Share of clean prompts whose metric is positive (the answer beats the wrong answer)."""
    mean_clean: float
    mean_corrupt: float
    n: int


@torch.no_grad()
def baseline(model, task: Task) -> Baseline:
    device = model.cfg.device
    clean = task.metric_n(model(task.clean_nt.to(device)))
    corrupt = task.metric_n(model(task.corrupt_nt.to(device)))
    return Baseline(float((clean > 0).float().mean()), float(clean.mean()), float(corrupt.mean()), len(task))


def check_model_does_task(result: Baseline, task: Task, min_accuracy: float) -> None:
    """Refuse to explain a behaviour the model does not have."""
    if result.accuracy < min_accuracy or result.mean_clean <= result.mean_corrupt:
        raise BadInput(
            f"the model does not do task {task.name}: accuracy {result.accuracy:.2f} (at least {min_accuracy} needed), "
            f"mean {task.metric} {result.mean_clean:.3f} on clean prompts vs {result.mean_corrupt:.3f} on corrupt ones; "
            "a circuit would explain nothing"
        )


# --- building tasks ------------------------------------------------------------------------------

class _Tokens:
    """Token ids as the model sees them: BOS, then the text without the tokenizer's own specials."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id

    def __call__(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos] if self.bos is not None else []) + ids

    def single(self, text: str) -> int | None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[0] if len(ids) == 1 else None


NAMES = ["Mary", "John", "Tom", "James", "Anna", "Paul", "Sarah", "David", "Alice", "Bob", "Emma", "Jack", "Kate", "Mark", "Lucy", "Peter", "Susan", "Daniel", "Laura", "Michael", "Rachel", "Chris", "Linda", "Steve"]
IOI_TEMPLATES = (
    "When {A} and {B} went to the store, {C} gave a drink to",
    "When {A} and {B} went to the park, {C} gave a ball to",
    "After {A} and {B} went to the office, {C} handed a letter to",
)


def ioi(tokenizer, n: int = 200, seed: int = 0) -> Task:
    """IOI prompts: A and B, then the subject C = B again; answer A (IO), wrong B (S)."""
    tok, rng = _Tokens(tokenizer), random.Random(seed)
    names = [name for name in NAMES if tok.single(" " + name) is not None]
    if len(names) < 3:
        raise BadInput(f"fewer than 3 of the IOI names are one token for this tokenizer ({names})")
    rows = []
    for i in range(n):
        template = IOI_TEMPLATES[i % len(IOI_TEMPLATES)]
        io, s, a, b, c = rng.sample(names, 2) + rng.sample(names, 3)
        if rng.random() < 0.5:  # IO first or subject first, as in Wang et al.
            clean = template.format(A=io, B=s, C=s)
        else:
            clean = template.format(A=s, B=io, C=s)
        corrupt = template.format(A=a, B=b, C=c)
        rows.append((clean, corrupt, io, s, template))
    clean_nt, corrupt_nt = _pairs(tok, "ioi", [(r[0], r[1]) for r in rows])
    io_ids = torch.tensor([[tok.single(" " + r[2])] for r in rows])
    s_ids = torch.tensor([[tok.single(" " + r[3])] for r in rows])
    roles = {"IO": [], "S1": [], "S2": []}
    for i in range(len(rows)):
        positions = {role: [] for role in ("IO", "S")}
        for t, token in enumerate(clean_nt[i].tolist()):
            if token == io_ids[i, 0]:
                positions["IO"].append(t)
            elif token == s_ids[i, 0]:
                positions["S"].append(t)
        roles["IO"].append(positions["IO"][0])
        roles["S1"].append(positions["S"][0])
        roles["S2"].append(positions["S"][-1])
    return Task("ioi", clean_nt, corrupt_nt, io_ids, s_ids, "logit_diff", {r: torch.tensor(p) for r, p in roles.items()})


def greater_than(tokenizer, n: int = 200, seed: int = 0) -> Task:
    """Start year 17YY; the model should continue "...to the year 17" with a tens digit >= Y's."""
    tok, rng = _Tokens(tokenizer), random.Random(seed)
    digits = [tok.single(str(d)) for d in range(10)]
    if any(d is None for d in digits):
        raise BadInput("greater_than needs every digit 0-9 to be one token for this tokenizer")
    rows = []
    for _ in range(n):
        tens = rng.randint(2, 8)
        year = f"17{tens}{rng.randint(0, 9)}"
        rows.append((f"The war lasted from the year {year} to the year 17", "The war lasted from the year 1701 to the year 17", tens))
    clean_nt, corrupt_nt = _pairs(tok, "greater_than", [(r[0], r[1]) for r in rows])
    answers = torch.tensor([[digits[d] if d > r[2] else -1 for d in range(10)] for r in rows])
    wrong = torch.tensor([[digits[d] if d < r[2] else -1 for d in range(10)] for r in rows])
    year_pos = _find(clean_nt, corrupt_nt)
    return Task("greater_than", clean_nt, corrupt_nt, answers, wrong, "prob_diff", {"YY": year_pos})


def induction(tokenizer, n: int = 200, seed: int = 0, length: int = 10) -> Task:
    """BOS, L random tokens, the same L tokens again but the last; answer: that last token."""
    rng = torch.Generator().manual_seed(seed)
    vocab = _plain_vocab(tokenizer)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    picks = vocab[torch.stack([torch.randperm(len(vocab), generator=rng)[: 2 * length + 1] for _ in range(n)])]
    first, other, wrong = picks[:, :length], picks[:, length : 2 * length], picks[:, 2 * length :]
    prefix = torch.tensor(bos).expand(n, len(bos))
    clean_nt = torch.cat([prefix, first, first[:, :-1]], 1)
    corrupt_nt = torch.cat([prefix, first, other[:, :-1]], 1)
    end = clean_nt.shape[1] - 1
    roles = {"MATCH": torch.full((n,), len(bos) + length - 2), "NEXT": torch.full((n,), len(bos) + length - 1),
             "END": torch.full((n,), end)}
    return Task("induction", clean_nt, corrupt_nt, first[:, -1:], wrong, "logit_diff", roles)


NOUNS = [("author", "authors"), ("key", "keys"), ("teacher", "teachers"), ("dog", "dogs"), ("student", "students"),
         ("doctor", "doctors"), ("car", "cars"), ("friend", "friends"), ("bird", "birds"), ("player", "players")]
ATTRACTORS = [("table", "tables"), ("house", "houses"), ("tree", "trees"), ("window", "windows"), ("door", "doors")]


def agreement(tokenizer, n: int = 200, seed: int = 0) -> Task:
    """"The author near the cars" -> " is" (singular subject) vs " are"; corrupt flips the subject."""
    tok, rng = _Tokens(tokenizer), random.Random(seed)
    verbs = tok.single(" is"), tok.single(" are")
    nouns = [p for p in NOUNS if all(tok.single(" " + w) is not None for w in p)]
    attractors = [p for p in ATTRACTORS if all(tok.single(" " + w) is not None for w in p)]
    if None in verbs or not nouns or not attractors:
        raise BadInput("agreement needs ' is', ' are' and singular/plural nouns that are one token each")
    rows = []
    for _ in range(n):
        subject, attractor, plural = rng.choice(nouns), rng.choice(attractors), rng.random() < 0.5
        # the attractor disagrees with the subject, which is what makes the task hard
        text = "The {} near the {}"
        clean = text.format(subject[plural], attractor[not plural])
        corrupt = text.format(subject[not plural], attractor[not plural])
        rows.append((clean, corrupt, verbs[plural], verbs[not plural]))
    clean_nt, corrupt_nt = _pairs(tok, "agreement", [(r[0], r[1]) for r in rows])
    subject_pos = _find(clean_nt, corrupt_nt)
    return Task("agreement", clean_nt, corrupt_nt, torch.tensor([[r[2]] for r in rows]), torch.tensor([[r[3]] for r in rows]),
                "logit_diff", {"SUBJ": subject_pos})


def from_jsonl(tokenizer, path: str | Path, name: str | None = None, metric: str = "logit_diff") -> Task:
    """A task from lines {"prompt", "corrupt", "answer", "wrong"} (answers: one token each)."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"task file {path} does not exist")
    tok, pairs, answers, wrong = _Tokens(tokenizer), [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInput(f"{path} line {number} is not JSON: {err}") from err
        missing = {"prompt", "corrupt", "answer", "wrong"} - set(row)
        if missing:
            raise BadInput(f"{path} line {number} lacks {sorted(missing)} (each line: prompt, corrupt, answer, wrong)")
        for key in ("answer", "wrong"):
            if tok.single(row[key]) is None:
                raise BadInput(f"{path} line {number}: {key} {row[key]!r} is not one token for this tokenizer "
                               f"(it is {tokenizer(row[key], add_special_tokens=False)['input_ids']})")
        pairs.append((row["prompt"], row["corrupt"]))
        answers.append([tok.single(row["answer"])])
        wrong.append([tok.single(row["wrong"])])
    if not pairs:
        raise BadInput(f"{path} holds no tasks")
    clean_nt, corrupt_nt = _pairs(tok, name or path.stem, pairs, where=str(path))
    return Task(name or path.stem, clean_nt, corrupt_nt, torch.tensor(answers), torch.tensor(wrong), metric)


BUILDERS = {"ioi": ioi, "greater_than": greater_than, "induction": induction, "agreement": agreement}


def build_task(name: str, tokenizer, n: int = 200, seed: int = 0) -> Task:
    """A built-in task by name, or a JSONL file's."""
    if name in BUILDERS:
        return BUILDERS[name](tokenizer, n=n, seed=seed)
    if name.endswith(".jsonl") or Path(name).is_file():
        return from_jsonl(tokenizer, name)
    raise BadInput(f"unknown task {name!r}; choose one of {', '.join(BUILDERS)} or give a .jsonl file")


def _pairs(tok: _Tokens, name: str, pairs: list[tuple[str, str]], where: str | None = None):
    """(clean, corrupt) token tensors; every prompt of a task has the same number of tokens."""
    clean, corrupt = [tok(a) for a, _ in pairs], [tok(b) for _, b in pairs]
    length = len(clean[0])
    for i, (a, b) in enumerate(zip(clean, corrupt)):
        if len(a) != len(b) or len(a) != length:
            place = f"{where} line {i + 1}" if where else f"prompt {i}"
            raise BadInput(f"task {name}, {place}: clean {len(a)} tokens, corrupt {len(b)}, first prompt {length}; "
                           "every prompt and its corruption must have the same number of tokens")
    return torch.tensor(clean), torch.tensor(corrupt)


def _find(clean_nt: torch.Tensor, corrupt_nt: torch.Tensor) -> torch.Tensor:
    """(prompts,) the first position where a prompt and its corruption differ (0 where none)."""
    return (clean_nt != corrupt_nt).int().argmax(1)


def _plain_vocab(tokenizer) -> torch.Tensor:
    """Token ids that are not special tokens, for random sequences."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special and i < 50_000])
