"""Tests for the multi-task comparison: aggregation on hand-written numbers, then a tiny end-to-end run on ml100k."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from supermoe_rec import cli
from supermoe_rec.config.experiment import Arch, ConfigError, ExperimentConfig, TaskType, apply_overrides, to_dict
from supermoe_rec.config.tasks import TaskSpec
from supermoe_rec.data.movielens import MovieLens
from supermoe_rec.studies.ablate import ablate, best_valid, render_ablations, select_variants
from supermoe_rec.studies.compare import compare, parse_archs, plan_runs
from supermoe_rec.studies.executor import RunSpec, config_key, finished_metrics, make_run
from supermoe_rec.studies.seesaw import (
    GAIN_PLOT,
    ArchPlan,
    Report,
    build_report,
    mean_std,
    mtl_gains,
    seesaw_free,
    summarize_task,
)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ml100k.yaml"
TINY = [
    "--train.max_steps=3",
    "--train.epochs=1",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    "--train.tensorboard=false",
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=32",
    "--model.embedding_dim=16",
    # One binary and one regression task cover both gain directions with three runs per arch and seed.
    "--data.tasks=[watch,rating]",
]
ARCHS = ["shared_bottom", "supermoe"]
WATCH = TaskSpec("watch", TaskType.BINARY)
RATING = TaskSpec("rating", TaskType.REGRESSION)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ pure aggregation


def test_mean_std_is_population_std() -> None:
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(1.25)), abs=1e-15)
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_mtl_gains_direction() -> None:
    assert mtl_gains([0.75, 0.70], [0.70, 0.72], higher_is_better=True) == pytest.approx([0.05, -0.02], abs=1e-15)
    assert mtl_gains([0.90, 1.00], [1.00, 0.95], higher_is_better=False) == pytest.approx([0.10, -0.05], abs=1e-15)
    with pytest.raises(ValueError, match="one value per seed"):
        mtl_gains([0.7], [0.7, 0.8], higher_is_better=True)


def test_summarize_task_on_hand_numbers() -> None:
    mean, std, gain, gain_std, single_mean, single_std = summarize_task(
        "auc", True, [0.70, 0.72, 0.74], [0.69, 0.73, 0.71]
    )
    assert mean == pytest.approx(0.72, abs=1e-15)
    assert std == pytest.approx(math.sqrt(0.0008 / 3), abs=1e-15)
    assert gain == pytest.approx(0.01, abs=1e-15)  # per-seed gains 0.01, -0.01, 0.03
    assert gain_std == pytest.approx(math.sqrt((0.0 + 0.0004 + 0.0004) / 3), abs=1e-15)
    assert (single_mean, single_std) == pytest.approx((0.71, math.sqrt(0.0008 / 3)), abs=1e-15)
    # RMSE: lower is better, so the gain is single − multi.
    _, _, gain, _, _, _ = summarize_task("rmse", False, [0.90, 1.00], [1.00, 0.95])
    assert gain == pytest.approx(0.025, abs=1e-15)


def test_seesaw_free() -> None:
    assert seesaw_free({"watch": 0.01, "like": 0.0, "rating": 0.002})
    assert not seesaw_free({"watch": 0.01, "like": -1e-9})
    assert not seesaw_free({"watch": float("nan")})


def _fake_metrics(spec: RunSpec, values: dict[str, dict[str, float]], wall: float, speed: float) -> dict[str, Any]:
    return {
        "config": to_dict(spec.cfg),
        "test": {"loss": 0.0, "tasks": {t: values[t] for t in (spec.tasks or ("watch", "rating"))}},
        "params": {"params_total": 1000, "params_dense_active_per_sample": 90, "params_active_per_sample": 100},
        "train_samples_per_s": speed,
        "wall_s": wall,
    }


def test_build_report_on_hand_numbers(tmp_path: Path) -> None:
    base = apply_overrides(ExperimentConfig(), ["--data.tasks=[watch,rating]"])
    plans, runs = plan_runs(base, [Arch.MMOE], [0, 1], ["watch", "rating"], tmp_path)
    assert len(runs) == 2 * 3 and len({r.name for r in runs}) == 6
    plan = plans[0]
    # seed -> (multi-task metrics, single-task metrics); gains: watch 0.02, 0.00; rating 0.1, -0.3.
    multi = {0: ({"auc": 0.72, "gauc": 0.70}, {"rmse": 0.9}), 1: ({"auc": 0.74, "gauc": 0.71}, {"rmse": 1.2})}
    single = {0: ({"auc": 0.70, "gauc": 0.69}, {"rmse": 1.0}), 1: ({"auc": 0.74, "gauc": 0.72}, {"rmse": 0.9})}
    results: dict[str, tuple[dict[str, Any], bool]] = {}
    for seed in (0, 1):
        watch, rating = multi[seed]
        results[plan.multi[seed].key] = (
            _fake_metrics(plan.multi[seed], {"watch": watch, "rating": rating}, 10.0 + seed, 100.0 * (seed + 1)),
            False,
        )
        watch, rating = single[seed]
        for task, vals in (("watch", watch), ("rating", rating)):
            spec = plan.single[seed][task]
            results[spec.key] = (_fake_metrics(spec, {task: vals}, 1.0, 1.0), seed == 1)
    report = build_report(plans, [WATCH, RATING], [0, 1], results, base, "cmd")
    arch = report["archs"]["mmoe"]
    watch_r, rating_r = arch["tasks"]["watch"], arch["tasks"]["rating"]
    assert watch_r["metric"] == "auc" and rating_r["metric"] == "rmse"
    assert watch_r["mean"] == pytest.approx(0.73, abs=1e-15)
    assert watch_r["std"] == pytest.approx(0.01, abs=1e-15)
    assert watch_r["mtl_gain"] == pytest.approx(0.01, abs=1e-15)
    assert watch_r["single_task_mean"] == pytest.approx(0.72, abs=1e-15)
    assert watch_r["secondary"]["gauc"]["mtl_gain"] == pytest.approx(0.0, abs=1e-15)
    assert rating_r["mean"] == pytest.approx(1.05, abs=1e-15)
    assert rating_r["std"] == pytest.approx(0.15, abs=1e-15)
    assert rating_r["mtl_gain"] == pytest.approx(-0.1, abs=1e-15)
    assert rating_r["per_seed"]["mtl_gain"] == pytest.approx([0.1, -0.3], abs=1e-15)
    assert arch["seesaw_free"] is False
    assert (arch["params_total"], arch["params_active"]) == (1000, 100)
    assert arch["samples_per_s"] == pytest.approx(150.0)
    assert arch["wall_s"] == pytest.approx(10.5)
    assert arch["wall_s_all_runs"] == pytest.approx(10.0 + 11.0 + 4 * 1.0)
    assert [r["reused"] for r in report["runs"]] == [False, False, False, False, True, True]


# -------------------------------------------------------------------------------------------- plan and cache


def test_config_key_ignores_location_and_threads_only() -> None:
    cfg = ExperimentConfig()
    moved = apply_overrides(
        cfg, ["--train.name=x", "--train.out_dir=/elsewhere", "--train.num_threads=1", "--train.tensorboard=false"]
    )
    assert config_key(moved) == config_key(cfg)
    assert config_key(apply_overrides(cfg, ["--train.lr=0.01"])) != config_key(cfg)


def test_config_key_hashes_only_what_differs_from_the_defaults() -> None:
    # So adding an option (at a default that keeps the old behaviour) leaves every existing run's key unchanged.
    def sha(values: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()

    assert config_key(ExperimentConfig()) == sha({})
    tuned = apply_overrides(ExperimentConfig(), ["--train.lr=0.01", "--model.moe.top_k=1", "--train.name=x"])
    assert config_key(tuned) == sha({"model": {"moe": {"top_k": 1}}, "train": {"lr": 0.01}})


def test_a_run_stored_before_an_option_existed_is_still_reused(tmp_path: Path) -> None:
    spec = make_run(ExperimentConfig(), Arch.SUPERMOE, 0, (), tmp_path)
    stored = to_dict(spec.cfg)
    del stored["model"]["moe"]["task_routers"]  # an option added later, at a default that keeps the old behaviour
    (tmp_path / spec.name).mkdir()
    (tmp_path / spec.name / "metrics.json").write_text(json.dumps({"config": stored, "test": {"tasks": {}}}))
    assert finished_metrics(spec) is not None
    tuned = make_run(
        apply_overrides(ExperimentConfig(), ["--model.moe.task_routers=true"]), Arch.SUPERMOE, 0, (), tmp_path
    )
    assert tuned.key != spec.key


def test_single_task_runs_keep_only_their_tasks_weights(tmp_path: Path) -> None:
    weighted = apply_overrides(ExperimentConfig(), ["--train.loss.task_weights={watch: 2, rating: 0.5}"])
    plain = ExperimentConfig()
    like_w = make_run(weighted, Arch.SUPERMOE, 0, ("like",), tmp_path)
    like = make_run(plain, Arch.SUPERMOE, 0, ("like",), tmp_path)
    # like trains the same either way: no weight of another task (its loss would refuse it), same key and run.
    assert like_w.cfg.train.loss.task_weights == {} and like_w.key == like.key and like_w.name == like.name
    watch_w = make_run(weighted, Arch.SUPERMOE, 0, ("watch",), tmp_path)
    assert watch_w.cfg.train.loss.task_weights == {"watch": 2.0}
    assert watch_w.key != make_run(plain, Arch.SUPERMOE, 0, ("watch",), tmp_path).key
    multi = make_run(weighted, Arch.SUPERMOE, 0, (), tmp_path)  # every task: every weight
    assert multi.cfg.train.loss.task_weights == {"watch": 2.0, "rating": 0.5}


@pytest.mark.parametrize("arch", ["shared_bottom", "mmoe", "ple", "single_task"])
def test_mlp_arch_keys_ignore_encoder_settings(arch: str) -> None:
    cfg = apply_overrides(ExperimentConfig(), [f"--model.arch={arch}"])
    encoder_tuned = apply_overrides(
        cfg,
        [
            "--model.moe.num_experts=16",
            "--model.encoder.dropout=0.3",
            "--model.encoder.d_model=128",
            "--train.loss.balance_loss_weight=0.5",
            "--train.loss.z_loss_weight=0",
        ],
    )
    assert config_key(encoder_tuned) == config_key(cfg)
    assert config_key(apply_overrides(cfg, ["--model.mlp.bottom_hidden=[64]"])) != config_key(cfg)
    assert config_key(apply_overrides(cfg, ["--model.embedding_dim=8"])) != config_key(cfg)


@pytest.mark.parametrize("arch", ["supermoe", "dense_transformer"])
def test_transformer_arch_keys_follow_encoder_settings(arch: str) -> None:
    cfg = apply_overrides(ExperimentConfig(), [f"--model.arch={arch}"])
    for override in [
        "--model.moe.num_experts=16",
        "--model.encoder.dropout=0.3",
        "--model.encoder.item_interaction=false",
        "--train.loss.balance_loss_weight=0.5",
    ]:
        assert config_key(apply_overrides(cfg, [override])) != config_key(cfg), override
    # The MLP archs' section changes nothing for a transformer arch.
    assert config_key(apply_overrides(cfg, ["--model.mlp.bottom_hidden=[64]"])) == config_key(cfg)


def test_finished_metrics_needs_same_config(tmp_path: Path) -> None:
    spec = make_run(ExperimentConfig(), Arch.PLE, 3, ("watch",), tmp_path)
    assert spec.name.startswith("ple-watch-seed3-") and spec.cfg.train.out_dir == str(tmp_path)
    assert finished_metrics(spec) is None  # nothing there yet
    run_dir = tmp_path / spec.name
    run_dir.mkdir()
    metrics = {"config": to_dict(spec.cfg), "test": {"tasks": {}}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(spec) == metrics
    metrics["config"] = to_dict(apply_overrides(spec.cfg, ["--train.lr=0.5"]))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    assert finished_metrics(spec) is None  # a different config is not this run
    (run_dir / "metrics.json").write_text("{not json")
    assert finished_metrics(spec) is None


# ------------------------------------------------------------------------------------------------------ errors


def test_parse_archs_errors() -> None:
    assert parse_archs(["ple", Arch.MMOE]) == [Arch.PLE, Arch.MMOE]
    with pytest.raises(ConfigError, match=r"'moe' is not a known architecture \(known: supermoe, dense_transformer"):
        parse_archs(["moe"])
    with pytest.raises(ConfigError, match="single_task is the baseline"):
        parse_archs(["single_task"])
    with pytest.raises(ConfigError, match="listed twice"):
        parse_archs(["ple", "ple"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_archs([])


def test_compare_rejects_bad_seeds_and_archs_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--seeds"):
        compare(CONFIG, ARCHS, seeds=0, out=tmp_path)
    with pytest.raises(ConfigError, match="known: supermoe"):
        compare(CONFIG, ["supermoe", "bert4rec"], seeds=1, out=tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["compare", "--config", str(CONFIG), "--out", str(tmp_path)]
    assert cli.main([*base, "--archs", "supermoe", "--jobs", "0"]) == 2
    assert "--jobs: at least one, got 0" in capsys.readouterr().err
    assert cli.main([*base, "--archs", "supermoe,nope"]) == 2
    assert "'nope' is not a known architecture (known: supermoe, dense_transformer" in capsys.readouterr().err
    assert cli.main([*base, "--seeds", "0"]) == 2
    assert "--seeds: at least one seed" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def compared(ml100k: MovieLens, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    out = tmp_path_factory.mktemp("compare")
    # Two runs at a time, one thread each; test_reuse_then_force reuses them with jobs=1.
    return out, compare(CONFIG, ARCHS, seeds=1, out=out, overrides=TINY, progress=False, jobs=2)


def _check_keys(obj: dict[str, Any], required: dict[str, type | tuple[type, ...]], where: str) -> None:
    for key, kind in required.items():
        assert key in obj, f"{where}: missing {key}"
        assert isinstance(obj[key], kind), f"{where}.{key}: {type(obj[key]).__name__} is not {kind}"


def test_report_json_shape(compared: tuple[Path, Report]) -> None:
    out, report = compared
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    _check_keys(on_disk, {"archs": dict, "seeds": list, "config": dict}, "report")
    assert on_disk["seeds"] == [0]
    assert on_disk["config"]["data"]["tasks"] == ["watch", "rating"]
    assert list(on_disk["archs"]) == ARCHS
    for arch, entry in on_disk["archs"].items():
        _check_keys(
            entry,
            {"tasks": dict, "seesaw_free": bool, "params_total": int, "params_active": int},
            arch,
        )
        _check_keys(entry, {"samples_per_s": (int, float), "wall_s": (int, float)}, arch)
        assert entry["params_total"] > entry["params_active"] > 0 and entry["samples_per_s"] > 0
        assert list(entry["tasks"]) == ["watch", "rating"]
        for task, t in entry["tasks"].items():
            _check_keys(t, {"metric": str}, f"{arch}.{task}")
            _check_keys(t, {k: float for k in ("mean", "std", "mtl_gain", "single_task_mean")}, f"{arch}.{task}")
            assert t["metric"] == ("auc" if task == "watch" else "rmse")
            assert t["std"] == 0.0  # one seed
    assert "gauc" in on_disk["archs"]["supermoe"]["tasks"]["watch"]["secondary"]


def _run_metrics(out: Path, report: Report, arch: str, tasks: list[str]) -> dict[str, Any]:
    (run,) = [r for r in report["runs"] if r["arch"] == arch and r["tasks"] == tasks and r["seed"] == 0]
    metrics: dict[str, Any] = json.loads((out / "runs" / run["name"] / "metrics.json").read_text())
    return metrics


def test_mtl_gain_matches_the_runs(compared: tuple[Path, Report]) -> None:
    out, report = compared
    assert len(report["runs"]) == len(ARCHS) * 3 and not any(r["reused"] for r in report["runs"])
    for arch in ARCHS:
        multi = _run_metrics(out, report, arch, ["watch", "rating"])
        watch = _run_metrics(out, report, arch, ["watch"])
        rating = _run_metrics(out, report, arch, ["rating"])
        # Each run trained what its name says: the arch, its task set, the seed.
        for metrics, tasks in ((multi, ["watch", "rating"]), (watch, ["watch"]), (rating, ["rating"])):
            assert metrics["config"]["model"]["arch"] == arch
            assert metrics["config"]["data"]["tasks"] == tasks
            assert metrics["config"]["train"]["seed"] == 0
            assert list(metrics["test"]["tasks"]) == tasks
        entry = report["archs"][arch]
        auc_gain = multi["test"]["tasks"]["watch"]["auc"] - watch["test"]["tasks"]["watch"]["auc"]
        rmse_gain = rating["test"]["tasks"]["rating"]["rmse"] - multi["test"]["tasks"]["rating"]["rmse"]
        assert entry["tasks"]["watch"]["mtl_gain"] == pytest.approx(auc_gain, abs=1e-12)
        assert entry["tasks"]["rating"]["mtl_gain"] == pytest.approx(rmse_gain, abs=1e-12)
        assert entry["tasks"]["watch"]["mean"] == multi["test"]["tasks"]["watch"]["auc"]
        assert entry["tasks"]["rating"]["single_task_mean"] == rating["test"]["tasks"]["rating"]["rmse"]
        assert entry["seesaw_free"] is (auc_gain >= 0 and rmse_gain >= 0)
        assert entry["params_total"] == multi["params"]["params_total"]
        assert entry["params_active"] == multi["params"]["params_active_per_sample"]
        assert entry["samples_per_s"] == multi["train_samples_per_s"] and entry["wall_s"] == multi["wall_s"]


def test_markdown_and_plot(compared: tuple[Path, Report]) -> None:
    out, report = compared
    png = (out / GAIN_PLOT).read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 1000
    from matplotlib.image import imread

    assert imread(out / GAIN_PLOT).ndim == 3  # decodes as an image
    md = (out / "report.md").read_text()
    assert "| arch | watch AUC ↑ | rating RMSE ↓ | seesaw-free |" in md
    for arch in ARCHS:
        entry = report["archs"][arch]
        watch = entry["tasks"]["watch"]
        assert f"| {arch} | {watch['mean']:.4f} ± {watch['std']:.4f} ({watch['mtl_gain']:+.4f}) |" in md
        assert f"| {arch} | {entry['params_total']:,} | {entry['params_active']:,} |" in md
        assert f"- **{arch}**: seesaw" in md
    assert f"]({GAIN_PLOT})" in md
    assert report["command"] in md and "supermoe-rec compare --config" in report["command"]
    assert "--seeds 1" in report["command"] and "'--data.tasks=[watch,rating]'" in report["command"]


def test_reuse_then_force(compared: tuple[Path, Report], tmp_path: Path) -> None:
    # A moved copy keeps its cache: the run key leaves out where a run is written.
    out = tmp_path / "moved"
    shutil.copytree(compared[0], out)

    def mtimes() -> dict[str, int]:
        return {p.parent.name: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*/metrics.json"))}

    before = mtimes()
    assert len(before) == len(ARCHS) * 3
    # --jobs 2 gave each run one thread of this 2+ core machine, and the thread count is not part of the run's key.
    stored = [json.loads(p.read_text())["config"]["train"] for p in (out / "runs").glob("*/metrics.json")]
    threads = {train["num_threads"] for train in stored}
    assert threads == {max(1, (os.cpu_count() or 1) // 2)}
    again = compare(CONFIG, ARCHS, seeds=1, out=out, overrides=TINY, progress=False)
    assert mtimes() == before
    assert all(r["reused"] for r in again["runs"])
    assert again["archs"] == compared[1]["archs"]

    forced = compare(CONFIG, ["shared_bottom"], seeds=1, out=out, force=True, overrides=TINY, progress=False)
    after = mtimes()
    assert not any(r["reused"] for r in forced["runs"])
    for name, mtime in before.items():
        retrained = name.startswith("shared_bottom-")
        assert (after[name] != mtime) is retrained, name
    assert list(json.loads((out / "report.json").read_text())["archs"]) == ["shared_bottom"]


def test_plan_covers_every_arch_seed_and_task(tmp_path: Path) -> None:
    plans, runs = plan_runs(ExperimentConfig(), [Arch.SUPERMOE, Arch.PLE], [0, 1, 2], ["watch", "like"], tmp_path)
    assert [p.arch for p in plans] == [Arch.SUPERMOE, Arch.PLE]
    assert len(runs) == 2 * 3 * 3
    plan: ArchPlan = plans[1]
    assert plan.multi[2].cfg.data.tasks == () and plan.multi[2].cfg.train.seed == 2
    assert plan.single[1]["like"].cfg.data.tasks == ("like",) and plan.single[1]["like"].cfg.model.arch is Arch.PLE


# --------------------------------------------------------------------------------------------------- ablations


def test_render_ablations_signs_the_change_so_that_positive_is_better() -> None:
    def entry(auc: float, rmse: float) -> dict[str, Any]:
        return {
            "overrides": [],
            "best_epoch": [2],
            "params_total": 10,
            "params_active": 5,
            "tasks": {
                "watch": {"metric": "auc", "higher_is_better": True, "valid": auc, "test": auc - 0.01},
                "rating": {"metric": "rmse", "higher_is_better": False, "valid": rmse, "test": rmse + 0.1},
            },
        }

    text = render_ablations({"default": entry(0.80, 1.00), "k=1": entry(0.79, 0.90)}, seeds=1, command="cmd")
    row = next(line for line in text.splitlines() if line.startswith("| k=1 |"))
    # watch AUC fell by 0.01 (worse: negative); rating RMSE fell by 0.1 (better: positive).
    assert "0.7900 (-0.0100)" in row and "0.9000 (+0.1000)" in row
    assert "| default | (config as is) | 0.8000 | 1.0000 | 0.7900 | 1.1000 |" in text


def test_best_valid_is_the_valid_result_of_the_tested_epoch() -> None:
    history = [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.5}, {"epoch": 3, "loss": 1.7}]
    assert best_valid({"best_epoch": 2, "valid_history": history}) == {"epoch": 2, "loss": 1.5}
    assert best_valid({"best_epoch": -1, "valid_history": []}) is None


def test_ablate_reuses_the_comparisons_default_run_and_extends_report_md(
    compared: tuple[Path, Report], tmp_path: Path
) -> None:
    out = tmp_path / "ablate"
    shutil.copytree(compared[0], out)
    (out / "findings.md").write_text("## Findings\n\nwritten by hand\n")
    default_metrics = next((out / "runs").glob("supermoe-watch+rating-seed0-*/metrics.json"))
    mtime = default_metrics.stat().st_mtime_ns
    variants = {"default": (), "no_task_tokens": ("--model.encoder.use_task_tokens=false",)}

    summary = ablate(CONFIG, seeds=1, out=out, overrides=TINY, progress=False, variants=variants)

    assert default_metrics.stat().st_mtime_ns == mtime, "the comparison's supermoe run was trained again"
    assert summary["default"]["runs"] == [default_metrics.parent.name]
    stored = json.loads(default_metrics.read_text())
    # TINY stops after 3 steps, before any epoch ends: no valid result (test_best_valid covers the lookup).
    assert stored["valid_history"] == [] and summary["default"]["tasks"]["watch"]["valid"] is None
    assert summary["default"]["tasks"]["watch"]["test"] == stored["test"]["tasks"]["watch"]["auc"]
    assert summary["default"]["tasks"]["rating"]["test"] == stored["test"]["tasks"]["rating"]["rmse"]
    ablated = summary["no_task_tokens"]
    assert ablated["overrides"] == ["--model.encoder.use_task_tokens=false"]
    ablated_config = json.loads((out / "runs" / ablated["runs"][0] / "metrics.json").read_text())["config"]
    assert ablated_config["model"]["encoder"]["use_task_tokens"] is False
    assert json.loads((out / "ablations.json").read_text()) == summary
    assert "--variants no_task_tokens --train.max_steps=3" in (out / "ablations.md").read_text()
    report_md = (out / "report.md").read_text()
    assert report_md.startswith("# Multi-task comparison")
    assert "## Ablations (supermoe, multi-task)" in report_md and "| no_task_tokens |" in report_md
    assert report_md.index("## Ablations") < report_md.index("## Findings\n\nwritten by hand")


def test_select_variants_keeps_default_and_names_unknown_ones() -> None:
    assert list(select_variants(["experts_16", "top1_routing"])) == ["default", "top1_routing", "experts_16"]
    with pytest.raises(ConfigError, match=r"--variants: unknown \['top3'\] \(known: default, no_task_tokens"):
        select_variants(["top3"])
