"""MoE layer cost on this machine: forward+backward per token of every expert path, and the three ratios of issue 12.

Paths timed (``forward + backward`` of the whole layer, router and auxiliary losses included, same tokens ``x``):

- ``capacity``: :class:`MoELayer` as configured by default (capacity factor 1.25): the padded ``[E, C, D]`` bmm;
- ``dropless_bmm`` / ``dropless_loop``: ``moe.dropless=true``, the dropless fast path (tokens sorted by expert) with
  the padded bmm or the segment loop as its grouped matmul (``auto`` picks one of them by E on CPU,
  :data:`~supermoe_rec.modules.experts.LOOP_MAX_EXPERTS`);
- ``reference``: the per-expert Python loop (the test oracle) on the default capacity plan;
- ``dense``: :class:`DenseFFN` with hidden ``K * H`` (the same expert FLOPs per token, no routing, no padding).

Then, in the same run:

- the GEMM peak: the best of a large square fp32 ``torch.mm`` (2048, and 3072 outside ``--quick``);
- the expert matmuls alone (``BatchedExperts.compute`` forward + backward on a full ``[E, C, D]`` buffer: the two
  matmuls, bias and GELU) at the bench's largest shape (``--large``: E=8, K=2, 8192 tokens, D=256, H=1024;
  ``--quick``: 4096 tokens, D=256, H=512), as a fraction of that peak.

Before it, the same E=256 / E=4 ratio at that wide shape (``--no-wide`` skips it): at D=64, H=128 the router's
``E * D`` FLOPs per token are half the experts' at E=256, at D=256, H=1024 they are 6%.

The last line printed is::

    ratio_e256_e4=<x> fast_vs_loop_e64_k2=<y> expert_gemm_fraction=<z>

with x the capacity path's time at E=256 over E=4 (K=2), y the reference loop's time over the capacity path's at
E=64, K=2, and z the expert matmuls' GFLOP/s over the GEMM peak.

Times are the best of ``--repeats`` (the dev machines are shared; contention only adds time). Method and figures:
BENCHMARKS.md section 2.

    python benchmarks/moe_layer.py --quick
    python benchmarks/moe_layer.py --out runs/bench_moe.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from supermoe_rec.config.experiment import MoEConfig
from supermoe_rec.modules.experts import BatchedExperts, DenseFFN, ExpertImpl, GroupedBackend
from supermoe_rec.modules.moe import MoELayer


def _time(step: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Best-of-``repeats`` seconds of ``step``: the minimum, not the median, because the 2-core dev machines are
    shared and contention only ever adds time."""
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return min(samples)


def mm_peak_gflops(sizes: list[int], repeats: int) -> float:
    """Best GFLOP/s of a square fp32 ``torch.mm`` over ``sizes``: the practical GEMM ceiling of this machine."""
    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        seconds = _time(lambda a=a, b=b: torch.mm(a, b), repeats)
        best = max(best, 2 * size**3 / seconds / 1e9)
    return best


def _layer(d_model: int, hidden: int, experts: int, k: int, dropless: bool) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(d_model, MoEConfig(num_experts=experts, top_k=k, expert_hidden=hidden, dropless=dropless))


def _layer_step(layer: MoELayer, x: torch.Tensor, stats: dict[str, float]) -> Callable[[], None]:
    def step() -> None:
        out = layer(x)
        (out.hidden.sum() + out.balance_loss + out.z_loss).backward()
        stats["dropped"] = float(out.dropped_fraction)

    return step


def _rounds(cases: list[Callable[[], object]], repeats: int, warmup: int = 2) -> list[float]:
    """Best seconds of every case, timed in ``repeats`` rounds that each run every case once: a burst of outside
    load hits all cases alike, so the ratios taken from one run stay fair."""
    for case in cases:
        for _ in range(warmup):
            case()
    best = [float("inf")] * len(cases)
    for _ in range(repeats):
        for i, case in enumerate(cases):
            start = time.perf_counter()
            case()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def layer_rows(
    tokens: int, d_model: int, hidden: int, experts: list[int], ks: list[int], repeats: int, reference_max_e: int
) -> list[dict[str, Any]]:
    """Every path at every (E, K): microseconds per token, useful expert GFLOP/s and the ratio to dense."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model)
    rows: list[dict[str, Any]] = []
    for k in ks:
        dense = DenseFFN(d_model, k * hidden)
        useful = 3 * 2 * 2 * tokens * k * d_model * hidden  # two matmuls, forward + 2x for backward
        named: list[tuple[str, int, dict[str, float], Callable[[], object]]] = [
            ("dense", 1, {"dropped": 0.0}, lambda ffn=dense: ffn(x).sum().backward())
        ]
        for e in experts:
            if k > e:
                continue
            layers: list[tuple[str, MoELayer]] = [("capacity", _layer(d_model, hidden, e, k, False))]
            for backend in (GroupedBackend.BMM, GroupedBackend.LOOP):
                if backend is GroupedBackend.LOOP and e > reference_max_e:
                    continue  # hundreds of tiny addmm calls: minutes, not informative
                layer = _layer(d_model, hidden, e, k, True)
                layer.experts.grouped_backend = backend
                layers.append((f"dropless_{backend.value}", layer))
            if e <= reference_max_e:
                ref = _layer(d_model, hidden, e, k, False)
                ref.experts.impl = ExpertImpl.REFERENCE
                layers.append(("reference", ref))
            for name, layer in layers:
                stats: dict[str, float] = {}
                named.append((name, e, stats, _layer_step(layer, x, stats)))
        seconds = _rounds([case for *_, case in named], repeats)
        dense_s = seconds[0]
        for (name, e, stats, _), s in zip(named, seconds, strict=True):
            kept_useful = useful * (1.0 - stats["dropped"])
            row = {
                "path": name,
                "E": e,
                "K": k,
                "us_per_token": s / tokens * 1e6,
                "gflops": kept_useful / s / 1e9,
                "dropped_fraction": stats["dropped"],
                "vs_dense": s / dense_s,
            }
            rows.append(row)
            print(
                f"E={e:4d} K={k} {name:14s} {row['us_per_token']:8.2f} us/token {row['gflops']:7.1f} GFLOP/s "
                f"x{row['vs_dense']:5.2f} dense",
                flush=True,
            )
    return rows


def expert_gemm(tokens: int, d_model: int, hidden: int, experts: int, k: int, repeats: int) -> dict[str, Any]:
    """GFLOP/s of the expert matmuls alone (``compute`` forward + backward on a full buffer, no padding rows)."""
    torch.manual_seed(0)
    module = BatchedExperts(d_model, hidden, experts)
    rows = tokens * k // experts  # a perfectly balanced dropless buffer: every slot is a real assignment
    buf = torch.randn(experts, rows, d_model, requires_grad=True)
    seconds = _time(lambda: module.compute(buf).sum().backward(), repeats)
    flops = 3 * 2 * 2 * experts * rows * d_model * hidden
    return {
        "tokens": tokens,
        "d_model": d_model,
        "hidden": hidden,
        "E": experts,
        "K": k,
        "seconds": seconds,
        "gflops": flops / seconds / 1e9,
    }


def ratio_at(tokens: int, d_model: int, hidden: int, repeats: int) -> dict[str, Any]:
    """The E=256 / E=4 ratio (capacity path, K=2, router included) at a wider shape, where the router's ``E * D``
    FLOPs per token are small next to the experts' ``4 * K * D * H``."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model)
    cases = []
    for e in (4, 256):
        stats: dict[str, float] = {}
        cases.append(_layer_step(_layer(d_model, hidden, e, 2, False), x, stats))
    s4, s256 = _rounds(cases, repeats, warmup=1)
    return {"tokens": tokens, "d_model": d_model, "hidden": hidden, "e4_s": s4, "e256_s": s256, "ratio": s256 / s4}


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, timeout_s: float, poll_s: float = 15.0) -> tuple[float, float]:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``timeout_s``); returns (load, waited)."""
    start = time.monotonic()
    while load_average() >= max_load and time.monotonic() - start < timeout_s:
        time.sleep(poll_s)
    return load_average(), time.monotonic() - start


def _find(rows: list[dict[str, Any]], path: str, e: int, k: int) -> float | None:
    for r in rows:
        if r["path"] == path and r["E"] == e and r["K"] == k:
            return float(r["us_per_token"])
    return None


def headline(rows: list[dict[str, Any]], gemm: dict[str, Any], peak: float) -> dict[str, float | None]:
    """The three ratios of issue 12 from one run's rows."""
    e4, e256 = _find(rows, "capacity", 4, 2), _find(rows, "capacity", 256, 2)
    fast64, ref64 = _find(rows, "capacity", 64, 2), _find(rows, "reference", 64, 2)
    return {
        "ratio_e256_e4": e256 / e4 if e4 and e256 else None,
        "fast_vs_loop_e64_k2": ref64 / fast64 if ref64 and fast64 else None,
        "expert_gemm_fraction": gemm["gflops"] / peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON results here")
    parser.add_argument("--quick", action="store_true", help="K=2, E in {4, 64, 256}, 3 repeats, smaller GEMM shape")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-min load average below this")
    parser.add_argument("--wait-s", type=float, default=600, help="longest wait for --max-load (0: no wait)")
    parser.add_argument("--no-wide", action="store_true", help="skip the E=256/E=4 ratio at the wide shape")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    experts, ks, repeats, ref_max = args.experts, args.ks, args.repeats, 64
    large = (8192, 256, 1024)
    peak_sizes = [2048, 3072]
    if args.quick:
        experts, ks, repeats, large, peak_sizes = [4, 64, 256], [2], 3, (4096, 256, 512), [2048]
    load_start, waited = wait_for_quiet(args.max_load, 0.0 if args.quick else args.wait_s)
    start = time.perf_counter()
    rows = layer_rows(args.tokens, args.d_model, args.hidden, experts, ks, repeats, ref_max)
    gemm = expert_gemm(*large, experts=8, k=2, repeats=repeats)
    peak = mm_peak_gflops(peak_sizes, repeats)
    heads = headline(rows, gemm, peak)
    wide = None if args.no_wide else ratio_at(*large, repeats=repeats)
    if wide is not None:
        print(f"ratio E=256/E=4 at the wide shape {large} (tokens, D, H): {wide['ratio']:.3f}")
    print(f"large torch.mm (GEMM peak): {peak:.1f} GFLOP/s; expert matmuls at {large}: {gemm['gflops']:.1f} GFLOP/s")
    result = {
        "tokens": args.tokens,
        "d_model": args.d_model,
        "hidden": args.hidden,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
        "load_avg_start": load_start,
        "waited_s": waited,
        "load_avg_end": load_average(),
        "wide_ratio_e256_e4": wide,
        "wall_s": time.perf_counter() - start,
        "mm_peak_gflops": peak,
        "expert_gemm": gemm,
        "rows": rows,
        **heads,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    def fmt(v: float | None) -> str:
        return "nan" if v is None else f"{v:.3f}"

    print(" ".join(f"{k}={fmt(v)}" for k, v in heads.items()))


if __name__ == "__main__":
    main()
