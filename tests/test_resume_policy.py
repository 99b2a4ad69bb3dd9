"""Issue 14, items 1 and 2: what a resume may change (unit checks of :mod:`supermoe_rec.training.resume`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from supermoe_rec.config.experiment import ConfigError, ExperimentConfig, to_dict
from supermoe_rec.training.resume import check_resume, config_changes

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ml100k.yaml"


def plain_config(*overrides: str) -> dict[str, object]:
    from supermoe_rec.config.experiment import apply_overrides

    return to_dict(apply_overrides(ExperimentConfig(), list(overrides)))


def test_shape_changes_are_refused_even_when_allowed() -> None:
    old, new = plain_config(), plain_config("--model.encoder.d_model=32", "--data.max_history=20")
    with pytest.raises(ConfigError, match=r"refused .*data.max_history: 50 -> 20; model.encoder.d_model: 64 -> 32"):
        check_resume(old, new, allowed="")
    with pytest.raises(ConfigError, match=r"train.resume_allow_changes: \['model.encoder.d_model'\] cannot be allowed"):
        check_resume(old, new, allowed="model.encoder.d_model")


def test_hyper_parameter_changes_need_to_be_named() -> None:
    old = plain_config()
    new = plain_config("--model.moe.top_k=1", "--train.lr=0.5", "--train.epochs=9", "--train.num_threads=1")
    with pytest.raises(ConfigError, match=r"--train.resume_allow_changes=model.moe.top_k,train.lr\)$"):
        check_resume(old, new, allowed="")
    with pytest.raises(ConfigError, match=r"not allowed: train.lr: 0.001 -> 0.5"):
        check_resume(old, new, allowed="model.moe.top_k")
    accepted = check_resume(old, new, allowed="model.moe.top_k, train.lr")
    assert [c.as_dict() for c in accepted] == [
        {"key": "model.moe.top_k", "from": 2, "to": 1},
        {"key": "train.lr", "from": 0.001, "to": 0.5},
    ]
    # epochs and threads are free: they do not count as changes that need permission
    kinds = {c.key: c.kind for c in config_changes(old, new)}
    assert kinds["train.epochs"] == kinds["train.num_threads"] == "free"


def test_an_unchanged_resume_passes_and_new_keys_are_refused() -> None:
    old = plain_config()
    assert check_resume(old, old, allowed="") == []
    old_with_unknown = {**old, "model": {**old["model"], "some_new_width": 3}}  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"model.some_new_width: 3 -> <absent>"):
        check_resume(old_with_unknown, old, allowed="")


def test_saved_config_yaml_round_trips_to_no_changes(tmp_path: Path) -> None:
    from supermoe_rec.config.experiment import load_config, save_config

    cfg = load_config(CONFIG)
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_changes(saved, to_dict(cfg)) == []
