"""Top-k retrieval by inner product: exact ``torch.topk`` vs faiss IVF (``IndexIVFFlat``), queries/s and recall@k.

Items and queries are synthetic N(0, 1) vectors of width ``--dim`` (64, the default ``model.encoder.d_model``), at
each ``--items`` size (10^4 and 10^6 by default). Per size:

- ``exact``: :func:`supermoe_rec.serving.index.topk_exact` (blocks of 1,024 queries, one matmul + topk each);
- ``faiss`` at each ``--nprobe``: :class:`supermoe_rec.serving.index.FaissIndex` (nlist = sqrt(N), k-means on
  at most 64 items per list); its build time is reported apart from search;
- recall@k of faiss against exact: the share of exact top-k items faiss returns, mean over queries.

``--artifact DIR --vectors vectors.parquet`` adds the real case: the artifact's items (``UserEncoder.item_vectors``)
queried with real [USER] vectors from ``supermoe-rec embed``.

    python benchmarks/retrieval.py --out runs/bench_retrieval.json
    python benchmarks/retrieval.py --items 1e4 --queries 64 --quick --out /tmp/r.json   # smoke
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import load_average, wait_for_quiet

from supermoe_rec.serving.index import FaissIndex, read_vectors, topk_exact


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx ∩ exact| / |exact| (rows of item ids; -1 = no item)."""
    hits = [
        len(set(a[a >= 0]) & set(e[e >= 0])) / max(1, int((e >= 0).sum())) for a, e in zip(approx, exact, strict=True)
    ]
    return float(np.mean(hits))


def _best(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def bench_case(
    name: str, items: np.ndarray, queries: np.ndarray, k: int, nprobes: list[int], repeats: int
) -> dict[str, Any]:
    items_t, queries_t = torch.from_numpy(items), torch.from_numpy(queries)
    seconds, (_, exact) = _best(lambda: topk_exact(queries_t, items_t, k), repeats)
    exact = exact.numpy()
    row: dict[str, Any] = {
        "case": name,
        "items": int(items.shape[0]),
        "dim": int(items.shape[1]),
        "queries": int(queries.shape[0]),
        "k": k,
        "exact_qps": queries.shape[0] / seconds,
        "exact_s": seconds,
        "faiss": [],
    }
    start = time.perf_counter()
    index = FaissIndex.build(items)
    row["faiss_build_s"] = time.perf_counter() - start
    row["faiss_nlist"] = index.nlist
    for nprobe in nprobes:
        index.index.nprobe = min(nprobe, index.nlist)
        seconds, (_, approx) = _best(lambda: index.search(queries, k), repeats)
        row["faiss"].append(
            {
                "nprobe": int(index.index.nprobe),
                "qps": queries.shape[0] / seconds,
                "seconds": seconds,
                f"recall@{k}": recall_at_k(approx, exact),
            }
        )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=float, nargs="*", default=[1e4, 1e6], help="catalog sizes (default 1e4 1e6)")
    parser.add_argument("--dim", type=int, default=64, help="vector width M (default 64)")
    parser.add_argument("--queries", type=int, default=1024, help="queries per measurement (default 1024)")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128], help="faiss lists probed")
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept (default 3)")
    parser.add_argument("--artifact", default=None, help="also the artifact's items ...")
    parser.add_argument("--vectors", default=None, help="... queried with these [USER] vectors (from embed)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--quick", action="store_true", help="smoke: 1 repeat, no waiting for a quiet machine")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    load, waited = (os.getloadavg()[0], 0.0) if args.quick else wait_for_quiet(args.max_load, 600)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.items:
        N = int(n)
        items = rng.standard_normal((N, args.dim), dtype=np.float32)
        queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
        rows.append(bench_case(f"synthetic {N:.0e}", items, queries, args.k, args.nprobe, repeats))
        print(json.dumps(rows[-1]), flush=True)
    if args.artifact and args.vectors:
        from supermoe_rec.serving import UserEncoder

        enc = UserEncoder.load(args.artifact)
        items = enc.item_vectors()[enc.known_items()].numpy()
        _, users = read_vectors(args.vectors)
        queries = enc.queries(users).numpy()
        rows.append(bench_case(f"artifact ({Path(args.artifact).name})", items, queries, args.k, args.nprobe, repeats))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "retrieval",
        "threads": args.threads,
        "load_average_1m": load,
        "load_average_1m_after": load_average(),
        "waited_s": waited,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "faiss": faiss.__version__,
        },
        "rows": rows,
    }
    print(f"\n| case | items | exact q/s | faiss build s | nprobe | faiss q/s | recall@{args.k} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for f in r["faiss"]:
            print(
                f"| {r['case']} | {r['items']:,} | {r['exact_qps']:,.0f} | {r['faiss_build_s']:.1f} | {f['nprobe']} | "
                f"{f['qps']:,.0f} | {f[f'recall@{args.k}']:.3f} |"
            )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
