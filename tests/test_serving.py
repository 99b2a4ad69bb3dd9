"""The inference artifact, UserEncoder, embed and retrieve on a real (tiny) ml100k-mt supermoe run, trained once.

The run trains 6 steps with the profile features (so profile, history, item-side features and the candidate item all
go through the serving path); the reference is the training model in eval with dropless routing, as served.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist

from supermoe_rec import cli
from supermoe_rec.config.experiment import load_config
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.data.protocol import build_ml_mt
from supermoe_rec.data.splits import load_data
from supermoe_rec.evaluation.export import UserRepresentations, export_run, latest_rows
from supermoe_rec.serving import ArtifactError, UserEncoder, artifact_bytes, read_manifest
from supermoe_rec.serving.artifact import ITEM_CATALOG, MANIFEST, OVER_ARCH, TABLES
from supermoe_rec.serving.encoder import Jagged
from supermoe_rec.serving.export_artifact import export_artifact
from supermoe_rec.serving.index import FaissIndex, topk_exact
from tests.dist_utils import DIST_ENV, in_process_world

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train.max_steps=6",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=32",
    "--model.embedding_dim=16",
    "--model.moe.moe_every=1",  # one layer: the MoE block must be that layer
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from supermoe_rec.training.trainer import train

    with in_process_world():
        out = tmp_path_factory.mktemp("runs")
        cfg = load_config(ROOT / "configs" / "ml100k.yaml", [*TINY, f"--train.out_dir={out}"])
        train(cfg)
        yield out / cfg.train.name


@pytest.fixture(scope="module")
def artifact(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_artifact(run_dir, tmp_path_factory.mktemp("artifacts") / "ml100k")


@pytest.fixture(scope="module")
def encoder(artifact: Path) -> UserEncoder:
    return UserEncoder.load(artifact)


@pytest.fixture(scope="module")
def reference(run_dir: Path, artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> UserRepresentations:
    """Every ml100k user's [USER] and task vectors from the training model (eval, dropless routing)."""
    out = tmp_path_factory.mktemp("reference") / "user_embeddings.parquet"
    return export_run(run_dir, out, ["--model.moe.dropless=true"], routing=False).representations


@pytest.fixture(scope="module")
def user_rows(run_dir: Path, ml100k: MovieLens) -> pd.DataFrame:
    """The sample row export represents each user with (latest history), from the protocol's frames."""
    cfg = load_config(run_dir / "config.yaml")
    frames = build_ml_mt(ml100k, cfg.data).frames
    data = load_data(cfg.data)
    parts = []
    for split, (_, rows) in latest_rows(data).items():
        ds = data.splits[split]
        parts.append(frames[split].reset_index(drop=True).iloc[ds.input_row[rows]])
    return pd.concat(parts).sort_values("user_id").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------- equality


def test_artifact_equals_training_model_for_every_ml100k_user(
    encoder: UserEncoder, reference: UserRepresentations, user_rows: pd.DataFrame
) -> None:
    out = encoder.encode(user_rows)
    assert out.user_keys.tolist() == reference.user_keys.tolist() == list(range(1, 944))
    assert out.user.shape == (943, 32)
    assert np.abs(out.user - reference.user).max() <= ATOL
    for name, matrix in reference.tasks.items():
        assert np.abs(out.tasks[name] - matrix).max() <= ATOL, name
    assert not out.unknown_ids and not out.hashed_ids


def test_a_user_vector_does_not_depend_on_its_batch(encoder: UserEncoder, user_rows: pd.DataFrame) -> None:
    alone = encoder.encode(user_rows.iloc[[5]]).user
    batched = encoder.encode(user_rows, batch_size=100).user
    assert np.abs(alone[0] - batched[5]).max() <= ATOL


def test_scores_equal_the_training_model(run_dir: Path, artifact: Path) -> None:
    """Per-task candidate scores: export's own check, and that it fails on a changed weight (so it can fail)."""
    from supermoe_rec.evaluation import export
    from supermoe_rec.serving.export_artifact import ExportCheckError, check_artifact

    cfg = export.load_run_config(run_dir)
    restored, _ = export.restore_model(run_dir, cfg)
    enc = UserEncoder.load(artifact)
    assert check_artifact(enc, restored) <= ATOL
    with torch.no_grad():
        for tower in enc.over_arch.towers.towers.values():
            tower.head.bias.add_(1e-3)
    with pytest.raises(ExportCheckError, match="differ from the training model"):
        check_artifact(enc, restored)


def test_encode_scores_candidates(encoder: UserEncoder, user_rows: pd.DataFrame) -> None:
    rows = user_rows.iloc[:4]
    candidates = [[50, 181, 1], [50, 181, 1], [7, 8, 9], [100, 100, 100]]
    out = encoder.encode(rows, candidates=candidates)
    for name in ("watch", "like", "rating"):
        assert out.scores[name].shape == (4, 3)
        assert np.isfinite(out.scores[name]).all()
    assert len(set(out.scores["watch"][3].round(6).tolist())) == 1  # the same item thrice: one score
    assert np.abs(out.user - encoder.encode(rows).user).max() <= ATOL  # candidates do not change the vector


# ------------------------------------------------------------------------------------ manifest, integrity


def test_manifest(artifact: Path, run_dir: Path) -> None:
    manifest = read_manifest(artifact)
    assert manifest["source"]["run"] == str(run_dir.resolve())
    assert manifest["source"]["checkpoint"] == "latest"  # 6 steps, mid-epoch: LATEST only
    assert manifest["source"]["step"] == 6
    schema = manifest["schema"]
    assert schema["max_history"] == 50
    assert [t["name"] for t in schema["tasks"]] == ["watch", "like", "rating"]
    assert schema["features"]["history"] == ["history"] and schema["features"]["candidate"] == "target_item"
    assert schema["tables"]["item"]["rows"] == 1683 and schema["tables"]["item"]["ids"] == "integer"
    assert manifest["config"]["model"]["encoder"]["d_model"] == 32
    assert manifest["model"]["table_free_part"] == "state_dict" and manifest["model"]["routing"] == "dropless"
    assert set(manifest["files"]) == {TABLES, OVER_ARCH, ITEM_CATALOG}
    for entry in manifest["files"].values():
        assert len(entry["sha256"]) == 64 and entry["bytes"] > 0
    tables = torch.load(artifact / TABLES, weights_only=True)
    assert tables["item"].shape == (1683, 16) and tables["genre"].shape[1] == 16
    assert artifact_bytes(artifact) == sum(p.stat().st_size for p in artifact.iterdir())


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("flip:" + TABLES, f"artifact file {TABLES} fails its SHA-256 check"),
        ("delete:" + OVER_ARCH, f"artifact file {OVER_ARCH} is missing"),
        ("truncate:" + ITEM_CATALOG, f"artifact file {ITEM_CATALOG} has \\d+ bytes, the manifest says"),
        ("delete:" + MANIFEST, f"{MANIFEST} is missing"),
        ("garble:" + MANIFEST, "unreadable manifest"),
    ],
)
def test_corrupted_artifact_is_refused_naming_the_file(
    artifact: Path, tmp_path: Path, damage: str, message: str
) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    how, name = damage.split(":")
    path = copy / name
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    else:
        path.write_text("{not json")
    with pytest.raises(ArtifactError, match=message):
        UserEncoder.load(copy)
    assert cli.main(["embed", "--artifact", str(copy), "--events", str(copy / "x.parquet"), "--out", "-"]) == 2


def test_inference_imports_no_torchrec(artifact: Path, user_rows: pd.DataFrame, tmp_path: Path) -> None:
    events = tmp_path / "users.parquet"
    user_rows.iloc[:20].to_parquet(events)
    code = f"""
import sys, pandas as pd
import torch.distributed as dist
from supermoe_rec.serving import UserEncoder
enc = UserEncoder.load({str(artifact)!r})
out = enc.encode(pd.read_parquet({str(events)!r}), candidates=[[1, 2]] * 20)
assert out.user.shape == (20, 32), out.user.shape
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torchrec", "fbgemm_gpu", "fbgemm"))
assert not loaded, loaded
assert not dist.is_initialized()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------------------ id mapping


def test_unknown_and_hashed_ids_are_counted(encoder: UserEncoder) -> None:
    import dataclasses

    from supermoe_rec.data.vocab import Vocabulary

    spec = encoder.candidate_feature
    assert spec is not None
    with pytest.raises(DataError, match=r"id 5000 is outside table 'item' of 1683 rows"):
        encoder.map_ids(np.array([1, 5000]), spec, "events")
    with pytest.raises(DataError, match="'x' is not an integer"):
        encoder.map_ids(np.array(["1", "x"], dtype=object), spec, "events")
    enc = UserEncoder.load(encoder.directory)
    enc.vocabularies = {"item": Vocabulary("item", ("a", "b"))}
    out = enc.encode(
        pd.DataFrame(
            {
                "user_id": [1, 1, 1],
                "timestamp": [1, 2, 3],
                "item": ["a", "zzz", "b"],
                **{c: [1, 1, 1] for c in ("user", "age", "gender", "occupation", "zip3")},
            }
        )
    )
    assert out.unknown_ids == {"history": 1}
    assert out.history_lengths.tolist() == [3]
    tables = tuple(dataclasses.replace(t, hash=t.name == "item") for t in encoder.schema.tables)
    enc.vocabularies = {}
    enc.schema = dataclasses.replace(encoder.schema, tables=tables)
    rows = enc.map_ids(np.array(["a", "zzz"], dtype=object), spec, "events", out)
    assert ((rows >= 0) & (rows < 1683)).all() and out.hashed_ids == {"target_item": 2}


# ------------------------------------------------- training and serving: one id mapping, the same vectors


@pytest.fixture(scope="module")
def raw_events(run_dir: Path, ml100k: MovieLens, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 users' test rows (one each) in the training table's layout, written as CSV: list cells become text."""
    cfg = load_config(run_dir / "config.yaml")
    test = build_ml_mt(ml100k, cfg.data).frames["test"].reset_index(drop=True)
    rows = test.groupby("user_id", sort=False).head(1).iloc[:40]
    path = tmp_path_factory.mktemp("raw") / "events.csv"
    # History as pandas writes a numpy array ("[82 152 ...]", wrapped), genres as ids joined by the separator.
    rows.assign(genres=[" ".join(map(str, g)) for g in rows["genres"]]).to_csv(path, index=False)
    return path


def test_training_and_serving_map_the_same_events_to_the_same_ids_and_vectors(
    run_dir: Path, encoder: UserEncoder, raw_events: Path
) -> None:
    """The same raw file through training's reader (TabularDataset, the training model) and through serving's
    UserEncoder: identical table rows for every user-side feature, and the same [USER] vectors."""
    from supermoe_rec.data.dataset import TabularDataset
    from supermoe_rec.data.features import read_table
    from supermoe_rec.evaluation import export
    from supermoe_rec.serving.encoder import Encoded, make_dropless

    restored, _ = export.restore_model(run_dir, export.load_run_config(run_dir))
    schema, max_history = restored.data.schema, restored.cfg.data.max_history
    ds = TabularDataset(read_table(raw_events), schema, str(raw_events), max_history, restored.data.vocabularies)
    frame = read_table(raw_events)
    users = encoder.user_rows(frame, str(raw_events))
    counts = Encoded(user_keys=users["user_id"].to_numpy(), user=np.zeros((0, encoder.dim), np.float32), tasks={})
    mapped = encoder.map_users(users, counts, str(raw_events))
    assert set(mapped.profile) == {"user", "age", "gender", "occupation", "zip3"} and set(mapped.history) == {"history"}
    # Stored row i of the dataset is input row input_row[i]; the encoder keeps users in input order (one row each).
    by_input = np.argsort(ds.input_row)
    assert len(users) == len(frame) == len(ds)
    for name, jag in mapped.profile.items():
        train = ds.features[name]
        for u in range(len(users)):
            r = by_input[u]
            want = train.values[train.offsets[r] : train.offsets[r + 1]]
            assert jag.values[jag_slice(jag, u)].tolist() == want.tolist(), (name, u)
    for name, jag in mapped.history.items():
        train = ds.features[name]
        for u in range(len(users)):
            r = by_input[u]
            want = train.values[train.offsets[r] : train.offsets[r + 1]][-max_history:]
            assert jag.values[jag_slice(jag, u)].tolist() == want.tolist(), (name, u)
            assert len(want) > 0
    # Vectors: the training model (eval, dropless routing, as served) on the dataset's rows, each its own group.
    restored.dmp.eval()
    make_dropless(restored.dmp)
    with torch.no_grad():
        trained = export.forward_batch(restored, ds.batch(by_input)).model.user
    served = encoder.encode(frame).user
    assert trained is not None
    assert np.abs(trained.numpy() - served).max() <= ATOL


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("history", "[1 5000]", r"id 5000 is outside table 'item' of 1683 rows \(grow num_embeddings, or set vocab"),
        ("occupation", "x", r"id 'x' is not an integer \(set vocab: true on table 'occupation'"),
        ("history", "[1 2", r"opens a list with .\[. but does not close it"),
    ],
)
def test_training_and_serving_refuse_bad_ids_with_the_same_message(
    run_dir: Path, encoder: UserEncoder, raw_events: Path, column: str, value: str, message: str
) -> None:
    from supermoe_rec.data.dataset import TabularDataset
    from supermoe_rec.data.features import read_table

    frame = read_table(raw_events)
    frame[column] = frame[column].astype(object)
    frame.loc[3, column] = value
    schema = load_data(load_config(run_dir / "config.yaml").data).schema
    with pytest.raises(DataError, match=message) as training:
        TabularDataset(frame, schema, "events.csv")
    with pytest.raises(DataError, match=message) as serving:
        encoder.encode(frame, source="events.csv")
    # The same words after the location (serving names the row where it parses the cell itself).
    assert str(training.value).split(f"column {column!r}: ")[1] == str(serving.value).split(f"column {column!r}: ")[1]


def jag_slice(jag: Jagged, row: int) -> slice:
    offsets = np.concatenate([[0], np.cumsum(jag.lengths.numpy())])
    return slice(int(offsets[row]), int(offsets[row + 1]))


# ------------------------------------------------------------------------------------ embed and retrieve


@pytest.fixture(scope="module")
def held_back(run_dir: Path, ml100k: MovieLens, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test split's positives as raw events (user, time, item, profile): a held-back slice."""
    cfg = load_config(run_dir / "config.yaml")
    test = build_ml_mt(ml100k, cfg.data).frames["test"]
    test = test[test["watch"] == 1]
    path = tmp_path_factory.mktemp("events") / "events.parquet"
    test[["user_id", "timestamp", "item", "user", "age", "gender", "occupation", "zip3"]].to_parquet(path)
    return path


def test_embed_and_retrieve(artifact: Path, held_back: Path, tmp_path: Path) -> None:
    vectors, topk, topk_faiss = tmp_path / "vectors.parquet", tmp_path / "topk.parquet", tmp_path / "faiss.parquet"
    assert cli.main(["embed", "--artifact", str(artifact), "--events", str(held_back), "--out", str(vectors)]) == 0
    frame = pd.read_parquet(vectors)
    events = pd.read_parquet(held_back)
    assert len(frame) == events["user_id"].nunique()
    assert np.stack(frame["user"].to_numpy()).shape == (len(frame), 32)
    first = frame.iloc[0]
    mine = events[events["user_id"] == first["user_id"]].sort_values("timestamp", kind="stable")
    assert list(first["seen_items"]) == mine["item"].tolist()[-50:]
    args = ["retrieve", "--artifact", str(artifact), "--vectors", str(vectors), "--k", "10"]
    assert cli.main([*args, "--out", str(topk)]) == 0
    assert cli.main([*args, "--out", str(topk_faiss), "--index", "faiss", "--nprobe", "10000"]) == 0
    exact, approx = pd.read_parquet(topk), pd.read_parquet(topk_faiss)
    assert (exact.groupby("user_id").size() == 10).all()
    seen = {u: set(s) for u, s in zip(frame["user_id"], frame["seen_items"], strict=True)}
    assert not any(item in seen[u] for u, item in zip(exact["user_id"], exact["item"], strict=True))
    assert (exact["item"] != 0).all()  # row 0 (unknown) is never a candidate
    # Probing every list makes IVF exhaustive: the same items as exact search.
    assert exact.groupby("user_id")["item"].apply(set).equals(approx.groupby("user_id")["item"].apply(set))


def test_embed_reports_bad_input(
    artifact: Path, held_back: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = pd.read_parquet(held_back)
    bad = tmp_path / "bad.parquet"
    events.drop(columns=["occupation"]).to_parquet(bad)
    assert (
        cli.main(["embed", "--artifact", str(artifact), "--events", str(bad), "--out", str(tmp_path / "v.parquet")])
        == 2
    )
    assert "column 'occupation': missing column" in capsys.readouterr().err
    events.assign(item=events["item"] + 10_000).to_parquet(bad)
    assert (
        cli.main(["embed", "--artifact", str(artifact), "--events", str(bad), "--out", str(tmp_path / "v.parquet")])
        == 2
    )
    assert "is outside table 'item'" in capsys.readouterr().err
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert (
        cli.main(
            ["embed", "--artifact", str(artifact), "--events", str(tmp_path / "empty.parquet"), "--out", "x.parquet"]
        )
        == 2
    )
    assert "empty file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ search


def test_topk_exact_matches_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    q, items = rng.normal(size=(7, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    exclude = [np.array([], dtype=np.int64)] + [rng.choice(50, size=5, replace=False) for _ in range(6)]
    scores, rows = topk_exact(torch.from_numpy(q), torch.from_numpy(items), 5, exclude, block=3)
    full = q @ items.T
    for u in range(7):
        full[u, exclude[u]] = -np.inf
        want = np.argsort(-full[u], kind="stable")[:5]
        assert rows[u].tolist() == want.tolist()
        assert np.allclose(scores[u].numpy(), full[u, want])


def test_faiss_recall_against_exact() -> None:
    rng = np.random.default_rng(1)
    items = rng.normal(size=(5000, 16)).astype(np.float32)
    q = rng.normal(size=(64, 16)).astype(np.float32)
    _, exact = topk_exact(torch.from_numpy(q), torch.from_numpy(items), 10)
    index = FaissIndex.build(items, nprobe=8)
    _, approx = index.search(q, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact.numpy(), strict=True)])
    assert 0.5 < recall <= 1.0
    index.index.nprobe = index.nlist
    _, full = index.search(q, 10)
    assert all(set(a) == set(e) for a, e in zip(full, exact.numpy(), strict=True))


def test_manifest_is_json(artifact: Path) -> None:
    assert json.loads((artifact / MANIFEST).read_text())["format"] == "supermoe_rec.artifact/1"


def test_benchmarks_run_in_quick_mode(artifact: Path, tmp_path: Path) -> None:
    """benchmarks/serving.py and benchmarks/retrieval.py run and write their JSON (no timing asserted)."""
    runs = {
        "serving.py": ["--artifact", str(artifact), "--quick", "--batches", "1", "4", "--threads", "1"],
        "retrieval.py": ["--items", "2000", "--queries", "16", "--nprobe", "4", "--quick"],
    }
    for script, args in runs.items():
        out = tmp_path / f"{script}.json"
        proc = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), *args, "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert result["benchmark"] == script.removesuffix(".py") and result["rows"]
    serving = json.loads((tmp_path / "serving.py.json").read_text())
    assert serving["artifact_bytes"] == artifact_bytes(artifact)
    assert {(r["threads"], r["users"]) for r in serving["rows"]} == {(1, 1), (1, 4)}
    retrieval = json.loads((tmp_path / "retrieval.py.json").read_text())
    assert 0.0 <= retrieval["rows"][0]["faiss"][0]["recall@10"] <= 1.0


# ------------------------------------------------------------------------------ the next-items [USER] vector


def test_next_items_run_serves_its_trained_pairing(tmp_path: Path) -> None:
    """A joint run (next-items head, towers reading [USER]): the artifact reproduces its vectors, and retrieval
    scores items exactly as the model's ``score_items`` does."""
    from supermoe_rec.training.trainer import train

    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    overrides = [
        *TINY,
        "--train.objective=joint",
        "--data.next_window=1",
        "--model.towers.read_user=true",
        "--model.moe.task_routers=true",
        f"--train.out_dir={tmp_path}",
        "--train.name=joint",
    ]
    cfg = load_config(ROOT / "configs" / "ml100k.yaml", overrides)
    train(cfg)
    try:
        artifact = export_artifact(tmp_path / "joint", tmp_path / "artifact")  # self-checks vectors and scores
        enc = UserEncoder.load(artifact)
        manifest = read_manifest(artifact)
        assert manifest["model"]["retrieval"] == "score_items" and enc.retrieval == "score_items"
        assert manifest["schema"]["features"]["history"] == ["history"]  # the future items are a label, not input
        ref = export_run(tmp_path / "joint", tmp_path / "ref.parquet", ["--model.moe.dropless=true"], routing=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    frames = build_ml_mt_frames(cfg)
    out = enc.encode(frames)
    want = ref.representations.user[np.searchsorted(ref.representations.user_keys, out.user_keys)]
    assert np.abs(out.user - want).max() <= ATOL
    items = enc.item_vectors()
    assert items.shape == enc.tables["item"].shape  # the item table the next-items loss scores
    scores = enc.queries(out.user) @ items.T
    assert torch.allclose(scores, enc.over_arch.score_items(torch.from_numpy(out.user), items))


def build_ml_mt_frames(cfg: object) -> pd.DataFrame:
    """Each user's first valid sample row of the run's protocol (export's latest history), as per-user rows."""
    from supermoe_rec.data.movielens import fetch_movielens

    data_cfg = cfg.data  # type: ignore[attr-defined]
    ml = fetch_movielens("ml100k", data_cfg.cache_dir, try_url=False)
    valid = build_ml_mt(ml, data_cfg).frames["valid"]
    return valid.groupby("user_id").head(1).reset_index(drop=True)
