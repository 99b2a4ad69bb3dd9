"""MovieLens readers (GroupLens ML-100k and ML-1M, RecBole atomic files) and an offline-capable fetch.

Every reader returns the same :class:`MovieLens` frames, so the protocol code never sees a file format:

- ``ratings``: user_id, item_id, rating (int 1..5), timestamp (int seconds)
- ``users``:   user_id, age (int), gender, occupation, zip_code (strings)
- ``items``:   item_id, title, year (float, NaN when unknown), genres (tuple of genre names)

Fetch order (:func:`fetch_movielens`): the cache dir; then the GroupLens URL where the network allows (a failure
falls through within ``url_timeout_s``); then, for ML-100k, the copy inside the ``recbole==1.2.1`` wheel, fetched
with ``pip download --no-deps`` from the package registry and read straight from the zip.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from supermoe_rec.data.errors import DataError, first_true

log = logging.getLogger(__name__)

GROUPLENS_URLS = {
    "ml100k": "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
    "ml1m": "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
}
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_WHEEL_FILE = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_ML100K = "recbole/dataset_example/ml-100k/ml-100k"

# GroupLens ML-100k genre flag columns of u.item, in file order (u.genre lists the same).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass(frozen=True)
class MovieLens:
    """One MovieLens dataset as three frames (see the module docstring for columns)."""

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str

    def summary(self) -> dict[str, int]:
        return {
            "ratings": len(self.ratings),
            "users": int(self.ratings["user_id"].nunique()),
            "items": int(self.ratings["item_id"].nunique()),
        }


def _require_columns(frame: pd.DataFrame, columns: list[str], source: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(source, f"missing column(s) {missing} (found {list(frame.columns)})")


def _check_ratings(ratings: pd.DataFrame, source: str) -> pd.DataFrame:
    """Integer-typed ratings with a clear error naming the first bad row."""
    if ratings.empty:
        raise DataError(source, "no ratings (empty file)")
    for column in ("user_id", "item_id", "rating", "timestamp"):
        values = pd.to_numeric(ratings[column], errors="coerce")
        bad = values.isna() | (values != np.floor(values))
        if bad.any():
            row = first_true(bad.to_numpy())
            raise DataError(source, f"not an integer: {ratings[column].iloc[row]!r}", row=row, column=column)
        ratings[column] = values.astype(np.int64)
    return ratings.reset_index(drop=True)


def _year_from(text: pd.Series) -> pd.Series:
    """First 4-digit year in a string column (e.g. '01-Jan-1995', 'Toy Story (1995)'); NaN when absent."""
    return pd.to_numeric(text.astype(str).str.extract(r"(\d{4})", expand=False), errors="coerce").astype(float)


def read_grouplens_100k(root: Path) -> MovieLens:
    """Read GroupLens ML-100k files ``u.data``, ``u.user``, ``u.item`` from ``root``."""
    root = Path(root)
    ratings = _read_table(root / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    ratings = _check_ratings(ratings, str(root / "u.data"))
    users = _read_table(root / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"])
    users["age"] = pd.to_numeric(users["age"], errors="coerce")
    item_cols = ["item_id", "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
    raw_items = _read_table(root / "u.item", sep="|", names=item_cols, encoding="latin-1")
    flags = raw_items[list(ML100K_GENRES)].fillna(0).astype(int).to_numpy()
    genres = [tuple(g for g, f in zip(ML100K_GENRES, row, strict=True) if f) for row in flags]
    items = pd.DataFrame(
        {
            "item_id": raw_items["item_id"].astype(np.int64),
            "title": raw_items["title"].astype(str),
            "year": _year_from(raw_items["release_date"]),
            "genres": genres,
        }
    )
    return MovieLens("ml100k", ratings, _clean_users(users), items, source=str(root))


def read_recbole_100k(read: Callable[[str], bytes], source: str) -> MovieLens:
    """Read RecBole atomic files ``ml-100k.{inter,user,item}``; ``read(suffix)`` returns a file's bytes.

    Atomic files are tab-separated with typed headers such as ``user_id:token``; ``token_seq`` fields are
    space-separated.
    """

    def frame(suffix: str) -> pd.DataFrame:
        data = read(suffix)
        name = f"{source}:ml-100k.{suffix}"
        if not data.strip():
            raise DataError(name, "empty file")
        df = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False, quoting=3)
        df.columns = [c.split(":", 1)[0] for c in df.columns]
        return df

    inter = frame("inter")
    _require_columns(inter, ["user_id", "item_id", "rating", "timestamp"], f"{source}:ml-100k.inter")
    ratings = _check_ratings(inter[["user_id", "item_id", "rating", "timestamp"]].copy(), f"{source}:ml-100k.inter")
    user = frame("user")
    _require_columns(user, ["user_id", "age", "gender", "occupation", "zip_code"], f"{source}:ml-100k.user")
    users = pd.DataFrame(
        {
            "user_id": user["user_id"].astype(np.int64),
            "age": pd.to_numeric(user["age"], errors="coerce"),
            "gender": user["gender"],
            "occupation": user["occupation"],
            "zip_code": user["zip_code"],
        }
    )
    item = frame("item")
    _require_columns(item, ["item_id", "movie_title", "release_year", "class"], f"{source}:ml-100k.item")
    items = pd.DataFrame(
        {
            "item_id": item["item_id"].astype(np.int64),
            "title": item["movie_title"],
            "year": _year_from(item["release_year"]),
            "genres": [tuple(c.split()) for c in item["class"]],
        }
    )
    return MovieLens("ml100k", ratings, _clean_users(users), items, source=source)


def read_ml1m(root: Path) -> MovieLens:
    """Read GroupLens ML-1M ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1)."""
    root = Path(root)
    ratings = _read_table(root / "ratings.dat", sep="::", names=["user_id", "item_id", "rating", "timestamp"])
    ratings = _check_ratings(ratings, str(root / "ratings.dat"))
    users = _read_table(root / "users.dat", sep="::", names=["user_id", "gender", "age", "occupation", "zip_code"])
    users["age"] = pd.to_numeric(users["age"], errors="coerce")
    movies = _read_table(root / "movies.dat", sep="::", names=["item_id", "title", "genres"], encoding="latin-1")
    items = pd.DataFrame(
        {
            "item_id": movies["item_id"].astype(np.int64),
            "title": movies["title"].astype(str),
            "year": _year_from(movies["title"].str.extract(r"\((\d{4})\)\s*$", expand=False).fillna("")),
            "genres": [tuple(str(g).split("|")) if isinstance(g, str) and g else () for g in movies["genres"]],
        }
    )
    return MovieLens("ml1m", ratings, _clean_users(users), items, source=str(root))


def _read_table(path: Path, sep: str, names: list[str], encoding: str = "utf-8") -> pd.DataFrame:
    if not path.is_file():
        raise DataError(str(path), "file not found")
    if path.stat().st_size == 0:
        raise DataError(str(path), "empty file")
    engine = "python" if len(sep) > 1 else "c"
    return pd.read_csv(
        path, sep=sep, names=names, header=None, dtype=str, encoding=encoding, engine=engine, keep_default_na=False
    )


def _clean_users(users: pd.DataFrame) -> pd.DataFrame:
    users = users.copy()
    users["user_id"] = users["user_id"].astype(np.int64)
    for column in ("gender", "occupation", "zip_code"):
        users[column] = users[column].astype(str)
    return users.reset_index(drop=True)


# --------------------------------------------------------------------------------------------------- fetch


def fetch_movielens(name: str, cache_dir: str | Path, try_url: bool = True, url_timeout_s: float = 5.0) -> MovieLens:
    """Load MovieLens ``name`` ('ml100k' or 'ml1m') from the cache, the GroupLens URL, or the recbole wheel."""
    if name not in GROUPLENS_URLS:
        raise DataError("data.source", f"unknown MovieLens dataset {name!r} (known: {sorted(GROUPLENS_URLS)})")
    cache = Path(cache_dir).expanduser()
    folder = {"ml100k": "ml-100k", "ml1m": "ml-1m"}[name]
    reader = read_grouplens_100k if name == "ml100k" else read_ml1m
    tried: list[str] = []

    if (cache / folder).is_dir():
        return reader(cache / folder)
    tried.append(f"cache {cache / folder} (absent)")
    wheel = cache / RECBOLE_WHEEL_FILE
    if name == "ml100k" and wheel.is_file():
        return _read_wheel(wheel)

    if try_url:
        url = GROUPLENS_URLS[name]
        try:
            _download_zip(url, cache, url_timeout_s)
            return reader(cache / folder)
        except (OSError, zipfile.BadZipFile) as exc:  # no network, DNS failure, timeout, truncated zip
            log.info("GroupLens download failed (%s); falling back", exc)
            tried.append(f"{url} ({type(exc).__name__}: {exc})")

    if name == "ml100k":
        try:
            _pip_download_wheel(cache)
            return _read_wheel(wheel)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            tried.append(f"pip download {RECBOLE_WHEEL} ({exc})")
    raise DataError(
        name,
        "could not load the dataset; tried: "
        + "; ".join(tried)
        + f". Put the extracted '{folder}' folder into {cache}",
    )


def _download_zip(url: str, cache: Path, timeout_s: float) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        payload = response.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        archive.extractall(cache)


def _pip_download_wheel(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    log.warning("fetching MovieLens-100k from the %s wheel via pip download (one time)", RECBOLE_WHEEL)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
         RECBOLE_WHEEL, "-d", str(cache)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise OSError(f"pip download exited {result.returncode}: {result.stderr.strip()[-2000:]}")


def _read_wheel(wheel: Path) -> MovieLens:
    with zipfile.ZipFile(wheel) as archive:
        return read_recbole_100k(lambda suffix: archive.read(f"{RECBOLE_ML100K}.{suffix}"), source=str(wheel))
