"""The strict loader under the configs and the data schema: :class:`ConfigError`, typed conversion, key history.

:func:`from_dict` builds a frozen dataclass from a plain mapping, checking every value against its annotation
(enums, tuples, dicts, nested dataclasses, optionals) and naming the dotted key of the first problem; :func:`to_dict`
is its inverse. :data:`MOVED_KEYS` / :data:`REMOVED_KEYS` turn a key of the earlier flat config layout into an error
naming its new place. It imports nothing of the package, so :mod:`supermoe_rec.config.experiment` and
:mod:`supermoe_rec.data.schema` both build on it without importing each other in a circle.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A configuration problem; the message starts with the dotted key or the file it concerns."""


C = TypeVar("C")


# Keys of the earlier flat layout, and where each lives now: loading or overriding one is an error naming its new key.
MOVED_KEYS: dict[str, str] = {
    **{
        f"model.{k}": f"model.encoder.{k}"
        for k in ("d_model", "num_layers", "num_heads", "ffn_hidden", "use_task_tokens", "item_interaction", "dropout")
    },
    **{
        f"model.{k}": f"model.mlp.{k}"
        for k in ("bottom_hidden", "mmoe_experts", "ple_shared_experts", "ple_task_experts", "ple_levels")
    },
    "model.tower_hidden": "model.towers.hidden",
    "model.moe.balance_loss_weight": "train.loss.balance_loss_weight",
    "model.moe.z_loss_weight": "train.loss.z_loss_weight",
    "model.moe.expert_parallel": "train.expert_parallel",
    **{
        f"train.{k}": f"train.loss.{k}"
        for k in ("task_weights", "uncertainty_weighting", "regression_loss", "huber_delta")
    },
}
# Keys that are gone: the error says what replaces them.
REMOVED_KEYS: dict[str, str] = {
    "model.use_moe": "model.arch is the only switch between MoE and dense (model.arch: dense_transformer is the dense "
    "twin of supermoe)",
}


def read_utf8(path: Path) -> str:
    """The text of a config or schema file; bytes that are not UTF-8 are a :class:`ConfigError` naming the byte and
    its offset."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise ConfigError(f"{path}: not UTF-8 text: byte {byte:#04x} at byte offset {exc.start}") from None


def unknown_key_error(key: str, known: Sequence[str]) -> ConfigError:
    """The error for an unknown key: it names the new key of a moved one, what replaces a removed one."""
    if key in MOVED_KEYS:
        return ConfigError(f"{key}: this key moved to {MOVED_KEYS[key]}")
    if key in REMOVED_KEYS:
        return ConfigError(f"{key}: this key was removed: {REMOVED_KEYS[key]}")
    return ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against ``annotation`` and convert it (enums, tuples, nested dataclasses)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {annotation}")
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, key)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        if isinstance(value, annotation):
            return value
        choices = [m.value for m in annotation]
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return annotation(value)
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_type = args[0]
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_convert(k, key_type, f"{key}"): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {annotation!r}")  # a bug in a config class


def _build(cls: type[C], values: Mapping[str, Any], prefix: str = "") -> C:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise unknown_key_error(key, sorted(fields))
        kwargs[name] = _convert(value, hints[name], key)
    return cls(**kwargs)


def from_dict(values: Mapping[str, Any], cls: type[C]) -> C:
    """Build the frozen dataclass ``cls`` (a config, a schema) from a plain mapping, strictly."""
    return _build(cls, values)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-safe mapping of a config (enums as their values, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    result = plain(cfg)
    assert isinstance(result, dict)
    return result


__all__ = ["MOVED_KEYS", "REMOVED_KEYS", "ConfigError", "from_dict", "to_dict", "unknown_key_error"]
