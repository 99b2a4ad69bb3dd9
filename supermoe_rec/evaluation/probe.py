"""Linear probes: how much of a user's profile does the behaviour-only representation recover?

    supermoe-rec probe --run runs/<name> [--seed 0] [--test-fraction 0.3] [--balanced]

The run must be trained without user profile features (``configs/ml100k_behaviour.yaml`` drops them with
``data.drop_features``); otherwise the probe would read the labels back from the inputs, and it refuses.

For each attribute (gender, age bucket, occupation from the MovieLens users table), users are split once, seeded
and stratified by that attribute (70/30 by default). Probes are fitted on the train users and scored on the
held-out users:

- ``model``: logistic regression on the standardised [USER] representation (from :mod:`supermoe_rec.evaluation.export`);
- ``task_<name>``: the same on each task representation;
- ``majority``: the train users' most frequent class;
- ``tfidf``: logistic regression on TF-IDF over the user's train items (every train item, while the model reads
  the last ``max_history``), the bag-of-items baseline a representation should beat.

The inverse regularisation strength C of every logistic regression is chosen by 3-fold cross-validation on the
train users, so no probe is favoured by a hand-picked C. C is chosen by accuracy; with ``--balanced`` every probe
instead weights the classes equally and C is chosen by balanced accuracy, so that a weak signal is not hidden behind
the majority class (with accuracy as the criterion, predicting the majority class is often the best a weak signal
can do). Writes ``<run>/probe.json`` and ``<run>/probe.md``.
Dimension letters: U users, M model dim, D item-table width, V item vocabulary.

The universality suite (``supermoe-rec probe --suite``) is :mod:`supermoe_rec.evaluation.suite`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp  # type: ignore[import-untyped]
import torch.distributed as dist
from sklearn.dummy import DummyClassifier  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegressionCV  # type: ignore[import-untyped]
from sklearn.metrics import accuracy_score, f1_score  # type: ignore[import-untyped]
from sklearn.model_selection import KFold, StratifiedKFold  # type: ignore[import-untyped]
from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]
from tabulate import tabulate

from supermoe_rec.config.experiment import ConfigError, DataConfig, ExperimentConfig
from supermoe_rec.data.jagged import IntArray, concat_ranges
from supermoe_rec.data.movielens import fetch_movielens
from supermoe_rec.data.output import write_text
from supermoe_rec.data.protocol import AGE_EDGES
from supermoe_rec.data.schema import FeatureSide, Schema
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.evaluation import downstream
from supermoe_rec.evaluation.export import (
    UserRepresentations,
    export_run,
    latest_rows,
    load_run_config,
)

# scipy and scikit-learn ship no type information: their imports above carry type: ignore.

log = logging.getLogger(__name__)

ATTRIBUTES = ("gender", "age", "occupation")
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")  # the buckets of AGE_EDGES
PROBE_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
CV_FOLDS = 3

__all__ = [
    "AGE_LABELS",
    "ATTRIBUTES",
    "ProbeScore",
    "check_behaviour_only",
    "item_bags",
    "main",
    "probe_representations",
    "probe_run",
    "probe_table",
    "user_attributes",
]


@dataclass(frozen=True)
class ProbeScore:
    """Held-out accuracy and macro-F1 of one probe (macro-F1 over the classes in truth or prediction)."""

    accuracy: float
    macro_f1: float

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "macro_f1": self.macro_f1}


# ------------------------------------------------------------------------------------------------------ inputs


def check_behaviour_only(schema: Schema) -> None:
    """Refuse a schema with user-side (profile) features: a probe of such a model would read its own inputs.

    Raises:
        ConfigError: naming the profile features and how to drop them.
    """
    profile = [f.name for f in schema.sparse_features if f.side is FeatureSide.USER]
    if profile:
        raise ConfigError(
            f"data.drop_features: the run's model reads user profile features {profile}, so probing it for the "
            "profile would leak the labels; train a behaviour-only run (configs/ml100k_behaviour.yaml, or "
            f"--data.drop_features=[{','.join(profile)}]) and probe that"
        )


def user_attributes(cfg: DataConfig) -> pd.DataFrame:
    """Probe labels per user from the MovieLens users table: gender, age bucket (AGE_EDGES) and occupation.

    Returns:
        A frame indexed by ``user_id`` with string columns ``gender``, ``age`` (an AGE_LABELS entry), ``occupation``.
    """
    if cfg.source not in ("ml100k", "ml1m"):
        raise ConfigError(f"data.source: {cfg.source!r} has no users table to probe (probe supports ml100k, ml1m)")
    users = fetch_movielens(cfg.source, cfg.cache_dir, cfg.try_url, cfg.url_timeout_s).users
    age = users["age"].to_numpy(np.float64)
    # The protocol's buckets; ML-1M stores the bucket's lower edge as the age, which lands in the same bucket.
    bucket = np.searchsorted(np.asarray(AGE_EDGES, dtype=np.float64), age, side="right")
    labels = np.asarray(AGE_LABELS, dtype=object)[np.minimum(bucket, len(AGE_LABELS) - 1)]
    labels[np.isnan(age)] = "unknown"
    # Plain arrays: Series would be aligned on their RangeIndex against the user_id index.
    return pd.DataFrame(
        {
            "gender": users["gender"].astype(str).to_numpy(),
            "age": labels,
            "occupation": users["occupation"].astype(str).to_numpy(),
        },
        index=pd.Index(users["user_id"].to_numpy(np.int64), name="user_id"),
    )


def item_bags(data: SplitData, user_keys: npt.NDArray[Any]) -> sp.csr_matrix:
    """Binary user x item matrix [U, V] of each user's train items, rows in ``user_keys`` order.

    A train sample's history holds the items before it, and the exported sample's history (the first valid sample)
    ends with the last train item, so their union is every train item of the user.
    """
    history = [f.name for f in data.schema.sequence_features if f.per_group]
    if not history:
        raise ConfigError("schema: no per-group sequence feature (history), so there is no bag of items to probe")
    index = pd.Index(user_keys)
    users, items = [], []
    sources = [("train", np.asarray(data.splits["train"].group_offsets[:-1], dtype=np.int64))]  # one row per group
    sources += [(split, rows) for split, (_, rows) in latest_rows(data).items()]
    for split, rows in sources:
        ds = data.splits[split]
        for name in history:
            jag = ds.features[name]
            lengths = jag.offsets[rows + 1] - jag.offsets[rows]  # (R,)
            take = concat_ranges(jag.offsets[rows], lengths)  # (Σ lengths,) value positions of those rows
            owner = index.get_indexer(ds.user_keys[rows]).astype(np.int64)  # (R,) bag row; -1: not exported
            users.append(np.repeat(owner, lengths))
            items.append(jag.values[take])
    u, i = np.concatenate(users), np.concatenate(items)
    keep = u >= 0
    bag = sp.coo_matrix(
        (np.ones(int(keep.sum()), dtype=np.float64), (u[keep], i[keep])),
        shape=(len(user_keys), int(i.max(initial=0)) + 1),
    ).tocsr()
    bag.data[:] = 1.0  # a user may meet an item in many histories; the bag records presence
    return bag


# ------------------------------------------------------------------------------------------------------ fitting


def _score(truth: npt.NDArray[Any], pred: npt.NDArray[Any]) -> ProbeScore:
    return ProbeScore(
        accuracy=float(accuracy_score(truth, pred)),
        macro_f1=float(f1_score(truth, pred, average="macro", zero_division=0)),
    )


def _logistic(y_train: npt.NDArray[Any], seed: int, balanced: bool = False) -> LogisticRegressionCV:
    # Stratified folds need every class in each fold; tiny classes fall back to plain shuffled folds.
    stratify = int(pd.Series(y_train).value_counts().min()) >= CV_FOLDS
    folds = (StratifiedKFold if stratify else KFold)(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    # newton-cg: a few exact Newton steps; lbfgs needs hundreds of iterations at large C on these small problems.
    # l1_ratios=(0,) is plain L2, spelled out as scikit-learn 1.9 asks.
    return LogisticRegressionCV(
        Cs=list(PROBE_CS),
        l1_ratios=(0.0,),
        cv=folds,
        scoring="balanced_accuracy" if balanced else "accuracy",
        class_weight="balanced" if balanced else None,
        solver="newton-cg",
        max_iter=1000,
        use_legacy_attributes=False,
    )


def _fit_dense(
    x: npt.NDArray[Any], y: npt.NDArray[Any], train: IntArray, test: IntArray, seed: int, balanced: bool = False
) -> ProbeScore:
    model = make_pipeline(StandardScaler(), _logistic(y[train], seed, balanced))
    model.fit(x[train], y[train])
    return _score(y[test], model.predict(x[test]))


def _fit_tfidf(
    bag: sp.csr_matrix, y: npt.NDArray[Any], train: IntArray, test: IntArray, seed: int, balanced: bool = False
) -> ProbeScore:
    tfidf = downstream.tfidf_features(bag, train)  # the suite's TF-IDF: IDF from the train users only
    model = _logistic(y[train], seed, balanced).fit(tfidf[train], y[train])
    return _score(y[test], model.predict(tfidf[test]))


def _fit_majority(y: npt.NDArray[Any], train: IntArray, test: IntArray) -> tuple[ProbeScore, str]:
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((len(train), 1)), y[train])
    pred = dummy.predict(np.zeros((len(test), 1)))
    return _score(y[test], pred), str(pred[0])


def probe_representations(
    reps: UserRepresentations,
    attributes: pd.DataFrame,
    bag: sp.csr_matrix | None,
    test_fraction: float = 0.3,
    seed: int = 0,
    balanced: bool = False,
    extra: Mapping[str, npt.NDArray[Any]] | None = None,
) -> dict[str, Any]:
    """Fit and score every probe for every attribute.

    Args:
        reps: the exported representations (U users).
        attributes: labels indexed by user key (:func:`user_attributes`); users without labels are skipped.
        bag: [U, V] item bags in ``reps`` order for the TF-IDF baseline, or None to skip it.
        test_fraction: share of users held out.
        seed: seeds the user split and the cross-validation folds.
        balanced: weight the classes equally and choose C by balanced accuracy (the module docstring).
        extra: more probes, name -> [U, F] features in ``reps`` order (e.g. the encoder's input), fitted like
            ``model``.

    Returns:
        ``{attribute: {"classes", "train_users", "test_users", "stratified", "majority_class", "test_user_ids",
        "probes": {probe: {"accuracy", "macro_f1"}}}}``.

    Raises:
        ValueError: an ``extra`` entry does not have one row per exported user, or reuses a probe name.
    """
    known = np.isin(reps.user_keys, attributes.index.to_numpy())
    if not known.all():
        log.warning("%d exported user(s) have no profile row and are not probed", int((~known).sum()))
    keys = reps.user_keys[known]
    features = {"model": reps.user[known], **{f"task_{n}": m[known] for n, m in reps.tasks.items()}}
    for name, x in (extra or {}).items():
        if name in features or name in ("majority", "tfidf"):
            raise ValueError(f"extra probe {name!r} reuses a probe name")
        if len(x) != len(reps.user_keys):
            raise ValueError(f"extra probe {name!r} has {len(x)} rows for {len(reps.user_keys)} exported users")
        features[name] = x[known]
    out: dict[str, Any] = {}
    for attribute in ATTRIBUTES:
        y = attributes.loc[keys, attribute].to_numpy().astype(str)
        split = downstream.split_users(len(y), seed, (1.0 - test_fraction, 0.0, test_fraction), labels=y)
        train, test, stratified = split.train, split.test, split.stratified
        majority, majority_class = _fit_majority(y, train, test)
        probes = {"model": _fit_dense(features["model"], y, train, test, seed, balanced), "majority": majority}
        if bag is not None:
            probes["tfidf"] = _fit_tfidf(bag[np.flatnonzero(known)], y, train, test, seed, balanced)
        for name, x in features.items():
            if name != "model":
                probes[name] = _fit_dense(x, y, train, test, seed, balanced)
        out[attribute] = {
            "classes": sorted(set(y.tolist())),
            "train_users": len(train),
            "test_users": len(test),
            "stratified": stratified,
            "majority_class": majority_class,
            "test_user_ids": keys[test].tolist(),
            "probes": {name: score.as_dict() for name, score in probes.items()},
        }
        log.info("probe %s: %s", attribute, {k: round(v.accuracy, 4) for k, v in probes.items()})
    return out


# -------------------------------------------------------------------------------------------------- reporting


def probe_table(result: dict[str, Any]) -> str:
    """The probe results as a GitHub-markdown table: one row per (attribute, probe)."""
    rows = []
    for attribute, entry in result["attributes"].items():
        for name, score in entry["probes"].items():
            rows.append(
                [attribute, len(entry["classes"]), name, f"{score['accuracy']:.4f}", f"{score['macro_f1']:.4f}"]
            )
    table: str = tabulate(rows, headers=["attribute", "classes", "probe", "accuracy", "macro-F1"], tablefmt="github")
    return table


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# Linear probes of `{result['run']}`",
        "",
        f"Representation: {result['representation']}; weights: {result['checkpoint']} checkpoint. "
        f"{result['users']} users, {int(100 * result['test_fraction'])}% held out (seed {result['seed']}), "
        "stratified by the attribute. `model` probes the [USER] representation, `task_*` the task tokens; "
        "`tfidf` is logistic regression on TF-IDF over every train item of the user; `majority` predicts the "
        "train users' most frequent class. C chosen by 3-fold CV on train users"
        + (", by balanced accuracy, with balanced class weights." if result.get("balanced") else ", by accuracy."),
        "",
        probe_table(result),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ the job


def probe_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    test_fraction: float = 0.3,
    seed: int = 0,
    balanced: bool = False,
) -> dict[str, Any]:
    """Export a behaviour-only run's representations, probe them, and write ``probe.json`` / ``probe.md``.

    Joins (or creates) a world-of-one process group; the caller owns it afterwards.

    Args:
        run_dir: the run directory.
        overrides: ``--section.key=value`` overrides of the run's config.
        test_fraction: share of users held out from probe fitting.
        seed: seeds the user split and cross-validation folds.
        balanced: balanced class weights, C chosen by balanced accuracy (the module docstring).

    Returns:
        What ``probe.json`` holds.

    Raises:
        ConfigError: the run's model reads user profile features, the arch has no user representation, or the
            data source has no users table.
    """
    run_dir = Path(run_dir)
    cfg: ExperimentConfig = load_run_config(run_dir, overrides)
    attributes = user_attributes(cfg.data)  # fails fast for a source without a users table
    data = load_data(cfg.data)
    check_behaviour_only(data.schema)
    exported = export_run(run_dir, overrides=overrides, data=data, routing=False)
    reps = exported.representations
    bag = item_bags(data, reps.user_keys)
    result: dict[str, Any] = {
        "run": str(run_dir),
        "checkpoint": exported.checkpoint,
        "representation": f"[USER] token output, M={reps.user.shape[1]}",
        "users": len(reps.user_keys),
        "test_fraction": test_fraction,
        "seed": seed,
        "balanced": balanced,
        "attributes": probe_representations(reps, attributes, bag, test_fraction, seed, balanced),
    }
    write_text(run_dir / "probe.json", json.dumps(result, indent=2) + "\n")
    write_text(run_dir / "probe.md", _markdown(result))
    return result


def main(run: str, overrides: Sequence[str], test_fraction: float = 0.3, seed: int = 0, balanced: bool = False) -> int:
    """CLI body of ``supermoe-rec probe``: probe in a world of one, print the table; tear down a group it created."""
    owns_group = not dist.is_initialized()  # an embedding caller's group is left alone
    try:
        result = probe_run(run, overrides, test_fraction, seed, balanced)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    print(probe_table(result))
    return 0
