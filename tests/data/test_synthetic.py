"""The synthetic stream: deterministic, Zipf-shaped, variable histories, planted task correlation, masks."""

from __future__ import annotations

import numpy as np
import torch

from supermoe_rec.config.experiment import DataConfig
from supermoe_rec.data.synthetic import SyntheticStream, synthetic_schema, zipf_ids


def cfg(**kw: object) -> DataConfig:
    base: dict[str, object] = {"source": "synthetic", "synthetic_samples": 4096, "synthetic_items": 10**8}
    base.update(kw)
    return DataConfig(**base)  # type: ignore[arg-type]


def test_zipf_over_1e8_rows() -> None:
    ids = zipf_ids(np.random.default_rng(0), 10**8, 200_000, 1.1)
    assert ids.min() >= 0 and ids.max() < 10**8
    counts = np.bincount(ids[ids < 1000], minlength=1000)
    assert counts[0] > counts[9] > counts[99] > 0  # frequency falls with rank
    # P(0)/P(9) ≈ 10^1.1 for exponent 1.1 (continuous approximation, generous band)
    assert 6 < counts[0] / counts[9] < 20
    assert len(np.unique(ids)) > 20_000  # the long tail is reached


def test_deterministic_and_world_size_independent() -> None:
    one = [b.sequence_features.values().tolist() for b in SyntheticStream(cfg(), batch_size=256)]
    again = [b.sequence_features.values().tolist() for b in SyntheticStream(cfg(), batch_size=256)]
    assert one == again
    r0 = list(SyntheticStream(cfg(), batch_size=256, rank=0, world_size=2))
    r1 = list(SyntheticStream(cfg(), batch_size=256, rank=1, world_size=2))
    interleaved = [b.sequence_features.values().tolist() for pair in zip(r0, r1, strict=True) for b in pair]
    assert interleaved == one
    other_seed = [b.sequence_features.values().tolist() for b in SyntheticStream(cfg(seed=1), batch_size=256)]
    assert other_seed != one


def test_batches_follow_schema_and_histories_vary() -> None:
    c = cfg(max_history=20)
    schema = synthetic_schema(c)
    batch = next(iter(SyntheticStream(c, batch_size=512)))
    assert batch.sparse_features.keys() == [f.name for f in schema.sparse_features]
    assert batch.sequence_features.keys() == [f.name for f in schema.sequence_features]
    lengths = batch.sequence_features["history"].lengths()
    leaders = lengths[0::2]
    assert int(lengths[1::2].sum()) == 0  # history rides on the first row of each group
    assert int(leaders.min()) == 0 and int(leaders.max()) == 20 and len(torch.unique(leaders)) > 10
    assert batch.group_index.tolist()[:4] == [0, 0, 1, 1]


def test_label_rates_and_planted_correlation() -> None:
    def stats(rho: float) -> tuple[np.ndarray, float]:
        c = cfg(synthetic_task_correlation=rho, synthetic_label_rates=(1.0, 0.5, 0.2), synthetic_samples=40_000)
        batches = list(SyntheticStream(c, batch_size=4096))
        labels = torch.cat([b.labels for b in batches]).numpy()
        mask = torch.cat([b.task_mask for b in batches]).numpy()
        both = (mask[:, 0] == 1) & (mask[:, 1] == 1)
        return mask.mean(0), float(np.corrcoef(labels[both, 0], labels[both, 1])[0, 1])

    rates, corr_high = stats(0.9)
    assert np.allclose(rates, [1.0, 0.5, 0.2], atol=0.02)
    _, corr_low = stats(0.0)
    assert corr_high > corr_low + 0.2
