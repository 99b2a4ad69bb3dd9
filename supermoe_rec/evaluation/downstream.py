"""The universality protocol: frozen user vectors, the same small downstream models for every kind of vector.

Dimension letters: U users, F feature width, Y classes or labels.

**Protocol** (RecSys Challenge 2025 style). Every kind of user vector is frozen and gets exactly the same
downstream models, fitted per task:

- ``linear``: logistic regression (classes, binary, one-vs-rest for multi-label) or ridge regression (regression);
- ``mlp``: a 1-hidden-layer MLP (64 ReLU units, Adam, 200 epochs, seeded) from scikit-learn.

Dense vectors are standardised (scaler fitted on train users); TF-IDF bags are used as they are. One fixed, seeded
split of the users into train / valid / test (60 / 20 / 20 %, :func:`split_users`) serves every task and kind. Each
model's one setting (C of the logistic regression, alpha of ridge and of the MLP's L2 penalty) is chosen on the
valid users by :func:`choose`, which is only ever given train and valid rows; the chosen model (fitted on train
users) is then scored once on the test users. Class tasks use balanced class weights and are chosen by balanced
accuracy; binary and multi-label tasks by (mean) AUC; regression by R².

Metrics, per model family (``linear_*`` and ``mlp_*``): balanced accuracy, macro-F1 and accuracy for classes (plus
AUC for two classes); AUC and balanced accuracy for binary tasks; mean AUC over the labels for multi-label tasks (a
label whose test users are all one class is skipped, and the count is kept); R², RMSE and the RMSE of the train
mean for regression. ``majority`` is the constant predictor (the train users' most frequent class, their label
rates, or their mean), entered under both families.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
import pandas as pd
import scipy.sparse as sp  # type: ignore[import-untyped]
from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
from sklearn.feature_extraction.text import TfidfTransformer  # type: ignore[import-untyped]
from sklearn.linear_model import LogisticRegression, Ridge  # type: ignore[import-untyped]
from sklearn.metrics import (  # type: ignore[import-untyped]
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
from sklearn.multiclass import OneVsRestClassifier  # type: ignore[import-untyped]
from sklearn.neural_network import MLPClassifier, MLPRegressor  # type: ignore[import-untyped]
from sklearn.pipeline import make_pipeline  # type: ignore[import-untyped]
from sklearn.preprocessing import StandardScaler  # type: ignore[import-untyped]
from sklearn.utils.class_weight import compute_sample_weight  # type: ignore[import-untyped]
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.protocol import split_sizes

# scipy and scikit-learn ship no type information: their imports above carry type: ignore.

FAMILIES = ("linear", "mlp")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / valid / test users
LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
MLP_ALPHAS = (0.01, 1.0, 10.0, 100.0)  # weak signals on ~600 users need strong L2 (valid picks up to 100)
MLP_HIDDEN = 64
MLP_EPOCHS = 200  # Adam over minibatches of 200 users (scikit-learn's default batch)

NEXT_GENRE_ITEMS = 10
ACTIVE_WINDOW_S = 30 * 86_400
# The median, over ML-100k users, of the held-out items rated within 30 days of the vector's time is 12, so ">= 12"
# splits the users 57/43; a small N is degenerate (">= 5": 95% positive, since every user holds out >= 4 items).
ACTIVE_MIN_ITEMS = 12

CLASSES, BINARY, MULTILABEL, REGRESSION = "classes", "binary", "multilabel", "regression"
# The metric each task type is ranked by (chart, summary); both families report it.
PRIMARY = {CLASSES: "macro_f1", BINARY: "auc", MULTILABEL: "mean_auc", REGRESSION: "r2"}

# [U, F] dense float array or scipy CSR matrix (scipy is untyped, so the alias is Any).
Features: TypeAlias = Any

__all__ = [
    "FAMILIES",
    "PRIMARY",
    "Task",
    "UserSplit",
    "choose",
    "evaluate_kind",
    "future_tasks",
    "majority_scores",
    "mean_predictor_rmse",
    "score_model",
    "split_users",
    "tfidf_features",
]


@dataclass(frozen=True)
class Task:
    """A downstream task over the suite's users.

    Attributes:
        name: the task's name in the report.
        type: one of ``classes``, ``binary``, ``multilabel``, ``regression``.
        y: [U] labels (strings for classes, 0/1 for binary, floats for regression) or [U, Y] 0/1 for multi-label.
        description: one line for the report.
    """

    name: str
    type: str
    y: npt.NDArray[Any]
    description: str = ""

    @property
    def primary(self) -> str:
        return PRIMARY[self.type]


@dataclass(frozen=True)
class UserSplit:
    """Positions (into a user order) of the train, valid and test users; disjoint, ascending.

    ``stratified``: whether the split kept each label's share (:func:`split_users` with ``labels``).
    """

    train: IntArray
    valid: IntArray
    test: IntArray
    stratified: bool = False


def split_users(
    num_users: int,
    seed: int,
    fractions: Sequence[float] = SPLIT_FRACTIONS,
    labels: npt.NDArray[Any] | None = None,
) -> UserSplit:
    """The one seeded split of users into train / valid / test positions, for the suite and the probes.

    Without ``labels`` (the suite): one seeded permutation of the users, cut by ``fractions`` (valid and test
    rounded). With ``labels`` (the probes: one attribute per user, no valid users): scikit-learn's
    ``train_test_split`` with ``fractions[2]`` held out, stratified by the labels when every class has 2+ users.

    Example::

        >>> s = split_users(10, seed=0)
        >>> len(s.train), len(s.valid), len(s.test)
        (6, 2, 2)
        >>> s = split_users(10, seed=0, fractions=(0.7, 0.0, 0.3), labels=np.array(list("aabbbaabba")))
        >>> len(s.train), len(s.valid), len(s.test), s.stratified
        (7, 0, 3, True)
    """
    if labels is not None:
        if fractions[1] != 0:
            raise ValueError("a stratified split (labels given) has no valid users: fractions[1] must be 0")
        stratified = bool(pd.Series(labels).value_counts().min() >= 2)
        train, test = train_test_split(
            np.arange(num_users), test_size=fractions[2], random_state=seed, stratify=labels if stratified else None
        )
        return UserSplit(np.sort(train), np.zeros(0, dtype=np.int64), np.sort(test), stratified)
    order = np.random.default_rng(seed).permutation(num_users).astype(np.int64)
    n_valid = round(fractions[1] * num_users)
    n_test = round(fractions[2] * num_users)
    n_train = num_users - n_valid - n_test
    return UserSplit(
        np.sort(order[:n_train]), np.sort(order[n_train : n_train + n_valid]), np.sort(order[n_train + n_valid :])
    )


def tfidf_features(bag: sp.csr_matrix, train: IntArray) -> sp.csr_matrix:
    """TF-IDF rows of every user, with the IDF fitted on the ``train`` users only (other users leak nothing)."""
    return TfidfTransformer().fit(bag[train]).transform(bag).tocsr()


# ----------------------------------------------------------------------------------------------------- labels


def future_tasks(
    ratings: pd.DataFrame,
    items: pd.DataFrame,
    user_keys: npt.ArrayLike,
    valid_fraction: float,
    test_fraction: float,
    genres: Sequence[str],
) -> list[Task]:
    """Tasks about each user's future after the vector's time (the ml-mt split: see
    :mod:`supermoe_rec.evaluation.suite`).

    A user's ratings are sorted by (timestamp, item_id) as the ml-mt protocol sorts them; the vector's time t0 is
    the timestamp of the user's last train rating, and the *next items* are the user's valid + test ratings (the
    last ``valid_fraction + test_fraction`` of them, at least 2), in time order.

    - ``genres_next10``: which of ``genres`` appear among the first 10 next items (multi-label);
    - ``active_30d``: at least :data:`ACTIVE_MIN_ITEMS` next items have a timestamp within 30 days after t0;
    - ``like_rate``: the share of the next items rated 4 or 5 (regression).

    Args:
        ratings: user_id, item_id, rating, timestamp.
        items: item_id, genres (tuples of genre names).
        user_keys: [U] the users, in the suite's order (every one must have ratings).
        valid_fraction, test_fraction: the run's ``data`` split.
        genres: the genre labels, in column order.
    """
    frame = ratings.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    user = frame["user_id"].to_numpy(np.int64)
    keys = np.asarray(user_keys, dtype=np.int64)
    start = np.searchsorted(user, keys, side="left")
    count = np.searchsorted(user, keys, side="right") - start
    if (count == 0).any():
        raise ValueError(f"user {keys[np.argmax(count == 0)]} has no ratings")
    n_train = np.array([split_sizes(int(n), valid_fraction, test_fraction)[0] for n in count], dtype=np.int64)
    time = frame["timestamp"].to_numpy(np.int64)
    rating = frame["rating"].to_numpy(np.int64)
    item = frame["item_id"].to_numpy(np.int64)
    genre_of = dict(zip(items["item_id"].to_numpy(np.int64), items["genres"], strict=True))
    column = {g: j for j, g in enumerate(genres)}
    genre_y = np.zeros((len(keys), len(genres)), dtype=np.int64)
    active = np.zeros(len(keys), dtype=np.int64)
    like = np.zeros(len(keys), dtype=np.float64)
    for u, (s, n, t) in enumerate(zip(start, count, n_train, strict=True)):
        t0 = time[s + t - 1]
        nxt = slice(s + t, s + n)
        for it in item[nxt][:NEXT_GENRE_ITEMS]:
            for g in genre_of[int(it)]:
                if g in column:
                    genre_y[u, column[g]] = 1
        active[u] = int((time[nxt] <= t0 + ACTIVE_WINDOW_S).sum() >= ACTIVE_MIN_ITEMS)
        like[u] = float((rating[nxt] >= 4).mean())
    return [
        Task(
            "genres_next10",
            MULTILABEL,
            genre_y,
            f"which of the {len(genres)} genres appear among the user's next {NEXT_GENRE_ITEMS} items (mean AUC)",
        ),
        Task(
            "active_30d",
            BINARY,
            active,
            f"rates >= {ACTIVE_MIN_ITEMS} items within 30 days after the vector's time (held-out items only)",
        ),
        Task("like_rate", REGRESSION, like, "share of the next items rated >= 4"),
    ]


# ----------------------------------------------------------------------------------------------------- models


def _estimator(family: str, task_type: str, setting: float, seed: int) -> Any:
    if family == "linear":
        if task_type == REGRESSION:
            return Ridge(alpha=setting)
        logistic = LogisticRegression(
            C=setting,
            class_weight=None if task_type == MULTILABEL else "balanced",
            solver="lbfgs",
            max_iter=500,
        )
        return OneVsRestClassifier(logistic) if task_type == MULTILABEL else logistic
    kwargs = {"hidden_layer_sizes": (MLP_HIDDEN,), "alpha": setting, "max_iter": MLP_EPOCHS, "random_state": seed}
    return MLPRegressor(**kwargs) if task_type == REGRESSION else MLPClassifier(**kwargs)


def _grid(family: str, task_type: str) -> tuple[float, ...]:
    if family == "mlp":
        return MLP_ALPHAS
    return RIDGE_ALPHAS if task_type == REGRESSION else LOGISTIC_CS


def _fit(family: str, task_type: str, setting: float, x: Features, y: npt.NDArray[Any], seed: int) -> Any:
    model = _estimator(family, task_type, setting, seed)
    dense = not sp.issparse(x)
    pipeline = make_pipeline(StandardScaler(), model) if dense else make_pipeline(model)
    fit_kwargs: dict[str, Any] = {}
    if family == "mlp" and task_type in (CLASSES, BINARY):
        # The MLP takes no class_weight: balanced sample weights do the same as the logistic regression's.
        fit_kwargs[f"{pipeline.steps[-1][0]}__sample_weight"] = compute_sample_weight("balanced", y)
    with warnings.catch_warnings():
        # A fixed epoch budget, identical for every kind, is the protocol: not reaching the tolerance is expected.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # one-vs-rest: a genre absent from the train users
        pipeline.fit(x, y, **fit_kwargs)
    return pipeline


def _auc(y: npt.NDArray[Any], score: npt.NDArray[Any]) -> float:
    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else float("nan")


def _positive_score(model: Any, x: Features) -> npt.NDArray[np.float64]:
    proba = np.asarray(model.predict_proba(x), dtype=np.float64)
    return proba[:, 1] if proba.ndim == 2 and proba.shape[1] == 2 else proba


def score_model(model: Any, task_type: str, x: Features, y: npt.NDArray[Any]) -> dict[str, float]:
    """The task type's metrics of a fitted model on users ``x`` with labels ``y`` (the module docstring)."""
    if task_type == REGRESSION:
        pred = np.asarray(model.predict(x), dtype=np.float64)
        return {"r2": float(r2_score(y, pred)), "rmse": float(np.sqrt(mean_squared_error(y, pred)))}
    if task_type == MULTILABEL:
        proba = np.asarray(model.predict_proba(x), dtype=np.float64)  # (U, Y)
        aucs = [_auc(y[:, c], proba[:, c]) for c in range(y.shape[1])]
        scored = [a for a in aucs if not np.isnan(a)]
        return {"mean_auc": float(np.mean(scored)) if scored else float("nan"), "labels_scored": float(len(scored))}
    pred = model.predict(x)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred))}
    if task_type == BINARY:
        return {"auc": _auc(y, _positive_score(model, x)), **out}
    out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
    out["accuracy"] = float(accuracy_score(y, pred))
    classes = getattr(model, "classes_", None)
    if classes is not None and len(classes) == 2:
        out["auc"] = _auc((np.asarray(y) == classes[1]).astype(np.int64), _positive_score(model, x))
    return out


def _criterion(task_type: str, metrics: Mapping[str, float]) -> float:
    """What the chooser maximises on the valid users."""
    key = {CLASSES: "balanced_accuracy", BINARY: "auc", MULTILABEL: "mean_auc", REGRESSION: "r2"}[task_type]
    value = metrics[key]
    return -np.inf if np.isnan(value) else float(value)


def choose(
    family: str,
    task_type: str,
    x_train: Features,
    y_train: npt.NDArray[Any],
    x_valid: Features,
    y_valid: npt.NDArray[Any],
    seed: int = 0,
) -> tuple[Any, float, float]:
    """Fit ``family`` once per setting of its grid on the train users; keep the best on the valid users.

    Takes only train and valid rows: the test users cannot influence the choice (they are not an argument).

    Returns:
        (the chosen model, fitted on the train users; its setting; its valid criterion).
    """
    best: tuple[Any, float, float] | None = None
    for setting in _grid(family, task_type):
        model = _fit(family, task_type, setting, x_train, y_train, seed)
        value = _criterion(task_type, score_model(model, task_type, x_valid, y_valid))
        if best is None or value > best[2]:  # ties keep the first (smaller) setting
            best = (model, setting, value)
    assert best is not None
    return best


def _rows(x: Features, rows: IntArray) -> Features:
    return x[rows]  # fancy indexing copies: a chooser given x_train, x_valid never sees other rows


def evaluate_kind(
    x: Features, tasks: Sequence[Task], split: UserSplit, seed: int = 0, families: Sequence[str] = FAMILIES
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Every task with every family on one kind of vector.

    Args:
        x: [U, F] the kind's vectors (dense or sparse), rows in the suite's user order.
        tasks: the tasks, labels in the same user order.
        split: the user split.
        seed: seeds the MLPs.
        families: model families to fit.

    Returns:
        ({task: {"<family>_<metric>": test value}}, {task: {"<family>_setting": chosen setting,
        "<family>_valid": its valid criterion}}).
    """
    scores: dict[str, dict[str, float]] = {}
    settings: dict[str, dict[str, float]] = {}
    rows = (_rows(x, split.train), _rows(x, split.valid), _rows(x, split.test))
    with threadpool_limits(limits=1):  # small fits: one BLAS thread is faster than many on a shared machine
        for task in tasks:
            scores[task.name], settings[task.name] = _evaluate_task(task, rows, split, seed, families)
    return scores, settings


def _evaluate_task(
    task: Task,
    x: tuple[Features, Features, Features],
    split: UserSplit,
    seed: int,
    families: Sequence[str],
) -> tuple[dict[str, float], dict[str, float]]:
    """One task, every family: choose on (train, valid) rows, then score once on the test rows ``x[2]``."""
    x_train, x_valid, x_test = x
    y = task.y
    scores: dict[str, float] = {}
    settings: dict[str, float] = {}
    for family in families:
        model, setting, valid = choose(family, task.type, x_train, y[split.train], x_valid, y[split.valid], seed)
        for metric, value in score_model(model, task.type, x_test, y[split.test]).items():
            scores[f"{family}_{metric}"] = value
        settings[f"{family}_setting"] = setting
        settings[f"{family}_valid"] = valid
    return scores, settings


def majority_scores(tasks: Sequence[Task], split: UserSplit) -> dict[str, dict[str, float]]:
    """The constant predictor's test metrics per task, under both family prefixes (the module docstring)."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        y_train, y_test = task.y[split.train], task.y[split.test]
        metrics: dict[str, float]
        if task.type == REGRESSION:
            mean = float(np.mean(y_train))
            pred = np.full(len(y_test), mean)
            metrics = {"r2": float(r2_score(y_test, pred)), "rmse": float(np.sqrt(mean_squared_error(y_test, pred)))}
        elif task.type == MULTILABEL:
            metrics = {"mean_auc": 0.5, "labels_scored": float(sum(len(np.unique(c)) == 2 for c in y_test.T))}
        else:
            values, counts = np.unique(y_train, return_counts=True)
            pred = np.full(len(y_test), values[np.argmax(counts)])
            metrics = {"balanced_accuracy": float(balanced_accuracy_score(y_test, pred))}
            if task.type == BINARY:
                metrics = {"auc": 0.5, **metrics}
            else:
                metrics["macro_f1"] = float(f1_score(y_test, pred, average="macro", zero_division=0))
                metrics["accuracy"] = float(accuracy_score(y_test, pred))
                if len(values) == 2:
                    metrics["auc"] = 0.5
        out[task.name] = {f"{family}_{m}": v for family in FAMILIES for m, v in metrics.items()}
    return out


def mean_predictor_rmse(task: Task, split: UserSplit) -> float:
    """RMSE on the test users of predicting the train users' mean (the regression reference)."""
    y_test = np.asarray(task.y[split.test], dtype=np.float64)
    return float(np.sqrt(np.mean((y_test - float(np.mean(task.y[split.train]))) ** 2)))


def iter_metrics(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> Iterator[tuple[str, str, str, float]]:
    """(kind, task, metric, value) over a nested ``{kind: {task: {metric: value}}}`` mapping."""
    for kind, tasks in scores.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                yield kind, task, metric, value
