"""The MoE scaling study's plan and report (supermoe_rec.studies.scale); the training itself is compare's, tested
there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from supermoe_rec.config.experiment import Arch, ExperimentConfig, TaskType
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.evaluation.plots import plot_scaling
from supermoe_rec.modules.moe_recipe import active_params
from supermoe_rec.studies.executor import RunSpec
from supermoe_rec.studies.scale import WIN_STD, plan_arms, render_markdown, summarize


def test_plan_arms_dense_then_every_shape_at_the_default_active_size() -> None:
    arms = plan_arms(ExperimentConfig())
    assert [a.name for a in arms][:3] == ["dense", "e4_s0_aux_loss", "e4_s0_bias"]
    assert len(arms) == 1 + 3 * 2 * 2
    assert arms[0].arch is Arch.DENSE_TRANSFORMER and arms[0].overrides == ()
    target = active_params(64, 8, 2, 128)
    for arm in arms[1:]:
        assert arm.arch is Arch.SUPERMOE and arm.shape is not None
        assert abs(arm.shape.active - target) / target < 0.02
        assert f"--model.moe.num_experts={arm.shape.num_experts}" in arm.overrides
        assert arm.overrides[-1].startswith("--model.moe.load_balance=")


def _fake_results(arms: list[Any], quality: dict[str, list[float]]) -> tuple[dict[str, list[RunSpec]], dict[str, Any]]:
    plan: dict[str, list[RunSpec]] = {}
    results: dict[str, Any] = {}
    for arm in arms:
        specs = []
        for seed, value in enumerate(quality[arm.name]):
            key = f"{arm.name}-{seed}"
            specs.append(RunSpec(ExperimentConfig(), key))
            metrics = {
                "params": {"params_total": 1000 * (len(arm.name) + 1), "params_active_per_sample": 500},
                "train_samples_per_s": 100.0 + seed,
                "test": {"tasks": {"watch": {"auc": value}, "rating": {"rmse": 1.0}}},
            }
            results[key] = (metrics, False)
        plan[arm.name] = specs
    return plan, results


def test_summary_verdicts_in_pooled_std_and_the_aim(tmp_path: Path) -> None:
    arms = plan_arms(ExperimentConfig(), experts=(4, 16), shared=(0,), balances=("bias",))
    quality = {"dense": [0.70, 0.71], "e4_s0_bias": [0.74, 0.75], "e16_s0_bias": [0.60, 0.61]}
    plan, results = _fake_results(arms, quality)
    tasks = [TaskSpec("watch", TaskType.BINARY), TaskSpec("rating", TaskType.REGRESSION)]
    summary = summarize(arms, plan, results, tasks)
    win = summary["arms"]["e4_s0_bias"]["tasks"]["watch"]
    assert win["verdict"] == "wins" and win["vs_dense_std"] > WIN_STD  # +0.04 over a pooled std of 0.005
    assert summary["arms"]["e16_s0_bias"]["tasks"]["watch"]["verdict"] == "loses"
    assert summary["arms"]["e4_s0_bias"]["tasks"]["rating"]["verdict"] == "ties"  # identical: 0 std apart
    assert summary["aim"]["met_by"] == ["e4_s0_bias"]
    md = render_markdown(summary, seeds=2, command="supermoe-rec scale ...")
    assert "| e4_s0_bias | 4 | 1 |" in md and "wins: e4_s0_bias" in md and "met by e4_s0_bias" in md
    plot_scaling(summary, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000
