"""Peak memory and step time of one embedding table vs its row count: fused TorchRec tables vs plain PyTorch.

Implementations (one table of R rows x D, fp32):

- ``fused``: a TorchRec ``EmbeddingBagCollection`` sharded by ``DistributedModelParallel`` in a gloo world of one
  (table_wise), with ``RowWiseAdagrad`` fused into the backward (``apply_optimizer_in_backward``): the fbgemm TBE
  updates the looked-up rows in place, no gradient tensor, one optimizer float per row.
- ``plain``: ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.Adagrad`` (a sparse gradient, then a dense
  per-element ``sum`` state the size of the table).

A step is forward + backward + optimizer update of ``--batch`` bags of ``--pooling`` ids drawn uniformly over the
table (sum pooling). Every point runs in a fresh subprocess, and its peak resident memory is ``VmHWM`` from
``/proc/self/status`` read at the end of that process (``baseline``: VmHWM after imports, before the table).
Step time is the best of ``--repeats`` steps after warm-up. Points whose estimated peak would not fit in
``MemAvailable`` (minus ``--margin-gb``) are not started, and the arithmetic is reported instead.

``--largest`` grows the fused table (x1.5 per try, from 2e7 rows) until the estimate no longer fits: the largest
table that trains here. ``--billion`` trains a ~1e9-parameter supermoe (synthetic data, item table 12M x 64,
user table 3M x 64, 2 MoE layers of 64 experts) through the real trainer (``build_trainer`` +
``TrainPipelineSparseDist``) for a few steps and reports its samples/s and peak memory.

    python benchmarks/embedding_memory.py --out runs/bench_embedding_memory.json
    python benchmarks/embedding_memory.py --rows 1e5 1e6 1e7 --largest --billion --out runs/m.json
    python benchmarks/embedding_memory.py --quick --out /tmp/m.json  # smoke: 1e4 rows, both impls
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import load_average, wait_for_quiet

GIB = 1024**3
FP32 = 4
# Python + torch + torchrec after import, and allocator slack: measured baselines here are ~0.4-0.6 GiB.
OVERHEAD_BYTES = 1 * GIB


def meminfo_bytes(field: str = "MemAvailable") -> int:
    """A /proc/meminfo field in bytes (``MemAvailable``: what can be allocated without swapping or OOM)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def status_bytes(field: str) -> int:
    """A /proc/self/status field (``VmHWM`` peak resident, ``VmRSS`` current resident) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def estimate_bytes(impl: str, rows: int, dim: int) -> int:
    """Peak estimate: weights, plus the optimizer state (fused row-wise: one float per row; plain Adagrad: one per
    element), plus the process overhead. Lookup buffers are a few MB at the default batch."""
    weights = rows * dim * FP32
    state = rows * FP32 if impl == "fused" else rows * dim * FP32
    return weights + state + OVERHEAD_BYTES


def billion_estimate_bytes(params_embedding: int, params_dense: int) -> int:
    """Tables (fused: weights + one float per row, ~weights) + dense params with grads and Adam's two moments."""
    return params_embedding * FP32 + params_dense * FP32 * 4 + 2 * OVERHEAD_BYTES


# ---------------------------------------------------------------------------------------------- worker side


def _init_world_of_one() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)


def _best_step_ms(step: Any, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def table_point(impl: str, rows: int, dim: int, batch: int, pooling: int, warmup: int, repeats: int) -> dict[str, Any]:
    """Build one table of ``rows`` x ``dim``, time its training step, and report peak memory (in this process)."""
    import torch
    from torch import nn

    baseline = status_bytes("VmHWM")
    torch.manual_seed(0)
    ids = [torch.randint(0, rows, (batch * pooling,)) for _ in range(4)]
    offsets = torch.arange(batch + 1) * pooling
    start = time.perf_counter()
    if impl == "plain":
        bag = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
        opt = torch.optim.Adagrad(bag.parameters(), lr=0.05)
        i = 0

        def step() -> None:
            nonlocal i
            opt.zero_grad(set_to_none=True)
            bag(ids[i % 4], offsets[:-1]).sum().backward()
            opt.step()
            i += 1

    else:
        import torchrec.optim as trec_optim
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        _init_world_of_one()
        ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])],
            device=torch.device("meta"),
        )
        apply_optimizer_in_backward(trec_optim.RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
        sharder = EmbeddingBagCollectionSharder()
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=1, compute_device="cpu"),
            constraints={"t": ParameterConstraints(sharding_types=["table_wise"])},
        )
        plan = planner.plan(ebc, [sharder])  # type: ignore[list-item]
        model = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan, sharders=[sharder])  # type: ignore[list-item]
        lengths = torch.full((batch,), pooling, dtype=torch.int32)
        kjts = [KeyedJaggedTensor(keys=["f"], values=v, lengths=lengths) for v in ids]
        i = 0

        def step() -> None:
            nonlocal i
            model(kjts[i % 4]).values().sum().backward()  # the fused optimizer updates rows inside backward
            i += 1

    build_s = time.perf_counter() - start
    step_ms = _best_step_ms(step, warmup, repeats)
    return {
        "impl": impl,
        "rows": rows,
        "dim": dim,
        "params": rows * dim,
        "batch": batch,
        "pooling": pooling,
        "build_s": build_s,
        "step_ms": step_ms,
        "lookups_per_s": batch * pooling / step_ms * 1e3,
        "baseline_bytes": baseline,
        "peak_bytes": status_bytes("VmHWM"),
        "weights_bytes": rows * dim * FP32,
    }


def billion_point(
    items: int, users: int, dim: int, experts: int, steps: int, batch: int, threads: int
) -> dict[str, Any]:
    """Train the ~1e9-parameter supermoe for ``steps`` steps with the real trainer; samples/s and peak memory."""
    import torch
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
    from train_throughput import synthetic_split_data

    from supermoe_rec.config.experiment import ExperimentConfig, apply_overrides
    from supermoe_rec.data.synthetic import SyntheticStream
    from supermoe_rec.distributed.process_group import DistContext
    from supermoe_rec.training.trainer import build_trainer

    torch.set_num_threads(threads)
    baseline = status_bytes("VmHWM")
    cfg = apply_overrides(ExperimentConfig(), billion_overrides(items, users, dim, experts, batch))
    _init_world_of_one()
    start = time.perf_counter()
    data = synthetic_split_data(cfg.data)
    trainer = build_trainer(cfg, DistContext(0, 1, 0, torch.device("cpu")), data)
    pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, torch.device("cpu"))
    build_s = time.perf_counter() - start
    stream = SyntheticStream(cfg.data, batch)
    batches = [stream.make_batch(b) for b in range(steps + 2)]
    it = iter(batches)
    times, rows, losses = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = pipeline.progress(it)
        times.append(time.perf_counter() - t0)
        rows.append(int(out.labels.shape[0]))
        losses.append(float(out.loss.total))
    timed = times[2:] or times  # the first steps pay one-off costs (first touch of optimizer state, pages)
    best = min(timed)
    return {
        "params": trainer.params,
        "build_s": build_s,
        "steps": steps,
        "step_s": times,
        "losses": losses,
        "finite_losses": all(math.isfinite(x) for x in losses),
        "samples_per_s_best": rows[0] / best,
        "samples_per_s_mean": sum(rows[2:] or rows) / sum(timed),
        "samples_per_s_median": rows[0] / sorted(timed)[len(timed) // 2],
        "baseline_bytes": baseline,
        "peak_bytes": status_bytes("VmHWM"),
        "threads": threads,
    }


def billion_overrides(items: int, users: int, dim: int, experts: int, batch: int) -> list[str]:
    """The ~1e9-parameter supermoe: tables (items + users) x dim, two MoE layers (d_model 128, hidden 1024)."""
    return [
        "--data.source=synthetic",
        f"--data.synthetic_items={items}",
        f"--data.synthetic_users={users}",
        f"--model.embedding_dim={dim}",
        "--model.encoder.d_model=128",
        "--model.encoder.num_layers=2",
        "--model.encoder.num_heads=4",
        "--model.encoder.ffn_hidden=512",
        "--model.towers.hidden=[128, 64]",
        f"--model.moe.num_experts={experts}",
        "--model.moe.top_k=2",
        "--model.moe.expert_hidden=1024",
        "--model.moe.moe_every=1",
        "--model.sequence_lookup=bags_of_one",
        f"--train.batch_size={batch}",
        "--train.tensorboard=false",
        "--train.device=cpu",
    ]


def billion_param_count(items: int, users: int, dim: int, experts: int, batch: int) -> dict[str, Any]:
    """Parameter counts of the billion model, built on meta (no memory), for the fit check."""
    import torch

    from supermoe_rec.config.experiment import ExperimentConfig, apply_overrides
    from supermoe_rec.data.synthetic import synthetic_schema
    from supermoe_rec.models.factory import build_model, parameter_report

    cfg = apply_overrides(ExperimentConfig(), billion_overrides(items, users, dim, experts, batch))
    model = build_model(cfg.model, synthetic_schema(cfg.data), device=torch.device("meta"))
    return parameter_report(model, cfg.model)


# ---------------------------------------------------------------------------------------------- parent side


def run_point(args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run one point in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", os.devnull, *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (likely out of memory)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
        return {"error": why, "stderr_tail": proc.stderr[-1500:]}
    result: dict[str, Any] = json.loads(lines[-1])
    result["process_wall_s"] = wall
    return result


def fits(estimate: int, margin: int) -> tuple[bool, int]:
    available = meminfo_bytes("MemAvailable")
    return estimate + margin <= available, available


def _gib(x: float) -> str:
    return f"{x / GIB:6.2f}"


def table_row_text(r: dict[str, Any]) -> str:
    head = f"{r['impl']:6s} rows={r['rows']:>12,d} D={r['dim']:<3d}"
    if "skipped" in r:
        return f"{head} SKIPPED: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR: {r['error']}"
    return (
        f"{head} peak {_gib(r['peak_bytes'])} GiB (weights {_gib(r['weights_bytes'])}, baseline "
        f"{_gib(r['baseline_bytes'])})  step {r['step_ms']:8.1f} ms  {r['lookups_per_s'] / 1e6:6.2f} M lookups/s  "
        f"load {r['load_avg_1m']:.2f}"
    )


def measure_table(impl: str, rows: int, a: argparse.Namespace, margin: int, timeout_s: float) -> dict[str, Any]:
    estimate = estimate_bytes(impl, rows, a.dim)
    ok, available = fits(estimate, margin)
    base: dict[str, Any] = {"impl": impl, "rows": rows, "dim": a.dim, "estimate_bytes": estimate}
    if not ok:
        base["skipped"] = (
            f"estimated peak {estimate / GIB:.2f} GiB (+{margin / GIB:.1f} GiB margin) > MemAvailable "
            f"{available / GIB:.2f} GiB"
        )
        return base
    args = ["--worker-table", impl, str(rows), "--dim", str(a.dim), "--batch", str(a.batch)]
    args += ["--pooling", str(a.pooling), "--warmup", str(a.warmup), "--repeats", str(a.repeats)]
    result = run_point(args, timeout_s)
    result.update({k: v for k, v in base.items() if k not in result})
    result["available_before_bytes"] = available
    result["load_avg_1m"] = load_average()
    return result


def does_not_fit_note(rows: int, dim: int) -> dict[str, Any]:
    """Why ``rows`` x ``dim`` fp32 cannot train here: its weights alone exceed the machine's RAM."""
    total = meminfo_bytes("MemTotal")
    weights = rows * dim * FP32
    assert weights > total, "only for tables that do not fit"
    return {
        "rows": rows,
        "dim": dim,
        "weights_bytes": weights,
        "mem_total_bytes": total,
        "note": (
            f"{rows:.0e} rows x {dim} x 4 B = {weights / GIB:.1f} GiB of fp32 weights alone (fused; plain Adagrad "
            f"doubles it) > {total / GIB:.1f} GiB RAM in all (MemTotal): does not fit"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--rows", type=float, nargs="*", default=[1e5, 1e6, 1e7], help="table sizes (none: skip)")
    parser.add_argument("--impls", nargs="+", choices=("fused", "plain"), default=["fused", "plain"])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1024, help="bags per step")
    parser.add_argument("--pooling", type=int, default=50, help="ids per bag")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--margin-gb", type=float, default=3.0, help="memory left free for everything else")
    parser.add_argument("--largest", action="store_true", help="grow the fused table until it no longer fits")
    parser.add_argument("--billion", action="store_true", help="train the ~1e9-parameter supermoe")
    parser.add_argument("--billion-items", type=int, default=12_000_000)
    parser.add_argument("--billion-users", type=int, default=3_000_000)
    parser.add_argument("--billion-experts", type=int, default=64)
    parser.add_argument("--billion-steps", type=int, default=10, help="steps; the first 2 are not timed")
    parser.add_argument("--billion-batch", type=int, default=512)
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--wait-s", type=float, default=600, help="longest wait for --max-load (0: no wait)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 1e4 rows, one timed step")
    # Worker modes (one point in this fresh process; prints one JSON line).
    parser.add_argument("--worker-table", nargs=2, metavar=("IMPL", "ROWS"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-billion", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help=argparse.SUPPRESS)
    a = parser.parse_args()

    if a.worker_table:
        impl, rows = a.worker_table
        print(json.dumps(table_point(impl, int(float(rows)), a.dim, a.batch, a.pooling, a.warmup, a.repeats)))
        return
    if a.worker_billion:
        r = billion_point(
            a.billion_items, a.billion_users, a.dim, a.billion_experts, a.billion_steps, a.billion_batch, a.threads
        )
        print(json.dumps(r))
        return

    if a.quick:
        a.rows, a.batch, a.pooling, a.warmup, a.repeats, a.wait_s = [1e4], 64, 8, 1, 1, 0
    margin = int(a.margin_gb * GIB)
    started = time.perf_counter()
    load, waited = wait_for_quiet(a.max_load, a.wait_s)
    print(
        f"{os.cpu_count()} CPUs, MemTotal {meminfo_bytes('MemTotal') / GIB:.1f} GiB, "
        f"MemAvailable {meminfo_bytes() / GIB:.1f} GiB, load {load:.2f} (waited {waited:.0f} s)"
    )
    results: list[dict[str, Any]] = []
    for rows in [int(r) for r in a.rows]:
        for impl in a.impls:
            r = measure_table(impl, rows, a, margin, timeout_s=900)
            print(table_row_text(r), flush=True)
            results.append(r)
    payload: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "mem_total_bytes": meminfo_bytes("MemTotal"),
            "mem_available_start_bytes": meminfo_bytes("MemAvailable"),
        },
        "load_avg_start": load,
        "waited_s": waited,
        "settings": {k: v for k, v in vars(a).items() if k not in ("out",)},
        "tables": results,
        # 1e8 rows at the standard width D=64 (whatever --dim is): the arithmetic, no process started.
        "does_not_fit": [does_not_fit_note(10**8, 64)] if not a.quick else [],
    }
    if not a.quick:
        print(payload["does_not_fit"][0]["note"])

    if a.largest:
        largest: dict[str, Any] | None = None
        tried = []
        rows = 20_000_000
        while True:
            r = measure_table("fused", rows, a, margin, timeout_s=900)
            print("largest search:", table_row_text(r), flush=True)
            tried.append(r)
            if "skipped" in r or "error" in r:
                break
            largest = r
            rows = int(rows * 1.5)
        payload["largest"] = {"trained": largest, "tried": tried}
        if largest is not None:
            print(
                f"largest fused table trained: {largest['rows']:,} x {a.dim} = {largest['params'] / 1e9:.2f}e9 "
                f"params, peak {largest['peak_bytes'] / GIB:.2f} GiB, {largest['step_ms']:.0f} ms/step"
            )

    if a.billion:
        counts = billion_param_count(a.billion_items, a.billion_users, a.dim, a.billion_experts, a.billion_batch)
        estimate = billion_estimate_bytes(counts["params_embedding"], counts["params_dense"])
        ok, available = fits(estimate, margin)
        print(
            f"billion model: {counts['params_total']:,} params ({counts['params_embedding']:,} embedding, "
            f"{counts['params_dense']:,} dense), estimated peak {estimate / GIB:.1f} GiB, "
            f"available {available / GIB:.1f} GiB",
            flush=True,
        )
        billion: dict[str, Any] = {"params": counts, "estimate_bytes": estimate, "available_bytes": available}
        if not ok:
            billion["skipped"] = "does not fit in MemAvailable minus the margin"
        else:
            args = ["--worker-billion", "--dim", str(a.dim), "--billion-items", str(a.billion_items)]
            args += ["--billion-users", str(a.billion_users), "--billion-experts", str(a.billion_experts)]
            args += ["--billion-steps", str(a.billion_steps), "--billion-batch", str(a.billion_batch)]
            billion.update(run_point(args, timeout_s=600))
            billion["load_avg_1m"] = load_average()
        payload["billion"] = billion
        if "samples_per_s_best" in billion:
            print(
                f"billion model trained: {billion['steps']} steps, losses {[round(x, 3) for x in billion['losses']]}, "
                f"{billion['samples_per_s_best']:.0f} samples/s best, {billion['samples_per_s_median']:.0f} median "
                f"({billion['samples_per_s_mean']:.0f} mean) after 2 untimed steps, "
                f"peak {billion['peak_bytes'] / GIB:.2f} GiB, build {billion['build_s']:.0f} s, "
                f"load {billion['load_avg_1m']:.2f}"
            )
        else:
            print(f"billion model: {billion.get('skipped') or billion.get('error')}")

    payload["wall_s"] = time.perf_counter() - started
    payload["load_avg_end"] = list(os.getloadavg())
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {a.out} in {payload['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
