from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from supermoe_rec.config.experiment import (
    MOVED_KEYS,
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
        ["--train.lr=0.01", "--model.moe.num_experts=16", "--model.arch=mmoe", "--model.towers.hidden=[32,16]"],
    )
    assert cfg.train.lr == 0.01
    assert cfg.model.moe.num_experts == 16
    assert cfg.model.arch is Arch.MMOE
    assert cfg.model.towers.hidden == (32, 16)
    # Frozen: the default instance is untouched.
    assert ExperimentConfig().model.moe.num_experts == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.lrr=0.1", "train.lrr: unknown key"),
        ("--model.moe.top_k=two", "model.moe.top_k: expected an integer"),
        ("--model.moe.top_k=1.5", "model.moe.top_k: expected an integer"),
        ("--model.arch=transformerx", "model.arch: 'transformerx' is not one of"),
        ("--model.encoder.use_task_tokens=3", "model.encoder.use_task_tokens: expected true/false"),
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
    cfg = apply_overrides(ExperimentConfig(), ["--train.loss.task_weights={like: 2.0}", "--data.tasks=[watch, like]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(cfg)
    assert load_config(tmp_path / "config.yaml") == cfg


def test_trained_task_weights_keep_the_selected_tasks_only() -> None:
    cfg = apply_overrides(ExperimentConfig(), ["--train.loss.task_weights={watch: 2, rating: 0.5}"])
    assert cfg.trained_task_weights() == {"watch": 2.0, "rating": 0.5}  # every task trained: every weight
    like = apply_overrides(cfg, ["--data.tasks=[like]"])
    assert like.trained_task_weights() == {}
    assert apply_overrides(cfg, ["--data.tasks=[rating, like]"]).trained_task_weights() == {"rating": 0.5}
    assert like.train.loss.task_weights == {"watch": 2.0, "rating": 0.5}  # the config itself is left as written


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("model.d_model", "model.encoder.d_model"),
        ("model.dropout", "model.encoder.dropout"),
        ("model.tower_hidden", "model.towers.hidden"),
        ("model.bottom_hidden", "model.mlp.bottom_hidden"),
        ("model.moe.balance_loss_weight", "train.loss.balance_loss_weight"),
        ("model.moe.expert_parallel", "train.expert_parallel"),
        ("train.task_weights", "train.loss.task_weights"),
        ("train.huber_delta", "train.loss.huber_delta"),
    ],
)
def test_a_key_of_the_flat_layout_names_its_new_key(old: str, new: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{old}: this key moved to {new}$"):
        apply_overrides(ExperimentConfig(), [f"--{old}=1"])
    *sections, key = old.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections)) + f"{'  ' * len(sections)}{key}: 1\n"
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"old.yaml: {old}: this key moved to {new}$"):
        load_config(path)


def test_use_moe_is_gone_and_arch_is_the_switch() -> None:
    with pytest.raises(ConfigError, match=r"model.use_moe: this key was removed: model.arch is the only switch"):
        apply_overrides(ExperimentConfig(), ["--model.use_moe=false"])


def test_every_moved_key_names_a_key_that_exists() -> None:
    values = to_dict(ExperimentConfig())
    for old, new in MOVED_KEYS.items():
        node: Any = values
        for part in new.split("."):
            assert isinstance(node, dict) and part in node, (old, new)
            node = node[part]
        with pytest.raises(ConfigError, match=f"this key moved to {new}"):
            apply_overrides(ExperimentConfig(), [f"--{old}=1"])
