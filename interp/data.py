"""Text to fixed-length token batches.

A dataset is named by one string:
- `builtin`: an offline English corpus made from text every Python installation carries (the
  language reference topics of `pydoc_data` and the docstrings of the standard library);
- a local `.txt`, `.jsonl` or `.parquet` file, or a folder of them (searched recursively);
- anything else is a Hugging Face dataset name, streamed (needs the hub).

Documents are split deterministically into a training split and a held-out split (every
`HOLDOUT_EVERY`-th document), so `interp eval` measures on text the coder never trained on.

Batches pack documents end to end, separated by the tokenizer's EOS token, into rows of
`context_size` tokens that each start with BOS. Packing leaves no padding; the mask marks
which positions carry activations worth training on (all but the BOS column).
"""

from __future__ import annotations

import ast
import functools
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from interp.errors import BadInput, MissingField, NotFound, Unavailable, check_positive

BUILTIN = "builtin"
HOLDOUT_EVERY = 20
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class DataConfig:
    dataset: str = BUILTIN
    """Text to run the model on: 'builtin' (offline corpus), a local .txt/.jsonl/.parquet file or folder, or a Hugging Face dataset name."""
    context_size: int = 128
    """Tokens per sequence, BOS included."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet files and Hugging Face datasets."""
    model_batch: int = 16
    """Sequences per model forward pass."""

    def __post_init__(self):
        if isinstance(self.context_size, bool) or not isinstance(self.context_size, int) or self.context_size < 2:
            raise BadInput(f"context_size must be at least 2 (BOS + one token), got {self.context_size!r}")
        check_positive("model_batch", self.model_batch)

    def batches(self, tokenizer, split: str) -> Iterator[TokenBatch]:
        """The token batches of `split` ('train' or 'test'), in a fixed order."""
        return iter_token_batches(tokenizer, iter_texts(self.dataset, split, self.text_field), self.context_size, self.model_batch)

    @property
    def tokens_per_batch(self) -> int:
        """Activations one batch yields (BOS left out)."""
        return self.model_batch * (self.context_size - 1)


@dataclass
class TokenBatch:
    tokens_bt: torch.Tensor
    """Token ids, int64, shape (sequences, context_size)."""
    mask_bt: torch.Tensor
    """True where a position's activation is used: not BOS, not padding."""


def iter_texts(dataset: str, split: str = "train", text_field: str = "text") -> Iterator[str]:
    """The documents of `dataset` in a fixed order; `split` is 'train' or 'test' (held out)."""
    if split not in ("train", "test"):
        raise BadInput(f"split must be 'train' or 'test', not {split!r}")
    docs = _documents(dataset, text_field)
    for index, doc in enumerate(docs):
        held_out = index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        if held_out == (split == "test") and doc.strip():
            yield doc


def _documents(dataset: str, text_field: str) -> Iterator[str]:
    if dataset == BUILTIN:
        return iter(builtin_corpus())
    path = Path(dataset)
    if path.exists():
        return _local_documents(path, text_field)
    if dataset.startswith((".", "/", "~")) or Path(dataset).suffix in TEXT_SUFFIXES:
        raise NotFound(f"dataset path {dataset!r} does not exist")
    return _hub_documents(dataset, text_field)


@functools.cache
def builtin_corpus() -> tuple[str, ...]:
    """English documentation shipped with CPython: about 1.7 M characters (built once per
    process: parsing the standard library takes a few seconds)."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}
    for source in sorted(stdlib.rglob("*.py")):
        if skip & set(source.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    docs.append(doc)
    # The standard library repeats some docstrings (C and Python twins); keep each once so the
    # held-out split shares no document with the training split.
    return tuple(dict.fromkeys(docs))


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise NotFound(f"no {'/'.join(TEXT_SUFFIXES)} files under {path}")
    for file in files:
        if file.suffix == ".txt":
            # Blank-line separated paragraphs of a .txt file are its documents.
            yield from file.read_text(encoding="utf-8").split("\n\n")
        elif file.suffix == ".jsonl":
            yield from _jsonl_texts(file, text_field)
        elif file.suffix == ".parquet":
            yield from _parquet_texts(file, text_field)
        else:
            raise BadInput(f"{file}: unsupported file type; use one of {', '.join(TEXT_SUFFIXES)}")


def _jsonl_texts(file: Path, text_field: str) -> Iterator[str]:
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if text_field not in record:
                raise MissingField(f"{file}:{number} has no field {text_field!r} (fields: {', '.join(record)})")
            yield record[text_field]


def _parquet_texts(file: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(file)
    if text_field not in table.column_names:
        raise MissingField(f"{file} has no column {text_field!r} (columns: {', '.join(table.column_names)})")
    yield from table.column(text_field).to_pylist()


def _hub_documents(name: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as err:  # the hub raises many types; all mean the same to the user
        raise Unavailable(
            f"could not open dataset {name!r}: it is not a local path, and the Hugging Face hub "
            f"failed ({err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            f"Offline, use {BUILTIN!r} or a local .txt/.jsonl/.parquet file or folder."
        ) from err
    for record in stream:
        yield record[text_field]


def iter_token_batches(
    tokenizer, texts: Iterator[str], context_size: int, batch_size: int
) -> Iterator[TokenBatch]:
    """Pack `texts` into batches of `batch_size` rows of `context_size` tokens, BOS first."""
    if context_size < 2:
        raise BadInput(f"context_size must be at least 2 (BOS + one token), got {context_size}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = context_size - 1
    pending: list[int] = []
    rows: list[list[int]] = []
    empty = True
    for text in texts:
        empty = False
        pending.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        pending.append(eos)
        while len(pending) >= body:
            rows.append([bos] + pending[:body])
            del pending[:body]
            if len(rows) == batch_size:
                yield _batch(rows)
                rows = []
    if empty:
        raise BadInput("the dataset holds no text: it yielded no documents")


def _batch(rows: list[list[int]]) -> TokenBatch:
    tokens = torch.tensor(rows, dtype=torch.long)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[:, 0] = False
    return TokenBatch(tokens, mask)
