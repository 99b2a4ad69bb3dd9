"""export and probe on a real (tiny) behaviour-only run over ml100k-mt, trained once per module in-process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from supermoe_rec import cli
from supermoe_rec.config.experiment import ConfigError, DataConfig, load_config, save_config
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.protocol import ProtocolOutput
from supermoe_rec.data.schema import FeatureSide
from supermoe_rec.data.splits import SplitData, drop_features
from supermoe_rec.evaluation.export import ExportResult, UserRepresentations, export_run, latest_rows
from supermoe_rec.evaluation.plots import PNG_SIGNATURE
from supermoe_rec.evaluation.probe import item_bags, probe_representations, probe_run, user_attributes
from tests.dist_utils import DIST_ENV, in_process_world

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROFILE = ["user", "age", "gender", "occupation", "zip3"]
TASKS = ("watch", "like", "rating")
D_MODEL = 32
TINY = [
    "--train.max_steps=6",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
    "--model.encoder.num_layers=1",
    f"--model.encoder.d_model={D_MODEL}",
    "--model.embedding_dim=16",
    # With one layer, moe_every=2 would leave no MoE block and nothing to route.
    "--model.moe.moe_every=1",
]


def _train_items(ml: MovieLens, user_id: int, max_history: int = 50) -> tuple[list[int], list[int]]:
    """By hand, from docs/protocol.md#samples: (all train item codes, the last ``max_history`` of them) of one user."""
    ratings = ml.ratings[ml.ratings["user_id"] == user_id].sort_values(["timestamp", "item_id"])
    n = len(ratings)
    n_held = 2 * max(1, math.ceil(0.1 * n - 1e-9))  # valid and test
    items = np.sort(ml.items["item_id"].to_numpy())
    codes = (np.searchsorted(items, ratings["item_id"].to_numpy()) + 1).tolist()  # protocol codes: 1-based rank
    train = codes[: n - n_held]
    return train, train[-max_history:]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(ml100k: MovieLens, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 6-step behaviour-only supermoe run (stops mid-epoch: LATEST checkpoint only, no BEST)."""
    from supermoe_rec.training.trainer import train

    with in_process_world():
        out = tmp_path_factory.mktemp("runs")
        cfg = load_config(CONFIGS / "ml100k_behaviour.yaml", [*TINY, f"--train.out_dir={out}"])
        train(cfg)
        yield out / cfg.train.name


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> ExportResult:
    return export_run(run_dir)


@pytest.fixture(scope="module")
def probed(run_dir: Path) -> dict[str, object]:
    result = probe_run(run_dir)
    return result


# ------------------------------------------------------------------------------------- data option


def test_drop_features(ml100k_protocol: ProtocolOutput) -> None:
    schema = drop_features(ml100k_protocol.schema, PROFILE)
    assert not [f for f in schema.sparse_features if f.side is FeatureSide.USER]
    assert {t.name for t in schema.tables} == {"item", "genre", "year"}
    assert drop_features(ml100k_protocol.schema, ()) is ml100k_protocol.schema
    with pytest.raises(ConfigError, match=r"data\.drop_features: unknown feature\(s\) \['nope'\]"):
        drop_features(ml100k_protocol.schema, ["user", "nope"])


def test_behaviour_config_drops_the_profile() -> None:
    cfg = load_config(CONFIGS / "ml100k_behaviour.yaml")
    assert sorted(cfg.data.drop_features) == sorted(PROFILE)
    base = load_config(CONFIGS / "ml100k.yaml")
    assert cfg.model == base.model  # the same model; only the inputs differ


# -------------------------------------------------------------------------------------- which rows


def test_latest_rows_use_the_first_valid_sample(ml100k_data: SplitData, ml100k: MovieLens) -> None:
    chosen = latest_rows(ml100k_data)
    keys, rows = chosen["valid"]
    assert len(keys) == 943 and len(chosen["train"][0]) == 0  # every ml100k user has a valid sample
    valid = ml100k_data.splits["valid"]
    jag = valid.features["history"]
    for user_id in (1, 2, 500):
        row = int(rows[np.flatnonzero(keys == user_id)[0]])
        history = jag.values[jag.offsets[row] : jag.offsets[row + 1]].tolist()
        assert history == _train_items(ml100k, user_id)[1]


def test_latest_rows_fall_back_to_the_last_train_sample(ml100k_data: SplitData, ml100k: MovieLens) -> None:
    train_only = SplitData(ml100k_data.schema, {"train": ml100k_data.splits["train"]}, {})
    keys, rows = latest_rows(train_only)["train"]
    assert len(keys) == 943
    train = ml100k_data.splits["train"]
    jag = train.features["history"]
    user_id = 1
    row = int(rows[np.flatnonzero(keys == user_id)[0]])
    all_train, _ = _train_items(ml100k, user_id)
    # The last train positive sits at the last train position; its history is the 50 items before it.
    assert jag.values[jag.offsets[row] : jag.offsets[row + 1]].tolist() == all_train[-51:-1]
    assert train.timestamps is not None
    assert train.timestamps[row] == train.timestamps[train.user_keys == user_id].max()


# ------------------------------------------------------------------------------------------ export


def test_export_parquet(exported: ExportResult, run_dir: Path) -> None:
    assert exported.embeddings_path == run_dir / "user_embeddings.parquet"
    assert exported.checkpoint == "latest"  # stopped mid-epoch: no BEST, so LATEST
    frame = pd.read_parquet(exported.embeddings_path)
    assert len(frame) == 943
    assert frame["user_id"].tolist() == list(range(1, 944))
    for column in ("user", *(f"task_{t}" for t in TASKS)):
        matrix = np.stack(frame[column].to_numpy())
        assert matrix.shape == (943, D_MODEL), column
        assert np.isfinite(matrix).all(), column
    assert set(frame["source_split"]) == {"valid"}


def test_export_vectors_depend_on_the_history(exported: ExportResult) -> None:
    user = exported.representations.user
    assert np.abs(user[0] - user[1]).max() > 1e-4  # users 1 and 2: different histories, different vectors
    assert len(np.unique(user, axis=0)) == len(user)
    # The [USER] token and a task token are different readouts.
    assert not np.allclose(user, exported.representations.tasks["watch"])


def test_reexport_is_deterministic(exported: ExportResult, run_dir: Path, tmp_path: Path) -> None:
    again = export_run(run_dir, out=tmp_path / "again.parquet", routing=False)
    assert again.embeddings_path == tmp_path / "again.parquet"
    first, second = pq.read_table(exported.embeddings_path), pq.read_table(again.embeddings_path)
    assert first.column_names == second.column_names
    assert first.equals(second)  # bit-identical values, same order


def test_routing_statistics(exported: ExportResult, run_dir: Path, ml100k_data: SplitData) -> None:
    routing = json.loads((run_dir / "routing.json").read_text())
    assert routing == exported.routing
    tokens = np.asarray(routing["tokens_per_expert"])
    kinds = np.asarray(routing["task_expert_counts"])
    # The shipped config trains generatively: the causal encoder's MoE block, then its task readout's MoE.
    assert tokens.shape == (2, 8) and kinds.shape == (2, len(TASKS) + 2, 8)
    assert routing["row_labels"] == ["[USER]", *TASKS, "history"]
    assert np.array_equal(kinds.sum(axis=1), tokens)  # every assignment belongs to one token kind
    valid = ml100k_data.splits["valid"]
    top_k = 2
    items = int(np.diff(valid.features["history"].offsets)[valid.group_offsets[:-1]].sum())  # history items
    # One encoder pass per valid group. The block routes its [START] token (the "[USER]" row) and its history items;
    # the readout routes every real token once per task, with the task as its kind; each to K experts.
    assert kinds[0, 0].sum() == valid.num_groups * top_k
    assert kinds[0, -1].sum() == items * top_k
    assert kinds[0, 1 : 1 + len(TASKS)].sum() == 0
    assert (kinds[1, 1 : 1 + len(TASKS)].sum(axis=1) == (valid.num_groups + items) * top_k).all()
    assert kinds[1, 0].sum() == kinds[1, -1].sum() == 0
    assert 0.0 <= routing["dropped_fraction"] < 1.0


def test_export_writes_plots(exported: ExportResult, run_dir: Path) -> None:
    for name in ("curves.png", "expert_load.png", "routing_heatmap.png"):
        assert (run_dir / name) in exported.files
        assert (run_dir / name).read_bytes()[:8] == PNG_SIGNATURE


def test_export_refuses_archs_without_a_user_representation(tmp_path: Path) -> None:
    save_config(load_config(CONFIGS / "ml100k.yaml", ["--model.arch=mmoe"]), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="'mmoe' has no user representation"):
        export_run(tmp_path)


# ------------------------------------------------------------------------------------------- probe


def test_item_bags_hold_every_train_item(ml100k_data: SplitData, ml100k: MovieLens) -> None:
    keys = np.arange(1, 944)
    bag = item_bags(ml100k_data, keys)
    assert bag.shape[0] == 943 and set(np.unique(bag.data).tolist()) == {1.0}
    for user_id in (1, 2, 943):
        assert sorted(bag[user_id - 1].indices.tolist()) == sorted(_train_items(ml100k, user_id)[0])


def test_probe_json(probed: dict[str, object], run_dir: Path) -> None:
    on_disk = json.loads((run_dir / "probe.json").read_text())
    assert on_disk == json.loads(json.dumps(probed))
    assert on_disk["users"] == 943
    assert set(on_disk["attributes"]) == {"gender", "age", "occupation"}
    for attribute, entry in on_disk["attributes"].items():
        assert entry["test_users"] == 283 and entry["train_users"] == 660, attribute  # 30% of 943, rounded up
        assert entry["stratified"] is True
        for probe in ("model", "majority", "tfidf", *(f"task_{t}" for t in TASKS)):
            score = entry["probes"][probe]
            assert 0.0 <= score["accuracy"] <= 1.0 and 0.0 <= score["macro_f1"] <= 1.0, (attribute, probe)
    assert len(on_disk["attributes"]["gender"]["classes"]) == 2
    assert len(on_disk["attributes"]["age"]["classes"]) == 7
    assert len(on_disk["attributes"]["occupation"]["classes"]) == 21
    table = (run_dir / "probe.md").read_text()
    assert "| attribute" in table and "tfidf" in table and "majority" in table


def test_probe_majority_is_the_held_out_share(probed: dict[str, object], run_dir: Path, ml100k: MovieLens) -> None:
    users = ml100k.users.set_index("user_id")
    edges = [18, 25, 35, 45, 50, 56]
    labels = {
        "gender": users["gender"],
        "occupation": users["occupation"],
        "age": users["age"].map(lambda a: sum(a >= e for e in edges)),
    }
    result = json.loads((run_dir / "probe.json").read_text())
    for attribute, y in labels.items():
        entry = result["attributes"][attribute]
        test_ids = entry["test_user_ids"]
        train = y.drop(index=test_ids)
        majority = train.value_counts().idxmax()
        share = float((y.loc[test_ids] == majority).mean())
        assert entry["probes"]["majority"]["accuracy"] == pytest.approx(share, abs=1e-12), attribute
    assert result["attributes"]["gender"]["majority_class"] == "M"
    assert result["attributes"]["occupation"]["majority_class"] == "student"


def test_probe_refuses_a_run_with_profile_features(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config(CONFIGS / "ml100k.yaml")
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["drop_features"] == []
    assert cli.main(["probe", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "would leak the labels" in err and "['user', 'age', 'gender', 'occupation', 'zip3']" in err
    assert not (tmp_path / "probe.json").exists()


def _weak_gender_signal(seed: int = 0, strength: float = 0.5) -> tuple[UserRepresentations, pd.DataFrame]:
    """Every MovieLens user with a 2-wide vector: ``strength`` * is-female plus unit noise, and a pure-noise column."""
    attributes = user_attributes(DataConfig())
    keys = attributes.index.to_numpy()
    rng = np.random.default_rng(seed)
    female = (attributes["gender"] == "F").to_numpy(dtype=np.float64)
    x = np.stack([strength * female + rng.normal(size=len(keys)), rng.normal(size=len(keys))], axis=1)
    return UserRepresentations(keys, x.astype(np.float32), {}, np.full(len(keys), "train")), attributes


def test_balanced_probe_finds_a_weak_signal_that_accuracy_hides() -> None:
    reps, attributes = _weak_gender_signal(seed=2)  # a draw where accuracy-chosen C collapses to the majority
    plain = probe_representations(reps, attributes, None)["gender"]["probes"]
    balanced = probe_representations(reps, attributes, None, balanced=True)["gender"]["probes"]
    # Choosing C by accuracy, 71% men: the best the weak signal can do is the majority class.
    assert plain["model"] == plain["majority"]
    # Balanced weights and C by balanced accuracy: the minority class is predicted, and macro-F1 rises above it.
    assert balanced["model"]["macro_f1"] > plain["majority"]["macro_f1"] + 0.1
    assert balanced["majority"] == plain["majority"]  # the baseline itself does not change


def test_extra_probes_are_fitted_like_the_model_and_checked() -> None:
    reps, attributes = _weak_gender_signal()
    female = (attributes.loc[reps.user_keys, "gender"] == "F").to_numpy(dtype=np.float32)[:, None]
    result = probe_representations(reps, attributes, None, extra={"is_female": female})
    assert result["gender"]["probes"]["is_female"] == {"accuracy": 1.0, "macro_f1": 1.0}
    assert result["age"]["probes"]["is_female"]["accuracy"] < 0.5  # a gender bit says little about the age bucket
    with pytest.raises(ValueError, match="'short' has 10 rows for 943 exported users"):
        probe_representations(reps, attributes, None, extra={"short": female[:10]})
    with pytest.raises(ValueError, match="'tfidf' reuses a probe name"):
        probe_representations(reps, attributes, None, extra={"tfidf": female})


def test_probe_inputs_script_adds_the_encoder_input_probe(run_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "scripts/probe_inputs.py", "--run", str(run_dir), "--balanced"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k not in DIST_ENV},  # this process's group is not the script's
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in proc.stdout.splitlines() if "history_mean" in line]
    assert sorted(r[1].strip() for r in rows) == ["age", "gender", "occupation"]
    for row in rows:
        accuracy, macro_f1 = float(row[4]), float(row[5])
        assert 0.0 <= accuracy <= 1.0 and 0.0 <= macro_f1 <= 1.0
    assert proc.stdout.startswith("balanced class weights")
