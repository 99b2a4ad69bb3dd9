"""Where is a behaviour-only run's user signal lost? Linear probes on the encoder's input as well as its output.

    .venv/bin/python scripts/probe_inputs.py --run runs/ml100k-supermoe-behaviour

`supermoe-rec probe` scores the [USER] and task representations (the encoder's outputs). This script also scores
the mean of the history vectors given to the encoder (the run's trained item embeddings over each user's last
``max_history`` items), with the same users, split, folds and logistic regression, and prints the probe table with
a ``history_mean`` row per attribute. If the pooled input recovers an attribute and the outputs do not, the encoder
discards it; if neither does, the trained item embeddings never held it. ``--balanced`` is the same option as
``supermoe-rec probe --balanced``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import supermoe_rec.evaluation.probe as probe
from supermoe_rec.data.splits import load_data
from supermoe_rec.evaluation.export import latest_rows, load_run_config, restore_model, user_representations
from supermoe_rec.modules.causal import CausalMoEEncoder
from supermoe_rec.modules.transformer import MoETransformerEncoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--balanced", action="store_true")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    run = Path(args.run)
    cfg = load_run_config(run)
    attributes = probe.user_attributes(cfg.data)
    data = load_data(cfg.data)
    probe.check_behaviour_only(data.schema)
    trainer, _ = restore_model(run, cfg, data)
    encoders = [m for m in trainer.dmp.modules() if isinstance(m, MoETransformerEncoder | CausalMoEEncoder)]
    if len(encoders) != 1:
        raise SystemExit(f"{run}: expected one transformer encoder in model.arch, found {len(encoders)}")
    pooled: list[np.ndarray] = []

    def keep_mean_history(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
        history, lengths = inputs[0], inputs[1]  # (G, L, D), (G,): left-aligned
        valid = torch.arange(history.shape[1]) < lengths.unsqueeze(1)  # (G, L)
        total = (history * valid.unsqueeze(2)).sum(dim=1)
        pooled.append((total / lengths.clamp(min=1).unsqueeze(1)).float().numpy())

    hook = encoders[0].register_forward_hook(keep_mean_history)
    try:
        reps = user_representations(trainer)
    finally:
        hook.remove()
    # user_representations returns users sorted by key; the hook saw them in its (valid, then train) order.
    seen = np.concatenate([keys for keys, _ in latest_rows(data).values()])
    order = np.argsort(seen, kind="stable")
    if not np.array_equal(seen[order], reps.user_keys):
        raise RuntimeError("the encoder saw other users than user_representations returned")
    history_mean = np.concatenate(pooled)[order]

    bag = probe.item_bags(data, reps.user_keys)
    result = probe.probe_representations(
        reps, attributes, bag, args.test_fraction, args.seed, args.balanced, extra={"history_mean": history_mean}
    )
    header = "balanced class weights, C chosen by balanced accuracy\n" if args.balanced else ""
    print(header + probe.probe_table({"attributes": result}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
