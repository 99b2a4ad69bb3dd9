"""Shared fixtures: the real MovieLens-100k (fetched once into the user cache) and its ml100k-mt protocol."""

from __future__ import annotations

import pytest

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.movielens import MovieLens, fetch_movielens
from supermoe_rec.data.protocol import ProtocolOutput, build_ml_mt
from supermoe_rec.data.splits import SplitData, from_movielens


@pytest.fixture(scope="session")
def ml100k() -> MovieLens:
    cfg = DataConfig()
    return fetch_movielens("ml100k", cfg.cache_dir, try_url=cfg.try_url, url_timeout_s=cfg.url_timeout_s)


@pytest.fixture(scope="session")
def ml100k_protocol(ml100k: MovieLens) -> ProtocolOutput:
    return build_ml_mt(ml100k, DataConfig())


@pytest.fixture(scope="session")
def ml100k_data(ml100k: MovieLens) -> SplitData:
    return from_movielens(ml100k, DataConfig())
