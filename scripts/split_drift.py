"""How much harder is ml100k-mt's test split than its valid split, before any model is trained?

    .venv/bin/python scripts/split_drift.py [--config configs/ml100k.yaml]

Prints, per split: the watch AUC of item popularity (positives of the item in train; no model), and how far the
samples lie after their user's last train interaction. The protocol splits each user's timeline by position, so
test holds the latest interactions; users who come back after a break land there with a stale history.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.metrics import roc_auc_score  # type: ignore[import-untyped]

from supermoe_rec.config.experiment import load_config
from supermoe_rec.data.movielens import fetch_movielens
from supermoe_rec.data.protocol import build_ml_mt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ml100k.yaml")
    cfg = load_config(parser.parse_args().config).data
    frames = build_ml_mt(fetch_movielens(cfg.source, cfg.cache_dir, cfg.try_url, cfg.url_timeout_s), cfg).frames
    train = frames["train"]
    popularity = train[train.watch == 1].groupby("item").size()
    last_train = train.groupby("user_id").timestamp.max()
    print("| split | popularity watch AUC | samples > 30 days after the user's last train sample |")
    print("|---|---|---|")
    for name in ("valid", "test"):
        frame = frames[name]
        score = frame["item"].map(popularity).fillna(0).to_numpy()
        days = (frame.timestamp - frame.user_id.map(last_train)).to_numpy() / 86400
        print(f"| {name} | {roc_auc_score(frame.watch, score):.4f} | {np.mean(days > 30):.3f} |")


if __name__ == "__main__":
    main()
