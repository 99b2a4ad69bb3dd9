"""The config keys of every command's ``--help``: generated from the dataclasses in
:mod:`supermoe_rec.config.experiment`.

Each key is listed as the override that sets it, with its type and default, grouped by section, so ``--help``
cannot drift from what :func:`supermoe_rec.config.experiment.load_config` accepts.

Example::

    >>> text = config_keys_help()
    >>> "  --train.lr=FLOAT" in text and "[model.moe]" in text
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from collections.abc import Iterator
from typing import Any


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        name = " | ".join(_type_name(a) for a in args)
        return f"{name} | null" if len(args) < len(typing.get_args(annotation)) else name
    if origin is tuple:
        return f"[{_type_name(typing.get_args(annotation)[0])}, ...]"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"{{{_type_name(key)}: {_type_name(value)}}}"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "|".join(str(m.value) for m in annotation)
    if dataclasses.is_dataclass(annotation):
        return "{" + ", ".join(f.name for f in dataclasses.fields(annotation)) + "}"
    return {int: "INT", float: "FLOAT", bool: "BOOL", str: "STR"}.get(annotation, getattr(annotation, "__name__", "?"))


def _default_text(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, tuple):
        value = list(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _sections(cls: type[Any], prefix: str) -> Iterator[tuple[str, list[str]]]:
    hints = typing.get_type_hints(cls)
    lines, nested = [], []
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        annotation = hints[field.name]
        key = f"{prefix}.{field.name}" if prefix else field.name
        if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
            nested.append((annotation, key))
            continue
        lines.append(f"  --{key}={_type_name(annotation)}  (default: {_default_text(field)})")
    if lines:
        yield prefix, lines
    for annotation, key in nested:
        yield from _sections(annotation, key)


def config_keys_help(cls: type[Any] | None = None) -> str:
    """Every config key as ``--section.key=TYPE (default: ...)``, one block per section."""
    if cls is None:
        from supermoe_rec.config.experiment import ExperimentConfig

        cls = ExperimentConfig
    out = ["config keys (override any of them after the flags; see configs/*.yaml):"]
    for section, lines in _sections(cls, ""):
        out.append(f"[{section}]")
        out.extend(lines)
    return "\n".join(out)


def add_config_help(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Append the config keys to the ``--help`` of every (sub)command of ``parser`` except ``skip`` ones."""
    text = config_keys_help()
    for name, leaf in _leaves(parser, ""):
        if name in skip:
            continue
        leaf.formatter_class = argparse.RawDescriptionHelpFormatter
        leaf.epilog = f"{leaf.epilog}\n\n{text}" if leaf.epilog else text


def _leaves(parser: argparse.ArgumentParser, name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    children = [
        (f"{name} {child_name}".strip(), child)
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child_name, child in action.choices.items()
    ]
    if not children:
        yield name, parser
    for child_name, child in children:
        yield from _leaves(child, child_name)
