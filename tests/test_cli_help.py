"""``--help`` of every command lists every config key with its type and default, by section (issue 16 item 5)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

from supermoe_rec import cli
from supermoe_rec.config.experiment import ExperimentConfig
from supermoe_rec.config.help import _leaves


def all_keys(cls: type[Any], prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key)
        elif not f.name.startswith("_"):
            keys.append(key)
    return keys


COMMANDS = [name for name, _ in _leaves(cli._parser(), "") if name != "schema infer"]


def test_every_command_is_covered() -> None:
    assert {"train", "data summary", "export", "compare", "ablate", "plan", "probe"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_config_keys(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command.split(), "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for key in all_keys(ExperimentConfig):
        assert f"  --{key}=" in text, key
    assert "[model.moe]" in text
    assert "  --train.lr=FLOAT  (default: 0.001)" in text
    assert "  --model.arch=supermoe|" in text
