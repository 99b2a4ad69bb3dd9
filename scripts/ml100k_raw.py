"""Write MovieLens-100k as a raw interaction table with string columns: the input of docs/data.md's walkthrough.

The rows are the ml100k-mt samples (docs/protocol.md: per-user time split, one negative per positive, grouped with
it), but the columns hold what a raw export would: the user's gender, occupation and zip code as text, the release
year as text (missing for a few movies), genres as a list of names, the history as a list of raw item ids. Nothing
is coded to integers here; ``supermoe-rec schema infer`` proposes the vocabularies.

    python scripts/ml100k_raw.py --out data/byo          # writes train.parquet, valid.parquet, test.parquet

Add ``--csv`` to write CSV files too (lists as pandas writes them, e.g. ``['Comedy' 'Romance']``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.movielens import fetch_movielens
from supermoe_rec.data.protocol import build_ml_mt


def raw_tables(cache_dir: str | None = None) -> dict[str, pd.DataFrame]:
    """Per split, the ml100k-mt samples with raw (uncoded) columns."""
    cfg = DataConfig() if cache_dir is None else DataConfig(cache_dir=cache_dir)
    ml = fetch_movielens("ml100k", cfg.cache_dir, cfg.try_url, cfg.url_timeout_s)
    out = build_ml_mt(ml, cfg)
    users = ml.users.set_index("user_id")
    items = ml.items.set_index("item_id")
    item_ids = np.sort(ml.items["item_id"].to_numpy())  # protocol item codes are 1 + the rank of the raw id
    tables = {}
    for split, frame in out.frames.items():
        user = users.loc[frame["user_id"]]
        item = items.loc[frame["item_id"]]
        year = item["year"].to_numpy()
        tables[split] = pd.DataFrame(
            {
                "user_id": frame["user_id"].to_numpy(),
                "request_id": frame["group_id"].to_numpy(),
                "timestamp": frame["timestamp"].to_numpy(),
                "item_id": frame["item_id"].to_numpy(),
                "title": item["title"].to_numpy(),
                "release_year": [None if np.isnan(y) else str(int(y)) for y in year],
                "genres": [list(g) for g in item["genres"]],
                "gender": user["gender"].to_numpy(),
                "age": user["age"].to_numpy(),
                "occupation": user["occupation"].to_numpy(),
                "zip_code": user["zip_code"].to_numpy(),
                "history": [item_ids[h - 1].tolist() for h in frame["history"]],
                "watch": frame["watch"].to_numpy(),
                "like": frame["like"].to_numpy(),
                "rating": frame["rating"].to_numpy(),
            }
        )
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/byo", help="output directory (default: data/byo)")
    parser.add_argument("--csv", action="store_true", help="also write train.csv, valid.csv, test.csv")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, frame in raw_tables().items():
        frame.to_parquet(out / f"{split}.parquet", index=False)
        if args.csv:
            frame.to_csv(out / f"{split}.csv", index=False)
        print(f"{out / f'{split}.parquet'}: {len(frame)} rows, columns {list(frame.columns)}")


if __name__ == "__main__":
    main()
