"""Forward+backward time per token of MoELayer (fast and reference experts) vs a dense FFN of the same active size.

For E in {1, 4, 16, 64, 256} and K in {1, 2} (K <= E) it times ``forward + backward`` of:

- ``fast``: :class:`MoELayer` with the batched bmm experts;
- ``reference``: the same layer with the per-expert Python loop;
- ``dense``: :class:`DenseFFN` with hidden ``K * H`` (the same matmul FLOPs per token, no routing, no padding).

Achieved GFLOP/s counts the *useful* expert matmul FLOPs (kept assignments only, forward + backward = 3x forward)
and is compared with a large square ``torch.mm`` measured in the same run, the practical ceiling of this machine.

    python benchmarks/moe_layer.py --out runs/bench_moe.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from supermoe_rec.config import MoEConfig
from supermoe_rec.modules.experts import DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer


def _time(step: Callable[[], object], repeats: int, warmup: int = 3) -> float:
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


def _mm_peak_gflops(size: int, repeats: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = _time(lambda: torch.mm(a, b), repeats)
    return 2 * size**3 / seconds / 1e9


def run(tokens: int, d_model: int, hidden: int, experts: list[int], ks: list[int], repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model)
    rows: list[dict[str, Any]] = []
    for k in ks:
        dense = DenseFFN(d_model, k * hidden)

        def dense_step(ffn: DenseFFN = dense) -> None:
            ffn(x).sum().backward()

        dense_s = _time(dense_step, repeats)
        useful = 3 * 2 * 2 * tokens * k * d_model * hidden  # two matmuls, fwd + 2x for bwd
        rows.append(
            {"impl": "dense", "E": 1, "K": k, "us_per_token": dense_s / tokens * 1e6, "gflops": useful / dense_s / 1e9}
        )
        for e in experts:
            if k > e:
                continue
            cfg = MoEConfig(num_experts=e, top_k=k, expert_hidden=hidden)
            layer = MoELayer(d_model, cfg)
            for impl in ExpertImpl:
                layer.experts.impl = impl
                stats: dict[str, float] = {}

                def moe_step(m: MoELayer = layer, s: dict[str, float] = stats) -> None:
                    out = m(x)
                    (out.hidden.sum() + out.balance_loss + out.z_loss).backward()
                    s["dropped"] = float(out.dropped_fraction)

                seconds = _time(moe_step, repeats)
                kept_useful = useful * (1.0 - stats["dropped"])
                rows.append(
                    {
                        "impl": impl.value,
                        "E": e,
                        "K": k,
                        "us_per_token": seconds / tokens * 1e6,
                        "gflops": kept_useful / seconds / 1e9,
                        "dropped_fraction": stats["dropped"],
                        "vs_dense": seconds / dense_s,
                    }
                )
                print(
                    f"E={e:4d} K={k} {impl.value:9s} {seconds / tokens * 1e6:8.2f} us/token "
                    f"{kept_useful / seconds / 1e9:7.1f} GFLOP/s  x{seconds / dense_s:5.2f} dense",
                    flush=True,
                )
    peak = _mm_peak_gflops(2048, repeats)
    return {
        "tokens": tokens,
        "d_model": d_model,
        "hidden": hidden,
        "threads": torch.get_num_threads(),
        "mm_peak_gflops": peak,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    result = run(args.tokens, args.d_model, args.hidden, args.experts, args.ks, args.repeats)
    print(f"large torch.mm: {result['mm_peak_gflops']:.1f} GFLOP/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
