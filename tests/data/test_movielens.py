"""Readers for the three MovieLens formats, and the fetch order (cache first, URL falls through fast)."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import pytest

from supermoe_rec.data import movielens
from supermoe_rec.data.errors import DataError
from supermoe_rec.data.movielens import (
    ML100K_GENRES,
    MovieLens,
    fetch_movielens,
    read_grouplens_100k,
    read_ml1m,
)


def write_grouplens_100k(ml: MovieLens, root: Path) -> None:
    """Write frames back in the GroupLens u.data/u.user/u.item format."""
    root.mkdir(parents=True, exist_ok=True)
    ml.ratings.to_csv(root / "u.data", sep="\t", header=False, index=False)
    ml.users[["user_id", "age", "gender", "occupation", "zip_code"]].to_csv(
        root / "u.user", sep="|", header=False, index=False
    )
    lines = []
    for item in ml.items.itertuples():
        year = "" if pd.isna(item.year) else f"01-Jan-{int(item.year)}"
        flags = "|".join("1" if g in item.genres else "0" for g in ML100K_GENRES)
        lines.append(f"{item.item_id}|{item.title}|{year}||http://x|{flags}")
    (root / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")


def test_grouplens_format_matches_recbole_copy(ml100k: MovieLens, tmp_path: Path) -> None:
    write_grouplens_100k(ml100k, tmp_path / "ml-100k")
    again = read_grouplens_100k(tmp_path / "ml-100k")
    pd.testing.assert_frame_equal(again.ratings, ml100k.ratings)
    pd.testing.assert_frame_equal(again.users, ml100k.users)
    assert again.items["genres"].tolist() == ml100k.items["genres"].tolist()
    pd.testing.assert_series_equal(again.items["year"], ml100k.items["year"])


def test_ml1m_reader(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n")
    (root / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (root / "movies.dat").write_bytes(
        "10::GoldenEye (1995)::Action|Adventure|Thriller\n20::Amélie (2001)::Comedy|Romance\n".encode("latin-1")
    )
    ml = read_ml1m(root)
    assert ml.summary() == {"ratings": 3, "users": 2, "items": 2}
    assert ml.items["year"].tolist() == [1995.0, 2001.0]
    assert ml.items["genres"].tolist() == [("Action", "Adventure", "Thriller"), ("Comedy", "Romance")]
    assert ml.items["title"].tolist()[1] == "Amélie (2001)"
    assert ml.users["age"].tolist() == [1, 56]


def test_reader_errors_name_file_row_column(tmp_path: Path) -> None:
    root = tmp_path / "ml-1m"
    root.mkdir()
    (root / "ratings.dat").write_text("1::10::5::978300760\n1::x::3::978302109\n")
    (root / "users.dat").write_text("1::F::1::10::48067\n")
    (root / "movies.dat").write_text("10::A (1995)::Action\n")
    with pytest.raises(DataError, match=r"ratings.dat: row 1, column 'item_id': not an integer: 'x'"):
        read_ml1m(root)
    (root / "ratings.dat").write_text("")
    with pytest.raises(DataError, match=r"ratings.dat: empty file"):
        read_ml1m(root)


def test_fetch_prefers_cache(ml100k: MovieLens, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_grouplens_100k(ml100k, tmp_path / "ml-100k")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(movielens, "_download_zip", no_network)
    monkeypatch.setattr(movielens, "_pip_download_wheel", no_network)
    assert fetch_movielens("ml100k", tmp_path).summary()["ratings"] == 100_000


def test_unreachable_url_falls_through_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 on loopback refuses at once; the fetch must fall through to the offline wheel step.
    monkeypatch.setitem(movielens.GROUPLENS_URLS, "ml100k", "http://127.0.0.1:9/ml-100k.zip")
    called: list[Path] = []

    def fake_wheel(cache: Path) -> None:
        called.append(cache)
        raise OSError("registry unreachable in this test")

    monkeypatch.setattr(movielens, "_pip_download_wheel", fake_wheel)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"127.0.0.1:9.*pip download recbole==1.2.1 \(registry unreachable"):
        fetch_movielens("ml100k", tmp_path, try_url=True, url_timeout_s=2.0)
    assert time.monotonic() - start < 5.0
    assert called == [tmp_path]
