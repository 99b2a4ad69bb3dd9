"""What a resume may change: the new resolved config against the one the checkpoint was saved with.

Three kinds of keys (dotted, as in overrides):

- **free**: how long, where and how visibly the run goes on (``train.epochs``, ``train.max_steps``, threads, device,
  logging, checkpoint interval, sharding and expert parallelism, which DCP reshards on load). They may change.
- **hyper-parameters** (:data:`HYPER_KEYS`): a learning rate, a loss weight, routing. A change is accepted only
  when named in ``--train.resume_allow_changes=KEY,...``; each accepted change is printed and recorded in
  ``metrics.json`` (``resume_changes``).
- **everything else** shapes the saved state or the data the run's position counts in (model shapes, tables,
  tasks, the optimizer kind, batch size, data settings). A change is refused: loading could not work, or would
  resume a different run. Keys added to the config later fall here unless listed above: refusing is the safe
  default.

Example::

    >>> old = {"model": {"encoder": {"d_model": 64}}, "train": {"lr": 0.001, "epochs": 5}}
    >>> new = {"model": {"encoder": {"d_model": 64}}, "train": {"lr": 0.5, "epochs": 9}}
    >>> [(c.key, c.kind) for c in config_changes(old, new)]
    [('train.epochs', 'free'), ('train.lr', 'hyper')]
    >>> check_resume(old, new, allowed="")
    Traceback (most recent call last):
    ...
    supermoe_rec.config.base.ConfigError: train.resume: the config changed since the checkpoint ...
    >>> [c.key for c in check_resume(old, new, allowed="train.lr")]
    ['train.lr']
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from supermoe_rec.config.experiment import ConfigError

if TYPE_CHECKING:
    from supermoe_rec.data.splits import SplitData

ALLOW_KEY = "train.resume_allow_changes"

FREE_KEYS = frozenset(
    {
        "train.resume",
        ALLOW_KEY,
        "train.overwrite",
        "train.epochs",
        "train.max_steps",
        "train.out_dir",
        "train.name",
        "train.init_from",
        "train.num_threads",
        "train.device",
        "train.tensorboard",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_batch_size",
        "train.sharding",
        "train.expert_parallel",
        "data.cache_dir",
        "data.try_url",
        "data.url_timeout_s",
    }
)
FREE_PREFIXES = ("train.sharding.",)

HYPER_KEYS = frozenset(
    {
        "train.lr",
        "train.sparse_lr",
        "train.weight_decay",
        "train.early_stopping_patience",
        "train.early_stopping_metric",
        "train.loss.task_weights",
        "train.loss.regression_loss",
        "train.loss.huber_delta",
        "train.loss.balance_loss_weight",
        "train.loss.z_loss_weight",
        "model.encoder.dropout",
        "model.moe.top_k",
        "model.moe.capacity_factor_train",
        "model.moe.capacity_factor_eval",
        "model.moe.dropless",
        "model.moe.router_jitter",
        "model.moe.router_noise",
        "model.moe.bias_update_rate",
        "train.next_items.weight",
        "train.next_items.temperature",
        "train.next_items.num_sampled",
        "train.next_items.in_batch_negatives",
        "train.next_items.logq_correction",
    }
)
HYPER_PREFIXES = ("train.loss.task_weights.",)


@dataclass(frozen=True)
class Change:
    """One changed key: its old and new value and its kind (``free``, ``hyper`` or ``state``)."""

    key: str
    old: Any
    new: Any
    kind: str

    def text(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "from": self.old, "to": self.new}


_MISSING = "<absent>"


def _show(value: Any) -> str:
    return value if value is _MISSING else repr(value)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _kind(key: str) -> str:
    if key in FREE_KEYS or key.startswith(FREE_PREFIXES):
        return "free"
    if key in HYPER_KEYS or key.startswith(HYPER_PREFIXES):
        return "hyper"
    return "state"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Change]:
    """Every dotted key whose value differs between two config mappings (plain, as ``config.yaml`` holds them)."""
    a, b = _flatten(old), _flatten(new)
    changes = []
    for key in sorted(a.keys() | b.keys()):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if x != y:
            changes.append(Change(key, x, y, _kind(key)))
    return changes


def parse_allowed(text: str) -> list[str]:
    """``"train.lr, model.moe.top_k"`` -> ``["train.lr", "model.moe.top_k"]``."""
    return [k.strip() for k in text.split(",") if k.strip()]


def check_resume(
    old: Mapping[str, Any], new: Mapping[str, Any], allowed: str, source: str = "checkpoint"
) -> list[Change]:
    """The hyper-parameter changes a resume accepts; a :class:`ConfigError` listing every change that it refuses.

    Args:
        old: the config the checkpoint was saved with; new: the resolved config of this invocation (both plain).
        allowed: ``train.resume_allow_changes``, comma-separated dotted keys.
        source: the file ``old`` came from, for the message.
    """
    changes = config_changes(old, new)
    allow = parse_allowed(allowed)
    unknown = [k for k in allow if _kind(k) != "hyper"]
    if unknown:
        raise ConfigError(
            f"{ALLOW_KEY}: {unknown} cannot be allowed: only hyper-parameters may change on resume "
            f"({', '.join(sorted(HYPER_KEYS))}); the rest shape the saved state or the data"
        )
    state = [c for c in changes if c.kind == "state"]
    hyper = [c for c in changes if c.kind == "hyper"]
    unallowed = [c for c in hyper if not any(c.key == k or c.key.startswith(k + ".") for k in allow)]
    if state or unallowed:
        parts = []
        if state:
            parts.append("refused (they shape the saved state or the data): " + "; ".join(c.text() for c in state))
        if unallowed:
            keys = ",".join(c.key for c in unallowed)
            parts.append(
                "not allowed: " + "; ".join(c.text() for c in unallowed) + f" (accept with --{ALLOW_KEY}={keys})"
            )
        raise ConfigError(f"train.resume: the config changed since the checkpoint {source}: {' | '.join(parts)}")
    return hyper


def data_fingerprint(data: SplitData) -> dict[str, dict[str, Any]]:
    """Per split, what the run trains and evaluates on: its source (file), rows read, samples and a SHA-256 of
    every array built from the rows (labels, masks, dense values, ids, users, timestamps).

    Saved with every checkpoint (``data.json``); a resume whose data give another fingerprint is refused
    (:func:`check_data`), so a run never continues on rows other than those it started on.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, ds in data.splits.items():
        digest = hashlib.sha256()
        arrays: list[Any] = [ds.labels, ds.task_mask, ds.dense, ds.group_offsets, ds.user_index]
        if ds.timestamps is not None:
            arrays.append(ds.timestamps)
        for key in sorted(ds.features):
            digest.update(key.encode())
            arrays += [ds.features[key].values, ds.features[key].offsets]
        for array in arrays:
            array = np.ascontiguousarray(array)
            digest.update(f"{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        digest.update("\0".join(map(str, np.unique(ds.user_keys))).encode())
        source = str(ds.source)
        if not Path(source).exists() and data.info.get("source"):  # a split built from a file (MovieLens, sequences)
            source = f"{data.info['source']} ({source})"
        out[name] = {
            "source": source,
            "rows": int(ds.report.rows_read),
            "samples": len(ds),
            "sha256": digest.hexdigest(),
        }
    return out


def check_data(old: Mapping[str, Any] | None, source: str, new: Mapping[str, Any]) -> None:
    """Refuse a resume whose data fingerprint ``new`` differs from the checkpoint's (``old``, read from ``source``;
    ``None``: saved before fingerprints existed, not checked). The message names the split's file and what changed."""
    if old is None:
        return
    for split in sorted(old.keys() | new.keys()):
        a, b = old.get(split), new.get(split)
        if a is not None and b is not None and all(a.get(k) == b.get(k) for k in ("rows", "samples", "sha256")):
            continue  # the same rows, wherever they are read from now
        if a is None or b is None:
            what = f"split {split!r} is {'new' if a is None else 'gone'}"
            where = (b or a or {}).get("source", split)
        else:
            where = b.get("source", split)
            what = (
                f"{a.get('rows')} rows, {a.get('samples')} samples, sha256 {str(a.get('sha256'))[:12]} when saved; "
                f"now {b.get('rows')} rows, {b.get('samples')} samples, sha256 {str(b.get('sha256'))[:12]}"
            )
        raise ConfigError(
            f"{where}: train.resume: the data of split {split!r} changed since the checkpoint {source} ({what}); "
            "resume only on the data the run was trained on, or start a new run with another --train.name"
        )


__all__ = [
    "ALLOW_KEY",
    "FREE_KEYS",
    "HYPER_KEYS",
    "Change",
    "check_data",
    "check_resume",
    "config_changes",
    "data_fingerprint",
    "parse_allowed",
]
