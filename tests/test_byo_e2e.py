"""Bring your own data end to end (issue 16 item 6): a raw DataFrame with string columns and lists, then exactly the
commands of docs/data.md's walkthrough -- ``schema infer``, ``data summary``, ``train`` (a few steps), ``export`` --
with no hand coding in between.

The walkthrough's first command writes ML-100k as a raw table; here a small raw table of the same shape takes its
place, so the test runs in seconds. Every other command is read from docs/data.md and run as written (in-process,
from a scratch directory holding ``configs/byo.yaml``), with tiny model and step overrides appended to ``train``.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from supermoe_rec import cli
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.vocab import load_vocabularies
from tests.dist_utils import in_process_world

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "data.md"
TINY = [
    "--train.max_steps=4",
    "--train.epochs=1",
    "--train.batch_size=64",
    "--train.eval_batch_size=512",
    "--train.tensorboard=false",
    "--train.num_threads=1",
    "--model.embedding_dim=8",
    "--model.encoder.d_model=16",
    "--model.encoder.num_layers=1",
    "--model.encoder.num_heads=2",
    "--model.encoder.ffn_hidden=16",
    "--model.moe.num_experts=2",
    "--model.moe.expert_hidden=16",
    "--model.moe.moe_every=1",
    "--model.towers.hidden=[8]",
]


def walkthrough_commands() -> list[str]:
    """The command lines of docs/data.md's walkthrough block (the ```sh block of its first section)."""
    text = DOC.read_text()
    body = re.search(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert body is not None, "docs/data.md lost its walkthrough block"
    joined = re.sub(r"\\\n\s*", " ", body[1])
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def raw_tables(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Raw train/valid/test tables: string user and item ids, text attributes, lists of strings, NaN labels.

    Per user, interactions in time order; each is a positive (watched, liked if rated 4+) with the items before it
    as its history, and a negative (an unwatched item) in the same request. The last two per user go to valid and
    test.
    """
    rng = np.random.default_rng(seed)
    items = [f"m{i:02d}" for i in range(30)]
    item_genres = {i: sorted(set(rng.choice(["Comedy", "Drama", "Film-Noir", "Children's"], 2))) for i in items}
    item_year = {i: (None if k % 7 == 0 else str(1950 + 3 * k)) for k, i in enumerate(items)}
    rows: dict[str, list[dict[str, object]]] = {"train": [], "valid": [], "test": []}
    for u in range(12):
        user = f"user-{u}"
        profile = {"gender": "MF"[u % 2], "occupation": ["nurse", "chef", "pilot"][u % 3], "zip_code": f"0{u % 4}138"}
        seen = list(rng.choice(items, 9, replace=False))
        for position in range(1, len(seen)):
            split = "test" if position == len(seen) - 1 else "valid" if position == len(seen) - 2 else "train"
            request = f"{user}/{position}"
            negative = rng.choice([i for i in items if i not in seen])
            rating = int(rng.integers(1, 6))
            for item, watched in ((seen[position], 1.0), (negative, 0.0)):
                rows[split].append(
                    {
                        "user_id": user,
                        "request_id": request,
                        "timestamp": 1_000_000 + 1000 * position + u,
                        "item_id": item,
                        "release_year": item_year[item],
                        "genres": item_genres[item],
                        **profile,
                        "history": [str(i) for i in seen[max(0, position - 5) : position]],
                        "watch": watched,
                        "like": float(rating >= 4) if watched else np.nan,
                        "rating": float(rating) if watched else np.nan,
                    }
                )
    return {split: pd.DataFrame(r) for split, r in rows.items()}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch directory with configs/byo.yaml and the raw tables at data/byo/ (what step 1 writes)."""
    (tmp_path / "configs").mkdir()
    shutil.copy(ROOT / "configs" / "byo.yaml", tmp_path / "configs" / "byo.yaml")
    (tmp_path / "data" / "byo").mkdir(parents=True)
    for split, frame in raw_tables().items():
        frame.to_parquet(tmp_path / "data" / "byo" / f"{split}.parquet", index=False)
    monkeypatch.chdir(tmp_path)
    with in_process_world():
        yield tmp_path


def run(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    """One walkthrough command, in-process: ``.venv/bin/supermoe-rec ARGS [> FILE]``; returns its stdout."""
    tokens = shlex.split(command)
    assert tokens[0] == ".venv/bin/supermoe-rec", command
    target = None
    if ">" in tokens:
        tokens, target = tokens[: tokens.index(">")], tokens[tokens.index(">") + 1]
    args = tokens[1:] + (TINY if tokens[1] == "train" else [])
    capsys.readouterr()
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == 0, f"{command}: exit {rc}\n{err[-3000:]}"
    if target is not None:
        Path(target).write_text(out)
    return out


def test_walkthrough_on_a_raw_table(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    commands = walkthrough_commands()
    assert commands[0].startswith(".venv/bin/python scripts/ml100k_raw.py --out data/byo"), commands[0]
    steps = [c.split()[1:3] for c in commands[1:]]
    assert steps == [["schema", "infer"], ["data", "summary"], ["train", "--config"], ["export", "--run"]], steps
    infer, summary, train, export = commands[1:]

    # schema infer: vocab tables for the string columns, the history per group, the candidate sharing its table
    run(infer, capsys)
    text = Path("data/byo/schema.yaml").read_text()
    schema = Schema.from_dict(yaml.safe_load(text))
    tables = {t.name: t for t in schema.tables}
    assert all(tables[n].vocab for n in ("user_id", "item", "gender", "occupation", "zip_code", "genres"))
    assert [(f.name, f.table, f.per_group) for f in schema.sequence_features] == [
        ("history", "item", True),
        ("item_id", "item", False),
    ]
    assert {f.name: f.side.value for f in schema.sparse_features}["gender"] == "user"
    assert [(t.name, t.type.value) for t in schema.tasks] == [
        ("watch", "binary"),
        ("like", "binary"),
        ("rating", "regression"),
    ]
    assert "# the candidate item (named like an item id)" in text

    # data summary: every split validated; rows, groups, positives and negatives per binary task
    result = json.loads(run(summary, capsys))
    train_split = result["splits"]["train"]
    assert (train_split["rows"], train_split["groups"]) == (12 * 6 * 2, 12 * 6)
    assert train_split["binary_labels"]["watch"] == {"positives": 72, "negatives": 72}
    assert set(train_split["binary_labels"]) == {"watch", "like"}
    assert result["vocabularies"]["gender"] == 3  # M, F and row 0
    assert result["splits"]["train"]["report"]["vocab_oov"]["release_year"] > 0  # missing years: row 0, counted

    # train a few steps: the run keeps its vocabularies, and so does every checkpoint
    run(train, capsys)
    run_dir = Path("runs/byo-supermoe")
    assert (run_dir / "metrics.json").is_file()
    saved = load_vocabularies(run_dir / "vocab.json")
    assert saved["gender"].tokens in (("F", "M"), ("M", "F"))
    checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
    assert checkpoints and all((p / "vocab.json").is_file() for p in checkpoints)

    # export the trained run's user representations
    run(export, capsys)
    table = pq.read_table(run_dir / "user_embeddings.parquet")
    assert table.num_rows == 12


def test_compare_honours_train_out_dir(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``compare`` writes its runs to ``train.out_dir`` when that is set (issue 16 item 5), the report to --out."""
    run(walkthrough_commands()[1], capsys)  # schema infer
    args = ["compare", "--config", "configs/byo.yaml", "--archs", "shared_bottom", "--seeds", "1"]
    args += ["--out", "reports/byo", "--train.out_dir=elsewhere", "--data.tasks=[watch,like]", *TINY]
    assert cli.main(args) == 0, capsys.readouterr().err[-3000:]
    runs = sorted(p.parent.name for p in Path("elsewhere").glob("*/metrics.json"))
    assert len(runs) == 3 and all(r.startswith("shared_bottom-") for r in runs), runs  # multi + 2 single-task
    assert not Path("reports/byo/runs").exists()
    report = json.loads(Path("reports/byo/report.json").read_text())
    assert sorted(r["name"] for r in report["runs"]) == runs
