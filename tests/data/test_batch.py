"""Batch is Pipelineable: it moves across devices whole, and works with TorchRec's pipeline copy helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from supermoe_rec.data.batch import Batch
from supermoe_rec.data.splits import SplitData


def _same(a: Batch, b: Batch) -> None:
    for name in ("dense_features", "labels", "task_mask", "group_index", "user_index"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("sparse_features", "sequence_features"):
        ka, kb = getattr(a, name), getattr(b, name)
        assert ka.keys() == kb.keys()
        assert torch.equal(ka.values(), kb.values()) and torch.equal(ka.lengths(), kb.lengths())


def test_to_keeps_every_field(ml100k_data: SplitData) -> None:
    batch = ml100k_data.splits["valid"].batch_of_groups(np.arange(64))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, Batch)
    _same(batch, moved)
    assert batch.batch_size == 128 and batch.num_groups == 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory and streams need a GPU")
def test_pin_memory_and_record_stream_on_gpu(ml100k_data: SplitData) -> None:
    batch = ml100k_data.splits["valid"].batch_of_groups(np.arange(8)).pin_memory()
    assert batch.labels.is_pinned()
    on_gpu = batch.to(torch.device("cuda"), non_blocking=True)
    on_gpu.record_stream(torch.cuda.current_stream())
    _same(batch, on_gpu.to(torch.device("cpu")))
