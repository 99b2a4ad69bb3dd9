"""Plots: every function writes a readable PNG of a sensible size; routing rows are normalised exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest

from supermoe_rec.evaluation.plots import (
    PNG_SIGNATURE,
    plot_expert_load,
    plot_routing_heatmap,
    plot_scaling,
    plot_suite_primary,
    plot_training_curves,
    primary_metric_name,
    row_normalise,
)


def _check_png(path: Path, min_width: int = 300, min_height: int = 200) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert width >= min_width and height >= min_height
    assert width <= 4000 and height <= 4000
    assert float(image[..., :3].std()) > 0.01  # something was drawn, not a blank canvas


def _metrics(epochs: int) -> dict[str, Any]:
    history = [
        {
            "epoch": e + 1,
            "loss": 1.0 / (e + 1),
            "tasks": {
                "watch": {"auc": 0.6 + 0.05 * e, "gauc": 0.55, "count": 100},
                "rating": {"rmse": 1.2 - 0.1 * e, "mae": 0.9, "count": 50},
            },
        }
        for e in range(epochs)
    ]
    return {"valid_history": history, "best_epoch": epochs}


def test_row_normalise_hand_computed() -> None:
    counts = np.array([[1, 1, 2], [0, 0, 0], [3, 0, 1], [0, 1, 0]])
    expected = np.array([[0.25, 0.25, 0.5], [0.0, 0.0, 0.0], [0.75, 0.0, 0.25], [0.0, 1.0, 0.0]])
    assert np.array_equal(row_normalise(counts), expected)
    assert row_normalise(counts).dtype == np.float64


def test_row_normalise_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rows, experts"):
        row_normalise([1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        row_normalise([[1, -1]])


def test_primary_metric_name() -> None:
    assert primary_metric_name({"count": 3, "gauc": 0.5, "auc": 0.6}) == "auc"
    assert primary_metric_name({"mae": 1.0, "rmse": 1.1}) == "rmse"
    assert primary_metric_name({"count": 1, "ndcg": 0.3}) == "ndcg"
    with pytest.raises(ValueError):
        primary_metric_name({"count": 1})


def test_training_curves_png(tmp_path: Path) -> None:
    out = plot_training_curves(_metrics(3), tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    # Three panels (loss, watch auc, rating rmse) side by side: wider than tall.
    _check_png(out, min_width=900)


def test_training_curves_without_history(tmp_path: Path) -> None:
    out = plot_training_curves({"valid_history": [], "best_epoch": -1}, tmp_path / "curves.png")
    _check_png(out)


def test_expert_load_png(tmp_path: Path) -> None:
    tokens = np.array([[10, 30, 0, 60], [25, 25, 25, 25]])  # [Λ=2, E=4]
    _check_png(plot_expert_load(tokens, tmp_path / "load.png"))


def test_routing_heatmap_png(tmp_path: Path) -> None:
    counts = np.arange(5 * 8).reshape(5, 8)  # [T+2=5, E=8]
    labels = ["[USER]", "watch", "like", "rating", "history"]
    _check_png(plot_routing_heatmap(counts, labels, tmp_path / "heat.png"))
    with pytest.raises(ValueError, match="row labels"):
        plot_routing_heatmap(counts, labels[:-1], tmp_path / "bad.png")


def test_scaling_png(tmp_path: Path) -> None:
    def arm(params: float, speed: float, shared: int) -> dict[str, Any]:
        return {
            "params_total": params,
            "samples_per_s": speed,
            "shape": {"num_shared_experts": shared},
            "tasks": {"watch": {"mean": 0.7, "std": 0.01, "metric": "auc"}},
        }

    summary = {"arms": {"dense": arm(1e6, 900.0, 0), "e4_s0_bias": arm(4e6, 700.0, 0), "e4_s1_bias": arm(4e6, 650, 1)}}
    _check_png(plot_scaling(summary, tmp_path / "scaling.png"), min_width=600)  # a task panel and the speed panel


def test_suite_primary_png(tmp_path: Path) -> None:
    tasks = {"gender": {"type": "classes", "primary": "macro_f1"}, "active_30d": {"type": "binary", "primary": "auc"}}
    scores = {"gender": {"linear_macro_f1": 0.6, "mlp_macro_f1": 0.55}, "active_30d": {"linear_auc": 0.7}}
    result = {
        "tasks": tasks,
        "families": ["linear", "mlp"],
        "embeddings": {"user": scores, "majority": scores},
        "std": {"embeddings": {"user": {"gender": {"linear_macro_f1": 0.02}}}},
    }
    _check_png(plot_suite_primary(result, tmp_path / "suite.png"), min_width=600)


def test_no_module_draws_through_pyplot() -> None:
    """Every figure is drawn here, on the Agg canvas: no module of the package imports pyplot."""
    package = Path(__file__).resolve().parents[1] / "supermoe_rec"
    offenders = [str(p) for p in package.rglob("*.py") if "matplotlib.pyplot" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders
