"""What the next-items objective adds to a training step, on the real training path.

Each case is built by :func:`supermoe_rec.training.trainer.build_trainer` (model on meta, planner,
DistributedModelParallel,
fused sparse optimizer + dense Adam) and stepped by ``TrainPipelineSparseDist.progress`` over batches assembled
before timing, one process. Pairs of cases differ only in the objective:

- ``ml100k``: real ml100k-mt batches; ``supervised`` against ``joint`` with the full softmax over the 1,682 items.
- ``synthetic``: an item table of ``--items`` rows (default 10^6, random histories of 50 and random future
  items); ``supervised`` against ``joint`` with the sampled softmax (``--num-sampled`` uniform draws plus in-batch
  negatives, logQ corrected).

Windows of ``--steps`` steps of every case are interleaved over ``--repeats`` rounds, and each case keeps its best
window: on a shared machine contention only ever adds time. The last line is machine-readable::

    python benchmarks/next_items_cost.py                 # ~10 min on 2 cores
    python benchmarks/next_items_cost.py --quick         # smoke: seconds
    ... full_over_supervised_ml100k=<x> sampled_over_supervised_1e6=<y>
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from supermoe_rec.config.experiment import ExperimentConfig, apply_overrides
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.dataset import TabularDataset
from supermoe_rec.data.schema import Schema
from supermoe_rec.data.splits import SplitData, load_data
from supermoe_rec.distributed.process_group import init_distributed
from supermoe_rec.training.trainer import build_trainer


def synthetic_data(items: int, groups: int, history: int, seed: int = 0) -> SplitData:
    """``groups`` (user, time) groups of a positive and a negative row over an item table of ``items`` rows."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list[Any]] = {"u": [], "g": [], "h": [], "i": [], "n": [], "y": []}
    for g in range(groups):
        hist = rng.integers(1, items, size=history)
        nxt = int(rng.integers(1, items))
        for label, item in ((1.0, nxt), (0.0, int(rng.integers(1, items)))):
            rows["u"].append(g)
            rows["g"].append(g)
            rows["h"].append(hist)
            rows["i"].append(item)
            rows["n"].append(np.array([nxt]))
            rows["y"].append(label)
    schema = Schema.from_dict(
        {
            "user_column": "u",
            "group_column": "g",
            "tables": [{"name": "item", "num_embeddings": items}],
            "sequence_features": [
                {"name": "history", "column": "h", "table": "item", "multi_valued": True, "per_group": True},
                {"name": "target_item", "column": "i", "table": "item"},
                {"name": "next_items", "column": "n", "table": "item", "multi_valued": True, "per_group": True},
            ],
            "next_items": "next_items",
            "tasks": [{"name": "click", "type": "binary", "label": "y"}],
        },
        source="synthetic",
    )
    ds = TabularDataset(pd.DataFrame(rows), schema, "synthetic")
    return SplitData(schema=schema, splits={"train": ds}, info={"dataset": "synthetic"})


class Case:
    """One trainer and its pre-assembled batches."""

    def __init__(self, name: str, cfg: ExperimentConfig, data: SplitData, batches: int) -> None:
        self.name = name
        self.trainer = build_trainer(cfg, init_distributed("cpu"), data)
        loader = self.trainer.loaders["train"]
        self.batches: list[Batch] = [b for _, b in zip(range(batches), loader, strict=False)]
        self.pipeline = TrainPipelineSparseDist(self.trainer.dmp, self.trainer.optimizer, torch.device("cpu"))
        # One endless iterator: the pipeline reads batches ahead, so a window must not start a new one.
        self.iterator = itertools.cycle(self.batches)
        self.pipeline.progress(self.iterator)  # fill the pipeline outside every window
        self.best_ms = float("inf")

    def window(self, steps: int) -> float:
        """ms per step over ``steps`` steps (cycling the batches)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.pipeline.progress(self.iterator)
        ms = (time.perf_counter() - start) * 1000 / steps
        self.best_ms = min(self.best_ms, ms)
        return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--num-sampled", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.items, args.num_sampled, args.batch_size, args.steps, args.repeats = 5_000, 64, 64, 2, 1
    torch.set_num_threads(args.threads)
    base = ["--train.tensorboard=false", f"--train.batch_size={args.batch_size}", "--train.epochs=1"]
    if args.quick:
        base += ["--model.encoder.num_layers=1", "--model.moe.moe_every=1"]

    def cfg(*extra: str) -> ExperimentConfig:
        return apply_overrides(ExperimentConfig(), [*base, *extra])

    builders: list[tuple[str, Callable[[], Case]]] = []
    ml_super = cfg()
    ml_joint = cfg("--data.next_window=1", "--train.objective=joint", "--train.next_items.softmax=full")
    builders.append(("ml100k/supervised", lambda: Case("ml100k/supervised", ml_super, load_data(ml_super.data), 4)))
    builders.append(("ml100k/joint_full", lambda: Case("ml100k/joint_full", ml_joint, load_data(ml_joint.data), 4)))
    groups = 4 * args.batch_size // 2
    synth = synthetic_data(args.items, groups, 50)
    # The synthetic schema always carries future items: "supervised" keeps them but trains the towers alone.
    syn_super = cfg("--data.next_window=1", "--train.objective=supervised", "--train.next_items.softmax=sampled",
                    f"--train.next_items.num_sampled={args.num_sampled}")  # fmt: skip
    syn_joint = cfg("--data.next_window=1", "--train.objective=joint", "--train.next_items.softmax=sampled",
                    f"--train.next_items.num_sampled={args.num_sampled}")  # fmt: skip
    builders.append(("synthetic/supervised", lambda: Case("synthetic/supervised", syn_super, synth, 4)))
    builders.append(("synthetic/joint_sampled", lambda: Case("synthetic/joint_sampled", syn_joint, synth, 4)))
    cases = [build() for _, build in builders]
    for _ in range(args.repeats):
        for case in cases:
            case.window(args.steps)
    by_name = {c.name: c.best_ms for c in cases}
    result = {
        "ms_per_step": by_name,
        "items_synthetic": args.items,
        "num_sampled": args.num_sampled,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "load_average_1m": os.getloadavg()[0],
        "full_over_supervised_ml100k": by_name["ml100k/joint_full"] / by_name["ml100k/supervised"],
        "sampled_over_supervised_synthetic": by_name["synthetic/joint_sampled"] / by_name["synthetic/supervised"],
    }
    for name, ms in by_name.items():
        print(f"{name:28s} {ms:8.1f} ms/step")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(
        f"full_over_supervised_ml100k={result['full_over_supervised_ml100k']:.3f} "
        f"sampled_over_supervised_{args.items:.0e}={result['sampled_over_supervised_synthetic']:.3f}"
    )


if __name__ == "__main__":
    main()
