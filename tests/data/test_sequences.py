"""Item-sequence files (the Amazon benchmarks' format) as leave-one-out next-item samples."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.sequences import build_sequences, read_sequences
from supermoe_rec.data.splits import load_data

ROOT = Path(__file__).resolve().parents[2]
# The public data lies next to the repository (CI sets SUPERMOE_REQUIRE_SHARED_DATA=1, so its absence fails there).
SHARED = Path(os.environ.get("SUPERMOE_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "seq.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message", "row"),
    [
        ("1 1 2 3\n2 4 x 5\n", "not a line of integer ids", 1),
        ("1 1 2 0\n", "ids start at 1", 0),
        ("1 1 2\n", "at least 3 items", 0),
        ("1 1 2 3\n1 4 5 6\n", "user 1 appears twice", 1),
    ],
)
def test_bad_lines_name_the_file_and_row(tmp_path: Path, text: str, message: str, row: int) -> None:
    # Rows count from 0, as in tables: row 0 is the first line.
    path = _write(tmp_path, text)
    with pytest.raises(DataError, match=message) as err:
        read_sequences(path)
    assert err.value.row == row and err.value.source == str(path)


def test_a_missing_file_names_the_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Beauty\.txt: file not found") as err:
        load_data(DataConfig(source="amazon_beauty", sequences_dir=str(tmp_path)))
    assert str(tmp_path / "Beauty.txt") in str(err.value)


def test_leave_one_out_samples_by_hand(tmp_path: Path) -> None:
    users, seqs = read_sequences(_write(tmp_path, "7 3 1 4 1 5\n9 2 6 5\n"))
    out = build_sequences(users, seqs, DataConfig(next_window=2, max_history=2), "toy")
    frames = out["frames"]
    train = frames["train"]  # type: ignore[index]
    pos = train[train["click"] == 1]
    # User 7 (items 3 1 4 1 5): train targets at positions 1 and 2, valid at 3 (item 1), test at 4 (item 5).
    # User 9 (items 2 6 5): valid at 1, test at 2, no train target.
    assert pos["user_id"].tolist() == [7, 7]
    assert pos["item"].tolist() == [1, 4]
    assert [h.tolist() for h in pos["history"]] == [[3], [3, 1]]
    # Future items stop at the split's end (train ends before the valid item).
    assert [n.tolist() for n in pos["next_items"]] == [[1, 4], [4]]
    valid = frames["valid"]  # type: ignore[index]
    assert valid[valid["click"] == 1]["item"].tolist() == [1, 6]
    test = frames["test"]  # type: ignore[index]
    last = test[(test["click"] == 1) & (test["user_id"] == 7)].iloc[0]
    assert last["item"] == 5 and last["history"].tolist() == [4, 1] and last["next_items"].tolist() == [5]
    # Negatives: never an item of their user.
    for frame in frames.values():  # type: ignore[attr-defined]
        neg = frame[frame["click"] == 0]
        for user, item in zip(neg["user_id"], neg["item"], strict=True):
            assert item not in seqs[list(users).index(user)]
    assert out["schema"].next_items == "next_items"  # type: ignore[attr-defined]


@pytest.mark.skipif(
    not (SHARED / "amazon" / "Beauty.txt").is_file() and os.environ.get("SUPERMOE_REQUIRE_SHARED_DATA") != "1",
    reason=f"the public Amazon sequences are not at {SHARED / 'amazon'} (set SUPERMOE_SHARED_DATA to their folder)",
)
def test_amazon_beauty_matches_its_published_sizes() -> None:
    data = load_data(DataConfig(source="amazon_beauty", sequences_dir=str(SHARED / "amazon"), next_window=1))
    assert (data.info["users"], data.info["items"], data.info["interactions"]) == (22_363, 12_101, 198_502)
    groups = {name: ds.num_groups for name, ds in data.splits.items()}
    assert groups == {"train": 198_502 - 3 * 22_363, "valid": 22_363, "test": 22_363}
    test = data.splits["test"]
    assert np.all(test.group_sizes() == 2)
