"""The universality suite: ``supermoe-rec probe --suite`` and ``--suite-aggregate``.

The suite (``supermoe-rec probe --suite --run R [--compare-run NAME=RUN ...]``) asks whether the
frozen user vector transfers to tasks it never trained on, and retrieves next items with it. It writes
``<run>/universal.json`` (``{"embeddings": {KIND: {TASK: {METRIC: value}}}, "retrieval": {MODEL: {"hr@10",
"ndcg@10", "mrr@10"}}}`` plus metadata) and ``<run>/universal.md``; ``--suite-aggregate RUN1 RUN2 RUN3 --out DIR``
writes their mean ± std and a chart. Behaviour-only ml100k runs only (no attribute is a model input).

- *The vector's time*: the end of the user's ml-mt train split. The vector is the export's (the first valid sample:
  its history is the user's last ``max_history`` train items); the user's *next items* are their valid + test
  ratings, in time order.
- *Downstream protocol*: :mod:`supermoe_rec.evaluation.downstream` (frozen vectors, logistic/ridge regression and a
  1-hidden-layer MLP, settings chosen on valid users of one seeded 60/20/20 user split, scored on its test users).
- *Tasks*: ``gender``, ``age`` (7 buckets), ``occupation`` (21) from the users table; ``genres_next10`` (which of
  the 18 genres appear among the next 10 items; mean AUC); ``active_30d`` (at least 12 next items within 30 days of
  the vector's time, the median count: 57% of the users are positive; AUC); ``like_rate`` (share of the
  next items rated >= 4; R² and RMSE against the train mean).
- *Kinds*: ``user`` ([USER]), ``task_<name>`` (each task token), ``item_mean`` (mean of the run's trained
  item-table rows over that same history), ``random_encoder`` (the run's model built from its config with seed
  ``train.seed + 1000``, untrained), ``tfidf`` (TF-IDF over every train item of the user, IDF from the train
  users), ``majority`` (constant predictor), and one per ``--compare-run`` (that run's ``user``).
- *Retrieval*: :mod:`supermoe_rec.evaluation.retrieval` (RecBole's sequential protocol on ml-100k). The run's
  [USER] vector at each target comes from the run's model in eval mode on a sample whose history is exactly the
  protocol's input (built through :class:`~supermoe_rec.data.dataset.TabularDataset` with the run's schema), and
  items are scored by ``SuperMoEOverArch.score_items(user, item-table rows)``. A run trained without the next-items
  objective has no item scorer: ``--scorer auto`` then scores through a seeded random projection (a stand-in,
  flagged in the report: plumbing, not a result). ``MODEL`` is named by the arch (``supermoe``) and is unmasked;
  ``MODEL_masked`` excludes already-rated items; ``popularity`` ranks by train counts; ``--peer`` adds RecBole's
  figures from ``benchmarks/recbole_peer.py`` as ``recbole_<model>``. A ``data.leave_one_out`` run (RecBole's
  split, 2 held-out ratings per user) gets the attribute tasks and retrieval, not the future-behaviour tasks; so
  does a compare run trained on another split than the suite's run (its vector sits at another time).

The probe of user attributes (``supermoe-rec probe``) is :mod:`supermoe_rec.evaluation.probe`; the suite shares its
inputs (:func:`~supermoe_rec.evaluation.probe.user_attributes`, :func:`~supermoe_rec.evaluation.probe.item_bags`)
and the downstream protocol's user split and TF-IDF baseline (:mod:`supermoe_rec.evaluation.downstream`).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
import torch.distributed as dist
from tabulate import tabulate

from supermoe_rec.config.experiment import ConfigError, DataConfig, ExperimentConfig
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.jagged import IntArray
from supermoe_rec.data.movielens import ML100K_GENRES, MovieLens, fetch_movielens
from supermoe_rec.data.output import write_text
from supermoe_rec.data.protocol import build_ml_mt
from supermoe_rec.data.schema import FeatureSpec, Schema
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.distributed.process_group import init_distributed
from supermoe_rec.distributed.sharding import build_train_module, shard
from supermoe_rec.evaluation import downstream, retrieval
from supermoe_rec.evaluation.export import (
    RestoredModel,
    latest_rows,
    load_run_config,
    restore_model,
    user_representations,
)
from supermoe_rec.evaluation.plots import plot_suite_primary
from supermoe_rec.evaluation.probe import check_behaviour_only, item_bags, user_attributes
from supermoe_rec.models.layout import FeatureLayout
from supermoe_rec.models.supermoe import SuperMoEOverArch

log = logging.getLogger(__name__)

__all__ = [
    "ATTRIBUTE_TASKS",
    "SCORERS",
    "STAND_IN",
    "SUITE_JSON",
    "SUITE_MD",
    "SUITE_PNG",
    "aggregate_suites",
    "history_means",
    "item_scorer",
    "item_table",
    "merge_peer",
    "model_retrieval",
    "random_encoder",
    "retrieval_user_vectors",
    "stand_in_scorer",
    "suite_command",
    "suite_markdown",
    "suite_run",
    "suite_tasks",
]

SUITE_JSON = "universal.json"
SUITE_MD = "universal.md"
SUITE_PNG = "universal.png"
RANDOM_ENCODER_SEED_OFFSET = 1000  # the random encoder is built with train.seed + this, and never trained
STAND_IN = "stand_in_random_projection"
SCORERS = ("auto", "score_items", "stand_in")
ATTRIBUTE_TASKS = {
    "gender": "gender (M/F) from the users table",
    "age": "age bucket (7 classes: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+)",
    "occupation": "occupation (21 classes)",
}

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _over_arch(model: RestoredModel) -> SuperMoEOverArch:
    arches = [m for m in model.dmp.modules() if isinstance(m, SuperMoEOverArch)]
    if len(arches) != 1:
        raise ConfigError(f"model.arch: expected one SuperMoEOverArch in the model, found {len(arches)}")
    return arches[0]


def item_table(model: RestoredModel, table: str = "item") -> npt.NDArray[np.float32]:
    """[V, D] every row of the run's ``table``, assembled from the (world-of-one) DMP's shards.

    Raises:
        ConfigError: the model has no such table, or its shards do not cover it (more than one rank).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchRec's state dict still holds ShardedTensors
        state = model.dmp.state_dict()
    keys = [k for k in state if k.endswith(f".{table}.weight") and "sparse_arch" in k]
    if not keys:
        raise ConfigError(f"schema: the model has no {table!r} table")
    weight = state[keys[0]]
    if not hasattr(weight, "local_shards"):  # a plain tensor (data-parallel table)
        return np.asarray(weight.detach().float().cpu().numpy(), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        rows, cols = (int(s) for s in weight.size())
        pieces = weight.local_shards()
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    for piece in pieces:
        (r0, c0), (nr, nc) = piece.metadata.shard_offsets, piece.metadata.shard_sizes
        out[r0 : r0 + nr, c0 : c0 + nc] = piece.tensor.detach().float().cpu().numpy()
    if np.isnan(out).any():
        raise ConfigError(f"the {table!r} table is sharded over ranks this process does not hold")
    return out


def stand_in_scorer(model_dim: int, item_dim: int, seed: int = 0) -> Scorer:
    """A seeded random projection M -> D standing in for ``score_items`` on runs without it (plumbing only)."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(model_dim, item_dim, generator=generator) / model_dim**0.5  # (M, D)

    def score(user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        scores: torch.Tensor = (user.float() @ projection.to(user.device)) @ items.float().T  # (G, N)
        return scores

    return score


def item_scorer(model: RestoredModel, items: torch.Tensor, mode: str = "auto", seed: int = 0) -> tuple[Scorer, str]:
    """How the suite scores items with a user vector: the model's ``score_items``, or the stand-in.

    ``auto`` uses ``SuperMoEOverArch.score_items`` when the run was trained with the next-items objective (the
    method exists and accepts a call) and otherwise :func:`stand_in_scorer`; ``score_items`` insists on the
    model's; ``stand_in`` always uses the stand-in.

    Returns:
        (the scorer: user [G, M], items [N, D] -> scores [G, N]; its name, recorded in the report).
    """
    if mode not in SCORERS:
        raise ConfigError(f"--scorer: {mode!r} is not one of {list(SCORERS)}")
    arch = _over_arch(model)
    model_dim = int(arch.encoder.d_model)
    if mode != "stand_in":
        method = getattr(arch, "score_items", None)
        try:
            if method is None:
                raise ConfigError("the model has no score_items (a run without the next-items objective)")
            with torch.no_grad():
                method(torch.zeros(1, model_dim, device=items.device), items[:1])
            return method, "score_items"
        except Exception as exc:  # score_items raises on runs trained without the next-items objective
            if mode == "score_items":
                raise ConfigError(f"--scorer score_items: {exc}") from exc
            log.warning("no trained item scorer (%s): retrieval uses the random-projection stand-in", exc)
    return stand_in_scorer(model_dim, int(items.shape[1]), seed), STAND_IN


def _retrieval_template(ml: MovieLens, cfg: DataConfig, users: npt.NDArray[np.int64]) -> pd.DataFrame:
    """One ml-mt sample row per user (their first test row), to carry every column the run's schema reads."""
    frame = build_ml_mt(ml, cfg).frames["test"]
    first = frame.drop_duplicates("user_id", keep="first").set_index("user_id")
    missing = np.setdiff1d(users, first.index.to_numpy())
    if len(missing):
        raise ConfigError(f"retrieval: user(s) {missing[:5].tolist()} have no ml-mt test row")
    out = first.loc[users].reset_index()
    out["group_id"] = np.arange(len(out), dtype=np.int64)  # one group per user
    return out


def _model_device(model: RestoredModel) -> torch.device:
    """Where the model's dense modules (and so its batches) live."""
    return next(_over_arch(model).parameters()).device


def _history_feature(schema: Schema) -> FeatureSpec:
    """The history the encoder reads (the model's layout), which must be a single per-group sequence feature."""
    names = FeatureLayout.from_schema(schema).history
    if len(names) != 1:
        raise ConfigError(f"schema: the suite needs exactly one history feature, the model reads {list(names)}")
    return next(f for f in schema.sequence_features if f.name == names[0])


def retrieval_user_vectors(
    model: RestoredModel, template: pd.DataFrame, values: IntArray, offsets: IntArray
) -> torch.Tensor:
    """[U, M] the [USER] vector of each template user whose history is exactly row u of (values, offsets).

    The batch goes through :class:`TabularDataset` with the run's schema (a behaviour-only run reads no profile),
    one group per user, and the model runs in eval mode without gradients.
    """
    frame = template.copy()
    cells = np.empty(len(frame), dtype=object)
    cells[:] = [values[offsets[u] : offsets[u + 1]] for u in range(len(frame))]
    frame[_history_feature(model.data.schema).column] = cells
    ds = TabularDataset(frame, model.data.schema, "retrieval inputs")
    order = pd.Index(ds.user_keys).get_indexer(template["user_id"].to_numpy())  # (U,) dataset row of each user
    batch_size = model.cfg.train.eval_batch_size
    device = _model_device(model)
    parts = []
    model.dmp.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            _, out = model.dmp(ds.batch(order[start : start + batch_size].astype(np.int64)).to(device))
            if out.model.user is None:
                raise ConfigError(f"model.arch: {model.cfg.model.arch.value} returned no user representation")
            parts.append(out.model.user.float().cpu())
    model.dmp.train()
    return torch.cat(parts)


def model_retrieval(
    model: RestoredModel,
    ml: MovieLens,
    seqs: retrieval.UserSequences,
    mode: str = "auto",
    seed: int = 0,
) -> tuple[dict[str, Any], str]:
    """Valid and test retrieval metrics of a run's [USER] vector (unmasked and masked), and the scorer used."""
    items = torch.from_numpy(item_table(model)).to(_model_device(model))  # (V, D)
    scorer, name = item_scorer(model, items, mode, seed)
    template = _retrieval_template(ml, model.cfg.data, seqs.users)
    out: dict[str, Any] = {}
    for split in retrieval.SPLITS:
        # RecBole's input is the last 50 items; a model with a shorter data.max_history reads what it can.
        max_len = min(retrieval.MAX_LEN, model.cfg.data.max_history)
        user = retrieval_user_vectors(model, template, *seqs.inputs(split, max_len))
        with torch.no_grad():
            scores = scorer(user, items).float().cpu().numpy()  # (U, V)
        out[split] = retrieval.score_and_rank(seqs, split, scores)
    return out, name


def random_encoder(cfg: ExperimentConfig, data: SplitData) -> RestoredModel:
    """The run's model built from its config with seed ``train.seed + RANDOM_ENCODER_SEED_OFFSET``, never trained."""
    ctx = init_distributed(cfg.train.device)
    torch.manual_seed(cfg.train.seed + RANDOM_ENCODER_SEED_OFFSET)
    module = build_train_module(cfg, data.schema, device=ctx.device, optimizers=False)
    return RestoredModel(cfg, data, shard(module, cfg, data.schema, ctx.device).dmp, {})


def history_means(data: SplitData, keys: npt.NDArray[Any], table: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
    """[U, D] mean item-table row over the history each user's [USER] vector reads (the export's row), keys order."""
    history = _history_feature(data.schema).name
    out = np.zeros((len(keys), table.shape[1]), dtype=np.float32)
    index = pd.Index(keys)
    for split, (split_keys, rows) in latest_rows(data).items():
        jag = data.splits[split].features[history]
        for key, row in zip(split_keys, rows, strict=True):
            u = index.get_loc(key)
            hist = jag.values[jag.offsets[row] : jag.offsets[row + 1]]
            if len(hist):
                out[u] = table[hist].mean(axis=0)
    return out


def _attribute_tasks(attributes: pd.DataFrame, keys: npt.NDArray[Any]) -> list[downstream.Task]:
    return [
        downstream.Task(name, downstream.CLASSES, attributes.loc[keys, name].to_numpy().astype(str), text)
        for name, text in ATTRIBUTE_TASKS.items()
    ]


def suite_tasks(ml: MovieLens, cfg: DataConfig, keys: npt.NDArray[Any]) -> list[downstream.Task]:
    """Every task of the suite, labels in ``keys`` order (the module docstring's suite section).

    A ``data.leave_one_out`` run (RecBole's split) holds out only each user's last two ratings, too few for the
    future-behaviour tasks: it gets the attribute tasks only (retrieval is unaffected).
    """
    genres = [g for g in ML100K_GENRES if g != "unknown"]
    tasks = _attribute_tasks(user_attributes(cfg), keys)
    if getattr(cfg, "leave_one_out", False):
        log.warning("data.leave_one_out: 2 held-out ratings per user; the future-behaviour tasks are skipped")
        return tasks
    return tasks + downstream.future_tasks(ml.ratings, ml.items, keys, cfg.valid_fraction, cfg.test_fraction, genres)


def _user_kinds(model: RestoredModel, name: str, keys: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    reps = user_representations(model)
    if not np.array_equal(reps.user_keys, keys):
        raise ConfigError(f"{name}: represents other users than the suite's run")
    return reps.user


def suite_run(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    seed: int = 0,
    compare_runs: Mapping[str, str | Path] | None = None,
    scorer: str = "auto",
    families: Sequence[str] = downstream.FAMILIES,
    only_kinds: Sequence[str] | None = None,
    peer: str | Path | None = None,
) -> dict[str, Any]:
    """Run the universality suite on a behaviour-only ml100k run; write ``universal.json`` and ``universal.md``.

    Joins (or creates) a world-of-one process group; the caller owns it afterwards.

    Args:
        run_dir: the run directory.
        overrides: ``--section.key=value`` overrides of the run's config.
        seed: seeds the user split and the MLPs (fixed across the runs of a study, so seeds vary only the model).
        compare_runs: name -> run directory of more behaviour-only runs; each adds its ``user`` kind (and its
            retrieval) under that name.
        scorer: how retrieval scores items (:func:`item_scorer`).
        families: downstream model families (default both).
        only_kinds: fit only these built-in kinds (default all; ``majority`` and compare runs always), e.g. to
            keep a smoke test short.
        peer: ``benchmarks/recbole_peer.py``'s JSON, whose RecBole figures join the retrieval table.

    Returns:
        What ``universal.json`` holds.
    """
    run_dir = Path(run_dir)
    cfg: ExperimentConfig = load_run_config(run_dir, overrides)
    if cfg.data.source != "ml100k":
        raise ConfigError(f"data.source: the suite runs on ml100k (RecBole's protocol), not {cfg.data.source!r}")
    data = load_data(cfg.data)
    check_behaviour_only(data.schema)
    ml = fetch_movielens(cfg.data.source, cfg.data.cache_dir, cfg.data.try_url, cfg.data.url_timeout_s)
    model, tag = restore_model(run_dir, cfg, data)
    reps = user_representations(model)
    keys = reps.user_keys
    table = item_table(model)
    arch = cfg.model.arch.value

    kinds: dict[str, Any] = {"user": reps.user, **{f"task_{n}": m for n, m in reps.tasks.items()}}
    described = {"user": "[USER] token output of the run", **{f"task_{n}": f"task token {n}" for n in reps.tasks}}
    split = downstream.split_users(len(keys), seed)

    def wanted(kind: str) -> bool:
        return only_kinds is None or kind in only_kinds

    if wanted("item_mean"):
        kinds["item_mean"] = history_means(data, keys, table)
        described["item_mean"] = "mean of the run's trained item-table rows over the history [USER] reads"
    if wanted("random_encoder"):
        kinds["random_encoder"] = _user_kinds(random_encoder(cfg, data), "random_encoder", keys)
        described["random_encoder"] = (
            f"[USER] of the run's model built with seed train.seed+{RANDOM_ENCODER_SEED_OFFSET}, untrained"
        )
    if wanted("tfidf"):
        kinds["tfidf"] = downstream.tfidf_features(item_bags(data, keys), split.train)
        described["tfidf"] = "TF-IDF bag of every train item of the user (IDF from the train users)"
    for kind in [k for k in kinds if not wanted(k)]:
        del kinds[kind], described[kind]

    seqs = retrieval.user_sequences(ml.ratings, ml.items["item_id"])
    pop = retrieval.popularity_scores(seqs, len(table))
    ranked: dict[str, Any] = {"popularity": {s: retrieval.score_and_rank(seqs, s, pop) for s in retrieval.SPLITS}}
    scorers = {"popularity": "train counts"}
    ranked[arch], scorers[arch] = model_retrieval(model, ml, seqs, scorer, seed)

    attributes_only: set[str] = set()
    for name, other in (compare_runs or {}).items():
        if name in kinds or name in ranked:
            raise ConfigError(f"--compare-run {name}: the name is taken (use another)")
        other_cfg = load_run_config(other)
        other_data = data if other_cfg.data == cfg.data else load_data(other_cfg.data)
        check_behaviour_only(other_data.schema)
        other_model, _ = restore_model(Path(other), other_cfg, other_data)
        kinds[name] = _user_kinds(other_model, name, keys)
        described[name] = f"[USER] of {other} ({other_cfg.model.arch.value})"
        if _split_of(other_cfg.data) != _split_of(cfg.data):
            # Another split puts the vector at another time (and may train on this run's next items).
            attributes_only.add(name)
            described[name] += "; trained on another split: attribute tasks only"
        ranked[name], scorers[name] = model_retrieval(other_model, ml, seqs, scorer, seed)

    tasks = suite_tasks(ml, cfg.data, keys)
    embeddings: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    for kind, x in kinds.items():
        log.info("suite: fitting the downstream models on %s", kind)
        kind_tasks = [t for t in tasks if t.name in ATTRIBUTE_TASKS] if kind in attributes_only else tasks
        embeddings[kind], settings[kind] = downstream.evaluate_kind(x, kind_tasks, split, seed, families)
    embeddings["majority"] = downstream.majority_scores(tasks, split)
    described["majority"] = "constant predictor: train users' majority class / label rates / mean"

    result: dict[str, Any] = {
        "run": str(run_dir),
        "arch": arch,
        "checkpoint": tag,
        "seed": seed,
        "users": {"all": len(keys), "train": len(split.train), "valid": len(split.valid), "test": len(split.test)},
        "families": list(families),
        "tasks": {
            t.name: {"type": t.type, "primary": t.primary, "description": t.description, **_label_summary(t)}
            for t in tasks
        },
        "kinds": described,
        "embeddings": embeddings,
        "settings": settings,
        "retrieval": _flat_retrieval(ranked, "test"),
        "retrieval_valid": _flat_retrieval(ranked, "valid"),
        "retrieval_scorers": scorers,
        "compare_runs": {k: str(v) for k, v in (compare_runs or {}).items()},
    }
    if peer is not None:
        merge_peer(result, peer)
    write_text(run_dir / SUITE_JSON, json.dumps(result, indent=2) + "\n")
    write_text(run_dir / SUITE_MD, suite_markdown(result))
    return result


def _split_of(cfg: DataConfig) -> tuple[Any, ...]:
    """What fixes a run's train/valid/test split (and so the vector's time)."""
    return (cfg.valid_fraction, cfg.test_fraction, getattr(cfg, "leave_one_out", False))


def _label_summary(task: downstream.Task) -> dict[str, Any]:
    y = task.y
    if task.type == downstream.CLASSES:
        return {"classes": len(np.unique(y))}
    if task.type == downstream.BINARY:
        return {"positive_share": float(np.mean(y))}
    if task.type == downstream.MULTILABEL:
        return {"labels": int(y.shape[1]), "mean_positive_share": float(np.mean(y))}
    return {"mean": float(np.mean(y)), "std": float(np.std(y))}


def _flat_retrieval(ranked: Mapping[str, Any], split: str) -> dict[str, dict[str, float]]:
    """``{MODEL: metrics}`` (unmasked, RecBole's sequential scoring) and ``{MODEL_masked: metrics}``."""
    out: dict[str, dict[str, float]] = {}
    for name, per_split in ranked.items():
        out[name] = dict(per_split[split]["unmasked"])
        out[f"{name}_masked"] = dict(per_split[split]["masked"])
    return out


# ------------------------------------------------------------------------------------------------ suite reports


def _cell(value: float, std: float | None = None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def _task_table(result: Mapping[str, Any], task: str, std: Mapping[str, Any] | None) -> str:
    """One row per kind: the task's metrics for every family (mean ± std when ``std`` is given)."""
    families = result.get("families", list(downstream.FAMILIES))
    meta = result["tasks"][task]
    metrics = {
        downstream.CLASSES: ["macro_f1", "balanced_accuracy"],
        downstream.BINARY: ["auc", "balanced_accuracy"],
        downstream.MULTILABEL: ["mean_auc"],
        downstream.REGRESSION: ["r2", "rmse"],
    }[meta["type"]]
    columns = [f"{f}_{m}" for f in families for m in metrics]
    rows = []
    for kind, per_task in result["embeddings"].items():
        values = per_task.get(task, {})
        sds = (std or {}).get(kind, {}).get(task, {}) if std is not None else {}
        rows.append([kind, *(_cell(values.get(c, float("nan")), sds.get(c) if std else None) for c in columns)])
    table: str = tabulate(rows, headers=["kind", *columns], tablefmt="github")
    return table


def _retrieval_table(retrieval_block: Mapping[str, Any], std: Mapping[str, Any] | None) -> str:
    rows = []
    for name, metrics in retrieval_block.items():
        sds = (std or {}).get(name, {})
        rows.append([name, *(_cell(metrics[m], sds.get(m) if std else None) for m in ("hr@10", "ndcg@10", "mrr@10"))])
    table: str = tabulate(rows, headers=["model", "HR@10", "NDCG@10", "MRR@10"], tablefmt="github")
    return table


SUITE_PROTOCOL_TEXT = (
    "Frozen user vectors; every kind gets the same downstream models (`linear`: logistic / ridge regression; "
    "`mlp`: one hidden layer of 64 ReLU units), each with one setting (C / alpha) chosen on the valid users and "
    "scored once on the test users of one fixed, seeded user split (60/20/20). Class tasks: balanced class weights, "
    "chosen by balanced accuracy. The vector's time: the end of the user's ml-mt train split (the history is the "
    "user's last train items); next items: the user's valid + test ratings. Retrieval: RecBole's sequential "
    "protocol on ml-100k (leave-one-out by time, stable ties, up to 50 input items, full ranking over 1,682 items); "
    "`MODEL` is unmasked (as RecBole scores its sequential models), `MODEL_masked` excludes the items the user rated "
    "before the target."
)


def suite_markdown(result: Mapping[str, Any], std: Mapping[str, Any] | None = None) -> str:
    """``universal.md``: protocol, one table per task, the retrieval table (mean ± std with ``std``)."""
    title = result.get("title") or f"Universality suite of `{result['run']}`"
    users = result["users"]
    lines = [f"# {title}", "", SUITE_PROTOCOL_TEXT, ""]
    lines.append(
        f"Users: {users['all']} (train {users['train']}, valid {users['valid']}, test {users['test']}); "
        f"split seed {result['seed']}." + (f" Mean ± std over {result['num_runs']} runs." if std is not None else "")
    )
    lines += ["", "## Kinds", ""] + [f"- `{k}`: {v}" for k, v in result["kinds"].items()]
    for task, meta in result["tasks"].items():
        lines += ["", f"## {task} ({meta['type']}): {meta['description']}", ""]
        lines.append(_task_table(result, task, (std or {}).get("embeddings") if std is not None else None))
    lines += ["", "## Next-item retrieval (test targets)", ""]
    if result.get("retrieval_runs") and result.get("runs") and result["retrieval_runs"] != result["runs"]:
        lines += [f"From the runs {', '.join(f'`{r}`' for r in result['retrieval_runs'])}.", ""]
    scorers = result.get("retrieval_scorers", {})
    if any(s == STAND_IN for s in scorers.values()):
        stand_ins = [k for k, s in scorers.items() if s == STAND_IN]
        lines += [
            f"**{', '.join(stand_ins)}: scored through a random projection (the run has no trained item scorer); "
            "these retrieval figures are plumbing, not results.**",
            "",
        ]
    lines.append(_retrieval_table(result["retrieval"], (std or {}).get("retrieval") if std is not None else None))
    peers = [k for k in result["retrieval"] if k.startswith("recbole_") and not k.endswith("_masked")]
    ours = [
        k for k in result["retrieval"] if not k.startswith(("recbole_", "popularity")) and not k.endswith("_masked")
    ]
    if peers and ours:
        lines += ["", "NDCG@10 ratio, ours (unmasked) / RecBole's (same protocol):", ""]
        rows = [
            [o, p, f"{result['retrieval'][o]['ndcg@10'] / result['retrieval'][p]['ndcg@10']:.3f}"]
            for o in ours
            for p in peers
            if result["retrieval"][p]["ndcg@10"] > 0
        ]
        lines.append(tabulate(rows, headers=["ours", "RecBole", "ratio"], tablefmt="github", disable_numparse=True))
    return "\n".join(lines) + "\n"


def merge_peer(result: dict[str, Any], peer: str | Path) -> dict[str, Any]:
    """Add RecBole's test figures from ``benchmarks/recbole_peer.py``'s JSON to ``result["retrieval"]``.

    Each peer model ``Name`` becomes ``recbole_<name>`` (``Pop_masked`` -> ``recbole_pop_masked``), with its
    HR@10, NDCG@10 and MRR@10; the peer's other fields (epochs, what stopped it) go to ``result["peer"]``.

    Raises:
        ConfigError: the file is missing or holds no model with the three metrics.
    """
    path = Path(peer)
    if not path.is_file():
        raise ConfigError(f"--peer: {path} is missing (write it with benchmarks/recbole_peer.py)")
    models = json.loads(path.read_text()).get("models", {})
    rows = {name: row for name, row in models.items() if all(m in row for m in ("hr@10", "ndcg@10", "mrr@10"))}
    if not rows:
        raise ConfigError(f"--peer: {path} holds no model with hr@10, ndcg@10 and mrr@10")
    for name, row in rows.items():
        result["retrieval"][f"recbole_{name.lower()}"] = {m: float(row[m]) for m in ("hr@10", "ndcg@10", "mrr@10")}
    result["peer"] = {"file": str(path), "models": rows}
    return result


def aggregate_suites(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    peer: str | Path | None = None,
    retrieval_runs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Mean ± std (sample std, ddof 1) of several runs' ``universal.json`` (e.g. 3 seeds) into ``out_dir``.

    Writes ``universal.json`` (``embeddings`` and ``retrieval`` hold the means, ``std`` the standard deviations),
    ``universal.md`` and ``universal.png`` (primary metric per task and kind, error bars: std). With ``peer``,
    RecBole's figures (one run each, no std) join the retrieval table (:func:`merge_peer`). With
    ``retrieval_runs`` (e.g. the leave-one-out twins of the runs, trained on RecBole's split), the retrieval table
    is theirs instead of ``run_dirs``'.

    Raises:
        ConfigError: no run, a run without ``universal.json``, or runs with different kinds or tasks.
    """
    results = _read_suites(run_dirs)
    first = results[0]
    for other, run in zip(results[1:], run_dirs[1:], strict=True):
        if set(other["embeddings"]) != set(first["embeddings"]) or set(other["tasks"]) != set(first["tasks"]):
            raise ConfigError(f"--suite-aggregate: {run} has other kinds or tasks than {run_dirs[0]}")

    def stats(blocks: list[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        mean: dict[str, Any] = {}
        std: dict[str, Any] = {}
        for key, value in blocks[0].items():
            if isinstance(value, Mapping):
                mean[key], std[key] = stats([b[key] for b in blocks])
            else:
                values = np.asarray([float(b[key]) for b in blocks], dtype=np.float64)
                mean[key] = float(np.mean(values))
                # One run has no spread: its std is reported as 0 and the title says there was one run.
                std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return mean, std

    emb_mean, emb_std = stats([r["embeddings"] for r in results])
    retrieval_results = results if not retrieval_runs else _read_suites(retrieval_runs)
    ret_mean, ret_std = stats([r["retrieval"] for r in retrieval_results])
    out: dict[str, Any] = {
        "title": (
            f"Universality suite, mean ± std over {len(results)} runs"
            if len(results) > 1
            else "Universality suite of one run (one seed: no std; ± 0 below means one run, not no spread)"
        ),
        "run": ", ".join(str(r) for r in run_dirs),
        "runs": [str(r) for r in run_dirs],
        "num_runs": len(results),
        "arch": first["arch"],
        "seed": first["seed"],
        "users": first["users"],
        "families": first.get("families", list(downstream.FAMILIES)),
        "tasks": first["tasks"],
        "kinds": first["kinds"],
        "embeddings": emb_mean,
        "retrieval": ret_mean,
        "std": {"embeddings": emb_std, "retrieval": ret_std},
        "retrieval_scorers": retrieval_results[0].get("retrieval_scorers", {}),
        "retrieval_runs": [str(r) for r in (retrieval_runs or run_dirs)],
    }
    if peer is not None:
        merge_peer(out, peer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / SUITE_JSON, json.dumps(out, indent=2) + "\n")
    write_text(out_dir / SUITE_MD, suite_markdown(out, out["std"]) + f"\n![primary metrics]({SUITE_PNG})\n")
    plot_suite_primary(out, out_dir / SUITE_PNG)
    return out


def _read_suites(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    if not run_dirs:
        raise ConfigError("--suite-aggregate: give at least 1 run (e.g. 3 seeds)")
    results = []
    for run in run_dirs:
        path = Path(run) / SUITE_JSON
        if not path.is_file():
            raise ConfigError(f"--suite-aggregate: {path} is missing (run `supermoe-rec probe --suite --run {run}`)")
        results.append(json.loads(path.read_text()))
    for other, run in zip(results[1:], run_dirs[1:], strict=True):
        if set(other["retrieval"]) != set(results[0]["retrieval"]):
            raise ConfigError(f"--suite-aggregate: {run} has other retrieval models than {run_dirs[0]}")
    return results


def _parse_compare(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, run = pair.partition("=")
        if not sep or not name or not run:
            raise ConfigError(f"--compare-run: {pair!r} is not NAME=RUN")
        if name in out:
            raise ConfigError(f"--compare-run: {name!r} is given twice")
        out[name] = run
    return out


def suite_command(
    run: str | None,
    overrides: Sequence[str],
    seed: int = 0,
    compare: Sequence[str] = (),
    scorer: str = "auto",
    aggregate: Sequence[str] | None = None,
    out: str | None = None,
    peer: str | None = None,
    retrieval_runs: Sequence[str] | None = None,
) -> int:
    """CLI body of ``supermoe-rec probe --suite`` / ``--suite-aggregate``; tears down a process group it created."""
    if aggregate:
        if out is None:
            raise ConfigError("--suite-aggregate: --out DIR is required (e.g. reports/ml100k)")
        result = aggregate_suites(aggregate, out, peer, retrieval_runs)
        print(_retrieval_table(result["retrieval"], result["std"]["retrieval"]))
        print(Path(out) / SUITE_MD)
        return 0
    if run is None:
        raise ConfigError("probe --suite: --run is required")
    owns_group = not dist.is_initialized()
    try:
        result = suite_run(run, overrides, seed, _parse_compare(compare), scorer, peer=peer)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
    print(_retrieval_table(result["retrieval"], None))
    print(Path(run) / SUITE_MD)
    return 0
