"""`supermoe-rec probe --suite` on a real (tiny) behaviour-only ml100k run: the JSON shape, the markdown, the
retrieval through the run's model, and a compare run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from supermoe_rec.config.experiment import load_config
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.evaluation import retrieval
from supermoe_rec.evaluation.export import load_run_config, restore_model
from supermoe_rec.evaluation.suite import (
    STAND_IN,
    _retrieval_template,
    item_scorer,
    item_table,
    retrieval_user_vectors,
    suite_run,
)
from tests.dist_utils import in_process_world

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--train.max_steps=2",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=4096",
    "--train.tensorboard=false",
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=16",
    "--model.embedding_dim=8",
    "--model.moe.moe_every=1",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 2-step behaviour-only supermoe run (LATEST checkpoint only)."""
    from supermoe_rec.training.trainer import train

    with in_process_world():
        out = tmp_path_factory.mktemp("runs")
        cfg = load_config(ROOT / "configs" / "ml100k_behaviour.yaml", [*TINY, f"--train.out_dir={out}"])
        train(cfg)
        yield out / cfg.train.name


@pytest.fixture(scope="module")
def suite(run_dir: Path) -> dict[str, object]:
    # The run itself again as a compare run: its `user` kind must reproduce the run's own results exactly.
    kinds = ("user", "tfidf", "item_mean")
    return suite_run(run_dir, compare_runs={"again": run_dir}, families=("linear",), only_kinds=kinds)


def test_suite_json_shape(suite: dict[str, object], run_dir: Path) -> None:
    result = json.loads((run_dir / "universal.json").read_text())
    assert result == json.loads(json.dumps(suite))
    assert set(result["embeddings"]) == {"user", "item_mean", "tfidf", "again", "majority"}
    tasks = {"gender", "age", "occupation", "genres_next10", "active_30d", "like_rate"}
    primary = {"gender": "macro_f1", "age": "macro_f1", "occupation": "macro_f1"}
    primary |= {"genres_next10": "mean_auc", "active_30d": "auc", "like_rate": "r2"}
    for kind, per_task in result["embeddings"].items():
        assert set(per_task) == tasks, kind
        for task, metrics in per_task.items():
            assert f"linear_{primary[task]}" in metrics, (kind, task)
            assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values()), (kind, task)
    for task in ("gender", "age", "occupation"):
        for metric in ("macro_f1", "balanced_accuracy", "accuracy"):
            assert 0.0 <= result["embeddings"]["user"][task][f"linear_{metric}"] <= 1.0
    assert result["users"] == {"all": 943, "train": 565, "valid": 189, "test": 189}
    assert result["tasks"]["genres_next10"]["labels"] == 18
    assert 0.3 < result["tasks"]["active_30d"]["positive_share"] < 0.7  # not degenerate
    # Retrieval: the run's arch, popularity, each unmasked and masked; valid alongside.
    assert set(result["retrieval"]) == {
        "supermoe", "supermoe_masked", "popularity", "popularity_masked", "again", "again_masked",
    }  # fmt: skip
    for name, metrics in result["retrieval"].items():
        assert set(metrics) == {"hr@10", "ndcg@10", "mrr@10"}, name
        assert 0.0 <= metrics["mrr@10"] <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0, name
    assert round(result["retrieval"]["popularity"]["hr@10"], 4) == 0.0498
    assert round(result["retrieval"]["popularity_masked"]["hr@10"], 4) == 0.0859
    assert result["retrieval_scorers"]["supermoe"] == STAND_IN  # this run has no next-items objective
    # The compare run is the same run: identical vectors, identical results.
    assert result["embeddings"]["again"] == result["embeddings"]["user"]
    assert result["retrieval"]["again"] == result["retrieval"]["supermoe"]
    md = (run_dir / "universal.md").read_text()
    assert "## gender" in md and "## Next-item retrieval" in md and "plumbing, not results" in md


def test_retrieval_vectors_read_exactly_the_protocol_input(run_dir: Path, ml100k: MovieLens) -> None:
    """The [USER] vector of a user's test input equals the export path's vector for a sample with that history."""
    cfg = load_run_config(run_dir)
    model, _ = restore_model(run_dir, cfg)
    seqs = retrieval.user_sequences(ml100k.ratings, ml100k.items["item_id"])
    template = _retrieval_template(ml100k, cfg.data, seqs.users[:3])
    values, offsets = seqs.inputs("test")
    user = retrieval_user_vectors(model, template, values, offsets[:4])
    assert user.shape == (3, 16)
    # Other histories give other vectors; a history cut to its last 10 items gives another vector again.
    assert not torch.allclose(user[0], user[1])
    short = np.concatenate([values[offsets[u + 1] - 10 : offsets[u + 1]] for u in range(3)])
    cut = retrieval_user_vectors(model, template, short, np.arange(4) * 10)
    assert not torch.allclose(cut, user)
    # Same history, same vector, whoever else is in the batch.
    alone = template.iloc[[1]].reset_index(drop=True)
    again = retrieval_user_vectors(model, alone, values[offsets[1] :], offsets[1:3] - offsets[1])
    assert torch.allclose(again[0], user[1], atol=1e-5)
    table = item_table(model)
    assert table.shape == (1683, 8) and np.isfinite(table).all()
    scorer, name = item_scorer(model, torch.from_numpy(table))
    assert name == STAND_IN and scorer(user, torch.from_numpy(table)).shape == (3, 1683)
