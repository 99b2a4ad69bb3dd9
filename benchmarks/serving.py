"""Latency of the exported user encoder on CPU: p50/p99 for 1 user and a batch of users, 1 and 2 threads.

Loads an artifact (``supermoe-rec export --run R --artifact DIR``) with :class:`supermoe_rec.serving.UserEncoder`
(no TorchRec) and times, per thread count and batch size:

- ``encode``: ``UserEncoder.encode(frame)`` from a pandas frame of user rows (raw ids mapped, tables looked up,
  encoder + towers, numpy out): what a service calls;
- ``forward``: ``UserEncoder.forward_mapped`` on already-mapped ids (the model alone).

Users are synthetic: profile ids drawn uniformly from each table's rows, a history of ``--history`` items drawn from
the candidate table (default: the artifact's ``max_history``, the longest it encodes). Latency depends on the
architecture, not on how well the weights are trained. Also reports the artifact's size on disk, per file.

    python benchmarks/serving.py --artifact artifacts/ml100k --out runs/bench_serving.json
    python benchmarks/serving.py --artifact DIR --quick --out /tmp/s.json   # smoke: few repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import load_average, wait_for_quiet

from supermoe_rec.data.schema import FeatureSide
from supermoe_rec.serving import UserEncoder, artifact_bytes, read_manifest


def synthetic_users(enc: UserEncoder, n: int, history: int, seed: int = 0) -> pd.DataFrame:
    """``n`` user rows in the schema's columns (per-user form: history lists of raw ids)."""
    rng = np.random.default_rng(seed)
    s = enc.schema
    frame: dict[str, Any] = {s.user_column: np.arange(n)}
    for f in s.sparse_features:
        if f.side is FeatureSide.USER:
            rows = s.table(f.table).num_embeddings
            frame[f.column] = (
                [list(rng.integers(1, rows, size=2)) for _ in range(n)]
                if f.multi_valued
                else (rng.integers(1, rows, size=n))
            )
    for f in enc.history_features:
        rows = s.table(f.table).num_embeddings
        frame[f.column] = [list(rng.integers(1, rows, size=history)) for _ in range(n)]
    for d in s.dense_features:
        frame[d.column] = rng.standard_normal(n)
    return pd.DataFrame(frame)


def percentiles(fn: Any, repeats: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    ms = np.asarray(times) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", required=True, help="artifact directory from export --artifact")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 1024], help="users per call (default 1 1024)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default 1 2)")
    parser.add_argument("--history", type=int, default=None, help="history length (default: max_history)")
    parser.add_argument(
        "--repeats",
        type=int,
        nargs=2,
        default=[300, 30],
        metavar=("SINGLE", "BATCH"),
        help="timed calls for batch size 1 and for larger batches (default 300 30)",
    )
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--quick", action="store_true", help="smoke: 5 calls each, no waiting for a quiet machine")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    enc = UserEncoder.load(args.artifact)
    manifest = read_manifest(args.artifact)
    history = args.history or enc.max_history
    load, waited = (os.getloadavg()[0], 0.0) if args.quick else wait_for_quiet(args.max_load, 600)
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            frame = synthetic_users(enc, batch, history)
            repeats = 5 if args.quick else (args.repeats[0] if batch == 1 else args.repeats[1])
            counts = enc.encode(frame.iloc[:1])  # an Encoded to collect id counts into
            mapped = enc.map_users(enc.user_rows(frame), counts)
            with torch.inference_mode():
                end_to_end = percentiles(lambda f=frame: enc.encode(f, batch_size=max(args.batches)), repeats)
                model = percentiles(lambda m=mapped: enc.forward_mapped(m, None), repeats)
            row = {"threads": threads, "users": batch, "history": history, "encode": end_to_end, "forward": model}
            row["encode_users_per_s"] = batch / (end_to_end["p50_ms"] / 1e3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    files = {name: int(entry["bytes"]) for name, entry in manifest["files"].items()}
    result = {
        "benchmark": "serving",
        "artifact": str(args.artifact),
        "artifact_bytes": artifact_bytes(args.artifact),
        "artifact_files": files,
        "model": {
            "d_model": enc.dim,
            "layers": len(enc.over_arch.encoder.blocks),
            "parameters_table_free": sum(p.numel() for p in enc.over_arch.parameters()),
            "parameters_tables": sum(t.numel() for t in enc.tables.values()),
        },
        "load_average_1m": load,
        "load_average_1m_after": load_average(),
        "waited_s": waited,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    print(f"\nartifact: {result['artifact_bytes'] / 2**20:.2f} MiB {files}")
    print("| threads | users | encode p50 ms | encode p99 ms | forward p50 ms | forward p99 ms | users/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e, f = r["encode"], r["forward"]
        print(
            f"| {r['threads']} | {r['users']} | {e['p50_ms']:.2f} | {e['p99_ms']:.2f} | {f['p50_ms']:.2f} | "
            f"{f['p99_ms']:.2f} | {r['encode_users_per_s']:,.0f} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
