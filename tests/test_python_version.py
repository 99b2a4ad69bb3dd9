"""One supported Python version, stated the same way everywhere it is stated, and the one the tests run on."""

from __future__ import annotations

import configparser
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stated_versions(root: Path) -> dict[str, str]:
    """Every place that names the supported Python, as "3.N"."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    requires = cfg["options"]["python_requires"]
    low, high = re.fullmatch(r">=\s*3\.(\d+),\s*<\s*3\.(\d+)", requires).groups()  # type: ignore[union-attr]
    assert int(high) == int(low) + 1, f"python_requires allows more than one version: {requires}"
    classifiers = re.findall(r"Programming Language :: Python :: (3\.\d+)", cfg["metadata"]["classifiers"])
    target = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
    bootstrap = re.search(r"^SUPPORTED_PYTHON=(\S+)$", (root / "scripts" / "bootstrap.sh").read_text(), re.M)
    readme = re.search(r"need only Python (3\.\d+)", (root / "README.md").read_text())
    design = re.search(r"with \*\*Python (3\.\d+)\*\*", (root / "docs" / "design.md").read_text())
    return {
        "setup.cfg python_requires": f"3.{low}",
        "setup.cfg classifiers": ",".join(classifiers),
        "setup.cfg mypy python_version": cfg["mypy"]["python_version"],
        "pyproject.toml ruff target-version": f"{target[2]}.{target[3:]}",
        "scripts/bootstrap.sh": bootstrap.group(1) if bootstrap else "missing",
        "README.md": readme.group(1) if readme else "missing",
        "docs/design.md": design.group(1) if design else "missing",
    }


def test_one_python_version_everywhere() -> None:
    versions = stated_versions(ROOT)
    assert len(set(versions.values())) == 1, versions
    assert next(iter(versions.values())) == f"{sys.version_info[0]}.{sys.version_info[1]}", (versions, sys.version)


def test_a_second_version_is_caught(tmp_path: Path) -> None:
    for name in ("setup.cfg", "pyproject.toml", "README.md", "scripts/bootstrap.sh", "docs/design.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    readme = tmp_path / "README.md"
    readme.write_text(re.sub(r"need only Python 3\.\d+", "need only Python 3.10", readme.read_text()))
    assert len(set(stated_versions(tmp_path).values())) == 2
