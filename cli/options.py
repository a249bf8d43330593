"""Command-line options generated from the library's config dataclasses: each option is one field,
its help the docstring under the field, its default the field's. A command declares which
configs it takes; what the user gave comes back as `Given`, which applies it to a config (a new
object: the base is left as it was), so unset options keep whatever the base holds (the
dataclass default, or for example a saved coder's training data).

Nested dataclass fields are flattened (`RunConfig.train.tokens` is `--tokens`); a field may name
its flag (`metadata={"flag": "hook"}`) or a parser for its text (`metadata={"parse": fn}`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Optional

import typer

from interp.sae import REGISTRY, CoderConfig


@dataclass(frozen=True)
class Option:
    path: tuple[str, ...]
    """Where the value goes: field names from the top config down; ("coder_options", name) for an architecture's setting."""
    flag: str
    type: Any
    help: str
    default: Any
    parse: Callable[[str], Any] | None = None


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: the string literal right under its annotation} for a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _cli_type(hint: Any) -> Any:
    """The type typer parses: Optional[T] -> T; list[T] stays."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return _cli_type(args[0])
        raise TypeError(f"a union of {args} needs a parser in its field's metadata")
    return hint


def config_options(cls: type, only: Sequence[str] | None = None, exclude: Sequence[str] = (), path: tuple[str, ...] = (),
                   base: Any = None, default_note: str | None = None) -> list[Option]:
    """One option per leaf field of `cls` (nested dataclasses flattened), except dict fields.
    Defaults shown are `base`'s values (the fields' defaults, a nested field's default instance
    for its own fields), or `default_note` where the command starts from something else."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        hint = hints[f.name]
        default = getattr(base, f.name) if base is not None else _default(f)
        if dataclasses.is_dataclass(hint):
            out.extend(config_options(hint, exclude=exclude, path=(*path, f.name), base=default, default_note=default_note))
            continue
        if typing.get_origin(hint) is dict or hint is dict:
            continue
        parse = f.metadata.get("parse")
        flag = f.metadata.get("flag", f.name).replace("_", "-")
        shown = default_note if default_note is not None else default
        out.append(Option((*path, f.name), flag, str if parse else _cli_type(hint), docs.get(f.name, ""), shown, parse))
    return out


def coder_options(exclude: Sequence[str] = (), path: tuple[str, ...] = ()) -> list[Option]:
    """The settings of every registered architecture's config class, except those a run sets
    itself (the CoderConfig fields), into RunConfig.coder_options (under `path`); unset, the
    architecture's default."""
    structural = {f.name for f in dataclasses.fields(CoderConfig)}
    seen: dict[str, Option] = {}
    for cls in REGISTRY.values():
        config = cls.config_class
        for option in config_options(config, exclude=(*structural, *exclude)):
            name = option.path[-1]
            if name not in seen:
                archs = [a for a, c in REGISTRY.items() if name in {f.name for f in dataclasses.fields(c.config_class)}]
                where = "" if len(archs) == len(REGISTRY) else f" ({', '.join(archs)})"
                seen[name] = dataclasses.replace(option, path=(*path, "coder_options", name), help=option.help + where)
    return list(seen.values())


class Given:
    """The options a user gave, by path."""

    def __init__(self, values: dict[tuple[str, ...], Any], flags: dict[tuple[str, ...], str]):
        self.values, self.flags = values, flags

    def names(self) -> list[str]:
        """The flags given, as the user typed them."""
        return ["--" + self.flags[path] for path in self.values]

    def apply(self, config):
        """A copy of `config` with the given values in place (validated by its constructor)."""
        return self._apply(config, ())

    def _apply(self, config, prefix: tuple[str, ...]):
        changes = {}
        for f in dataclasses.fields(config):
            path = (*prefix, f.name)
            value = getattr(config, f.name)
            if dataclasses.is_dataclass(value):
                new = self._apply(value, path)
                if new is not value:
                    changes[f.name] = new
            elif isinstance(value, dict):
                extra = {p[-1]: v for p, v in self.values.items() if p[:-1] == path}
                if extra:
                    changes[f.name] = {**value, **extra}
            elif path in self.values:
                changes[f.name] = self.values[path]
        return dataclasses.replace(config, **changes) if changes else config


def _parameter(option: Option) -> inspect.Parameter:
    shown = option.default if option.default not in (None, [], "") else False
    names = f"--{option.flag}/--no-{option.flag}" if option.type is bool else f"--{option.flag}"
    info = typer.Option(names, help=option.help, show_default=str(shown) if shown is not False else False)
    return inspect.Parameter(_python_name(option), inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[option.type], info])


def _python_name(option: Option) -> str:
    return "opt_" + option.flag.replace("-", "_")


def takes(*groups: list[Option]):
    """Decorate a command `fn(given, **own)`: typer sees its own parameters plus one option per
    config field in `groups`; `fn` receives what was given as a `Given`."""
    options = [o for group in groups for o in group]
    flags = [o.flag for o in options]
    twice = sorted({f for f in flags if flags.count(f) > 1})
    if twice:
        raise TypeError(f"options declared twice for one command: {twice}")

    def decorate(fn):
        own = [p for name, p in inspect.signature(fn).parameters.items() if name != "given"]
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]

        @functools.wraps(fn)
        def command(**kwargs):
            values = {}
            for option in options:
                value = kwargs.pop(_python_name(option))
                if value is not None and value != []:
                    values[option.path] = option.parse(value) if option.parse else value
            return fn(Given(values, {o.path: o.flag for o in options}), **kwargs)

        command.__signature__ = inspect.Signature([*own, *map(_parameter, options)])
        del command.__wrapped__
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate
