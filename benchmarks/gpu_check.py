"""One-command GPU throughput check: samples/s and model FLOPs utilisation (MFU) of supermoe training on one GPU.

What runs: the real trainer (``build_trainer``: planner, DistributedModelParallel, fused row-wise Adagrad for the
tables, Adam for the dense part) driven by ``TrainPipelineSparseDist``, on synthetic data (~1e9 parameters by
default: user 5M x 64 + item 10M x 64 tables, a 4-layer encoder with 2 MoE layers of 16 experts), with the GPU
settings:

- bf16 autocast around the training step (the dense part: attention, FFNs/experts, towers run in bf16; the
  embedding tables, their fused optimizer, the router softmax and the loss stay fp32). The encoder's FFN outputs
  are cast back to the residual stream's dtype by a forward hook, because ``EncoderBlock`` adds them with
  ``index_add`` into an fp32 tensor, which refuses a bf16 source (see BENCHMARKS.md);
- ``train.sharding``: ``row_wise`` for tables of at least ``--row-wise-min-rows`` rows (on several GPUs this
  spreads the large tables evenly; on one GPU it exercises the same kernels), the planner's choice elsewhere;
- the fast (batched ``bmm``) expert path;
- the unpooled EmbeddingCollection sequence lookup (``model.sequence_lookup=embedding_collection``).

Expert paths (``expert_paths``): forward + backward of the dropless expert side on one routing plan, by
``torch._grouped_mm`` (CUDA, bf16), the padded ``bmm``, the segment loop and the per-expert reference loop, each with
its largest difference from the reference (the grouped_mm path has not been run on a GPU in this repository yet).

MFU: FLOPs of one training step of the dense part (forward + backward of the encoder, towers and loss on the
batch's real shapes, counted by ``torch.utils.flop_counter.FlopCounterMode``; embedding lookups are memory-bound
and not counted) / best step time / peak (``--peak-tflops``, default 989: H200 dense bf16).

    python benchmarks/gpu_check.py --out runs/gpu_check.json            # on the GPU machine (< 10 min)
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check.json  # CPU: tiny sizes, 2 steps (CI smoke)

Needs the GPU stack (torch 2.13 CUDA, fbgemm-gpu 1.8, torchrec 1.8; docs/design.md#the-pinned-stack) for the real run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import synthetic_split_data

from supermoe_rec.config.experiment import ExperimentConfig, apply_overrides
from supermoe_rec.data.batch import Batch
from supermoe_rec.data.synthetic import SyntheticStream
from supermoe_rec.models.factory import build_model
from supermoe_rec.models.supermoe import SuperMoERec
from supermoe_rec.modules.embeddings import SparseOutput
from supermoe_rec.modules.experts import BatchedExperts, DenseFFN, ExpertImpl
from supermoe_rec.modules.moe import MoELayer, MoEOutput
from supermoe_rec.objectives.task_indicator import TaskIndicatorLoss

H200_BF16_DENSE_TFLOPS = 989.0
CPU_PRACTICAL_TFLOPS = 0.1  # a large fp32 torch.mm on the 2-core dev machines (docs/design.md#cpu-speed-and-threads)


def gpu_overrides(batch: int, items: int, users: int) -> list[str]:
    """The GPU model: ~1e9 parameters, mostly in the two large tables."""
    return [
        "--data.source=synthetic",
        f"--data.synthetic_items={items}",
        f"--data.synthetic_users={users}",
        "--data.max_history=50",
        "--model.embedding_dim=64",
        "--model.encoder.d_model=256",
        "--model.encoder.num_layers=4",
        "--model.encoder.num_heads=8",
        "--model.encoder.ffn_hidden=1024",
        "--model.towers.hidden=[256, 64]",
        "--model.sequence_lookup=embedding_collection",
        "--model.moe.num_experts=16",
        "--model.moe.top_k=2",
        "--model.moe.expert_hidden=1024",
        "--model.moe.moe_every=2",
        f"--train.batch_size={batch}",
        "--train.tensorboard=false",
    ]


def dry_run_overrides() -> list[str]:
    """Everything the GPU run builds, at toy sizes on CPU."""
    return [
        "--data.source=synthetic",
        "--data.synthetic_items=2000",
        "--data.synthetic_users=1000",
        "--data.max_history=8",
        "--model.embedding_dim=16",
        "--model.encoder.d_model=32",
        "--model.encoder.num_layers=2",
        "--model.encoder.num_heads=2",
        "--model.encoder.ffn_hidden=32",
        "--model.towers.hidden=[16]",
        "--model.sequence_lookup=embedding_collection",
        "--model.moe.num_experts=4",
        "--model.moe.top_k=2",
        "--model.moe.expert_hidden=32",
        "--train.batch_size=32",
        "--train.tensorboard=false",
        "--train.device=cpu",
    ]


def _cast_ffn_output(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    """Forward hook: return an FFN's output in its input's dtype (fp32 residual stream under bf16 autocast)."""
    dtype = inputs[0].dtype
    if isinstance(output, MoEOutput):
        return output._replace(hidden=output.hidden.to(dtype))
    return output.to(dtype)


def prepare_dense_modules(model: nn.Module, bf16: bool) -> int:
    """Fast experts everywhere; under bf16, the FFN-output cast hooks. Returns the number of FFNs hooked."""
    hooked = 0
    for module in model.modules():
        if isinstance(module, BatchedExperts):
            module.impl = ExpertImpl.FAST
        if bf16 and isinstance(module, DenseFFN | MoELayer):
            module.register_forward_hook(_cast_ffn_output)
            hooked += 1
    return hooked


def sharding_for(cfg: ExperimentConfig, device: torch.device, min_rows: int) -> dict[str, str]:
    """``row_wise`` for the large tables on CUDA (CPU has no row-wise kernel: table_wise there)."""
    from supermoe_rec.data.synthetic import synthetic_schema

    schema = synthetic_schema(cfg.data)
    kind = "row_wise" if device.type == "cuda" else "table_wise"
    return {t.name: kind for t in schema.tables if t.num_embeddings >= min_rows}


def dense_step_flops(cfg: ExperimentConfig, batch: Batch, device: torch.device, bf16: bool) -> int:
    """FLOPs of forward + backward of the dense part (encoder, towers, loss) on ``batch``'s shapes.

    A fresh copy of the dense modules gets embedding outputs of the right shapes (random values: FLOPs do not
    depend on them), so the count never touches the trainer's parameters or its DDP hooks.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from supermoe_rec.data.synthetic import synthetic_schema

    schema = synthetic_schema(cfg.data)
    model = build_model(cfg.model, schema, device=device, sparse_device=torch.device("meta"))
    assert isinstance(model, SuperMoERec)
    over = model.over_arch
    prepare_dense_modules(over, bf16)
    dims = {f.name: schema.table(f.table).embedding_dim or cfg.model.embedding_dim for f in schema.sparse_features}
    dims.update(
        {f.name: schema.table(f.table).embedding_dim or cfg.model.embedding_dim for f in schema.sequence_features}
    )
    b = batch.to(device)
    B = b.batch_size
    pooled = {k: torch.randn(B, dims[k], device=device, requires_grad=True) for k in b.sparse_features.keys()}  # noqa: SIM118
    lengths = {k: jt.lengths().long() for k, jt in b.sequence_features.to_dict().items()}
    values = {k: torch.randn(int(v.sum()), dims[k], device=device, requires_grad=True) for k, v in lengths.items()}
    loss_fn = TaskIndicatorLoss(
        schema.task_specs(),
        balance_loss_weight=cfg.train.loss.balance_loss_weight,
        z_loss_weight=cfg.train.loss.z_loss_weight,
    )
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        out = over(SparseOutput(pooled, values, lengths), b)
        loss = loss_fn(out.predictions, b.labels, b.task_mask, out.balance_loss, out.z_loss)
        loss.total.backward()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def expert_paths(device: torch.device, dry_run: bool, repeats: int = 5) -> dict[str, Any]:
    """Forward + backward of the dropless expert side on one plan: ``torch._grouped_mm`` vs padded ``bmm`` vs the
    segment loop vs the per-expert reference loop, in ms, plus each path's largest difference from the reference.

    GPU run: 32768 tokens, D=256, H=1024, K=2, E in {16, 64}, bf16 (``_grouped_mm`` needs bf16); dry run: 256
    tokens, D=32, H=64, E in {4, 8}, fp32, and ``grouped_mm`` is reported as unavailable on CPU.
    """
    from supermoe_rec.config.experiment import MoEConfig
    from supermoe_rec.modules.experts import GroupedBackend, grouped_mm_available
    from supermoe_rec.modules.gating import DispatchPlan, TopKRouter

    tokens, d, h, k, experts = (256, 32, 64, 2, (4, 8)) if dry_run else (32768, 256, 1024, 2, (16, 64))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out: dict[str, Any] = {"tokens": tokens, "d_model": d, "hidden": h, "K": k, "dtype": str(dtype), "rows": []}
    for e in experts:
        torch.manual_seed(0)
        x = torch.randn(tokens, d, device=device)
        router = TopKRouter(d, MoEConfig(num_experts=e, top_k=k, expert_hidden=h, dropless=True), device=device)
        plan = router(x).plan
        plan = plan._replace(gates=plan.gates.detach())  # timed paths back-propagate into x and the experts only
        module = BatchedExperts(d, h, e, device=device).to(dtype)
        xd = x.to(dtype).requires_grad_(True)
        paths: list[tuple[str, ExpertImpl, GroupedBackend]] = [
            ("reference", ExpertImpl.REFERENCE, GroupedBackend.BMM),
            ("bmm", ExpertImpl.FAST, GroupedBackend.BMM),
            ("loop", ExpertImpl.FAST, GroupedBackend.LOOP),
        ]
        if grouped_mm_available(device):
            paths.append(("grouped_mm", ExpertImpl.FAST, GroupedBackend.GROUPED_MM))
        ref_out: Tensor | None = None
        row: dict[str, Any] = {"E": e}
        for name, impl, backend in paths:
            module.impl, module.grouped_backend = impl, backend

            def step(module: BatchedExperts = module, xd: Tensor = xd, plan: DispatchPlan = plan) -> Tensor:
                y = module(xd, plan)
                y.float().sum().backward()
                return y

            try:
                y = step()
                for _ in range(2):
                    step()
                _sync(device)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    step()
                    _sync(device)
                    best = min(best, time.perf_counter() - t0)
            except Exception as err:  # a path that does not run on this build is a result, not a crash
                row[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
                continue
            if ref_out is None:
                ref_out = y.detach().float()
            row[name] = {
                "ms": best * 1e3,
                "max_abs_diff_vs_reference": float((y.detach().float() - ref_out).abs().max()),
            }
        if not grouped_mm_available(device):
            row["grouped_mm"] = {"error": "torch._grouped_mm needs CUDA"}
        out["rows"].append(row)
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from supermoe_rec.distributed.process_group import init_distributed
    from supermoe_rec.training.trainer import build_trainer

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible (use --dry-run for the CPU smoke run)")
    device_name = "cpu" if args.dry_run else "cuda"
    overrides = dry_run_overrides() if args.dry_run else gpu_overrides(args.batch_size, args.items, args.users)
    overrides += [f"--train.device={device_name}"]
    cfg = apply_overrides(ExperimentConfig(), overrides)
    ctx = init_distributed(device_name)
    device = ctx.device
    sharding = sharding_for(cfg, device, 1000 if args.dry_run else args.row_wise_min_rows)
    cfg = apply_overrides(cfg, [f"--train.sharding={json.dumps(sharding)}"])
    bf16 = not args.fp32
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    start = time.perf_counter()
    data = synthetic_split_data(cfg.data)
    trainer = build_trainer(cfg, ctx, data)
    hooked = prepare_dense_modules(trainer.dmp, bf16)
    pipeline = TrainPipelineSparseDist(trainer.dmp, trainer.optimizer, device)
    build_s = time.perf_counter() - start

    warmup, steps, repeats = (0, 2, 1) if args.dry_run else (args.warmup, args.steps, args.repeats)
    stream = SyntheticStream(cfg.data, cfg.train.batch_size, ctx.rank, ctx.world_size)
    start = time.perf_counter()
    batches = [stream.make_batch(b * ctx.world_size + ctx.rank) for b in range(warmup + steps * repeats + 2)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    data_s = time.perf_counter() - start
    it = iter(batches)

    def step() -> int:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = pipeline.progress(it)
        return int(out.labels.shape[0])

    for _ in range(warmup):
        step()
    windows = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        rows = sum(step() for _ in range(steps))
        _sync(device)
        windows.append((time.perf_counter() - t0, rows))
    best_s, best_rows = min(windows, key=lambda w: w[0] / w[1])
    step_s = best_s / steps
    flops = dense_step_flops(cfg, batches[0], device, bf16)
    experts = expert_paths(device, args.dry_run)
    peak = args.peak_tflops if args.peak_tflops else (CPU_PRACTICAL_TFLOPS if args.dry_run else H200_BF16_DENSE_TFLOPS)
    achieved = flops / step_s / 1e12
    result = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": ctx.world_size,
        "torch": torch.__version__,
        "bf16": bf16,
        "sharding": sharding,
        "sequence_lookup": cfg.model.sequence_lookup.value,
        "expert_impl": ExpertImpl.FAST.value,
        "ffn_outputs_cast": hooked,
        "params": trainer.params,
        "batch_size_per_rank": cfg.train.batch_size,
        "build_s": build_s,
        "data_gen_s": data_s,
        "steps_timed": steps * repeats,
        "step_ms": step_s * 1e3,
        "samples_per_s": best_rows * ctx.world_size / best_s,
        "dense_flops_per_step": flops,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak,
        "max_memory_allocated_gib": (torch.cuda.max_memory_allocated(device) / 1024**3)
        if device.type == "cuda"
        else 0.0,
        "load_avg_1m": os.getloadavg()[0],
        "expert_paths": experts,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, 2 steps: builds and runs everything")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per step (GPU run)")
    parser.add_argument("--items", type=int, default=10_000_000, help="item table rows (GPU run)")
    parser.add_argument("--users", type=int, default=5_000_000, help="user table rows (GPU run)")
    parser.add_argument("--row-wise-min-rows", type=int, default=1_000_000, help="row_wise for tables this large")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast (for an fp32 comparison)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the best counts")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: H200 bf16 dense 989)")
    args = parser.parse_args()
    result = run(args)
    print(
        f"{result['device']}: {result['samples_per_s']:.0f} samples/s, {result['step_ms']:.1f} ms/step, "
        f"dense {result['dense_flops_per_step'] / 1e9:.2f} GFLOP/step -> {result['achieved_tflops']:.3f} TFLOP/s, "
        f"MFU {100 * result['mfu']:.2f}% of {result['peak_tflops']:g} TFLOP/s "
        f"(bf16={result['bf16']}, lookup={result['sequence_lookup']}, sharding={result['sharding']}, "
        f"params {result['params']['params_total']:,})"
    )
    for row in result["expert_paths"]["rows"]:
        cells = [f"{k} {v['ms']:.2f} ms" if "ms" in v else f"{k}: {v['error']}" for k, v in row.items() if k != "E"]
        print(f"experts E={row['E']}: " + "; ".join(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
