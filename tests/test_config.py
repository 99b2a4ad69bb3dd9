from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from supermoe_rec.config import (
    Arch,
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    load_config,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_configs_load() -> None:
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("schema"):
            continue
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig), path


def test_overrides_typed_and_nested() -> None:
    cfg = apply_overrides(
        ExperimentConfig(),
        ["--train.lr=0.01", "--model.moe.num_experts=16", "--model.arch=mmoe", "--model.tower_hidden=[32,16]"],
    )
    assert cfg.train.lr == 0.01
    assert cfg.model.moe.num_experts == 16
    assert cfg.model.arch is Arch.MMOE
    assert cfg.model.tower_hidden == (32, 16)
    # Frozen: the default instance is untouched.
    assert ExperimentConfig().model.moe.num_experts == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.lrr=0.1", "train.lrr: unknown key"),
        ("--model.moe.top_k=two", "model.moe.top_k: expected an integer"),
        ("--model.moe.top_k=1.5", "model.moe.top_k: expected an integer"),
        ("--model.arch=transformerx", "model.arch: 'transformerx' is not one of"),
        ("--model.use_moe=3", "model.use_moe: expected true/false"),
        ("--nosection.key=1", "nosection: unknown section"),
        ("--train.lr", "overrides look like"),
    ],
)
def test_bad_override_names_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        apply_overrides(ExperimentConfig(), [override])


def test_bad_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.epochs: expected an integer"):
        load_config(path)
    path.write_text("model:\n  moe:\n    capacity: 2\n")
    with pytest.raises(ConfigError, match=r"model.moe.capacity: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = apply_overrides(ExperimentConfig(), ["--train.task_weights={like: 2.0}", "--data.tasks=[watch, like]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_trained_task_weights_keep_the_selected_tasks_only() -> None:
    cfg = apply_overrides(ExperimentConfig(), ["--train.task_weights={watch: 2, rating: 0.5}"])
    assert cfg.trained_task_weights() == {"watch": 2.0, "rating": 0.5}  # every task trained: every weight
    like = apply_overrides(cfg, ["--data.tasks=[like]"])
    assert like.trained_task_weights() == {}
    assert apply_overrides(cfg, ["--data.tasks=[rating, like]"]).trained_task_weights() == {"rating": 0.5}
    assert like.train.task_weights == {"watch": 2.0, "rating": 0.5}  # the config itself is left as written
