"""DistributedModelParallel on 2 CPU (gloo) processes against 1 process, through the real trainer.

Each case builds the trainer with :func:`supermoe_rec.training.trainer.build_trainer` (planner with the case's per-table
constraints, DMP, fused SGD on the tables, Adam on the dense part) in real processes, overwrites every table with
the same deterministic values, and runs two steps of TrainPipelineSparseDist on the same global batches of the
ml100k-mt train split: 1 process gets all groups of a step, rank r of 2 gets ``groups[r::2]`` (the
ShardedBatchLoader rule). Per the gradient convention of ``supermoe_rec.training.trainer`` every parameter then
receives the
gradient of the global loss, so compared with the 1-process run:

- the mean over ranks of each rank's loss (and per-task loss) is the 1-process loss, at both steps;
- every embedding table after the two updates (sharded tables reassembled from the ranks' local shards) is the
  1-process table. The sparse optimizer is SGD, which is not scale invariant, so a table gradient off by a factor
  (e.g. world size) moves the rows by a different amount; the changes are also compared relative to their size;
- the dense gradients of the last step (DDP-averaged) and the dense parameters after both updates are equal.

The model is small and deterministic: no dropout, dropless MoE (capacity depends on the local token count) and no
auxiliary losses (each rank adds its own balance/z loss, which is not the global one outside expert parallelism).
Column-wise sharding needs embedding_dim >= 2 x 128 (TorchRec's minimum column shard) to give 2 shards. The
``+generative`` case trains the generative layout (one causal pass per user chunk) with the sampled joint objective.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from supermoe_rec.config.experiment import ConfigError, DataConfig, ExperimentConfig, apply_overrides
from supermoe_rec.data.loader import ShardedBatchLoader
from supermoe_rec.data.splits import SplitData

from ..dist_utils import run_distributed

W = 2
GROUPS_PER_STEP = 256  # 128 per rank
STEPS = 2
SPARSE_LR = 1.0  # large enough that the table updates stand well above the tolerance
TOL = 1e-5
# Sharding type -> embedding dim: column_wise shards are >= 128 columns wide, so 256 gives one shard per rank.
CASES = {"table_wise": 16, "column_wise": 256, "table_wise+next_items": 16, "table_wise+next_items+generative": 16}
# The next-items case trains the [USER] vector too (joint), with the sampled softmax: the same sampled ids on every
# rank plus in-batch negatives gathered from all ranks, logQ corrected (supermoe_rec/objectives/next_items.py).
NEXT_ITEMS = [
    "--data.next_window=2",
    "--train.objective=joint",
    "--train.next_items.softmax=sampled",
    "--train.next_items.num_sampled=64",
]
# Generative training: one causal pass per user chunk, every position a target of the sampled next-items softmax and
# of the towers; a step holds whole chunks (each with its rows), rank r of 2 gets chunks[r::2].
GENERATIVE = ["--model.encoder.generative=true", "--data.next_window=1"]
GENERATIVE_GROUPS_PER_STEP = 16
SHARDED_TABLES = ("item", "user")  # sharded as the case says
# Every other table is pinned too, so that 1 and 2 processes get the same plan (the planner alone picks
# data_parallel for some small tables at one world size and table_wise at the other, and data-parallel tables are
# trained by the dense optimizer, not the fused sparse one). Data-parallel tables keep a .grad (DDP-averaged),
# compared with the dense gradients.
OTHER_TABLES = {
    "zip3": "table_wise",
    "age": "data_parallel",
    "gender": "data_parallel",
    "occupation": "data_parallel",
    "year": "data_parallel",
    "genre": "data_parallel",
}


def _overrides(case: str) -> list[str]:
    sharding = case.split("+")[0]
    return [
        *(NEXT_ITEMS if "+next_items" in case else []),
        *(GENERATIVE if case.endswith("+generative") else []),
        "--model.encoder.num_layers=1",
        "--model.encoder.d_model=32",
        f"--model.embedding_dim={CASES[case]}",
        "--model.encoder.ffn_hidden=32",
        "--model.towers.hidden=[16]",
        "--model.moe.num_experts=4",
        "--model.moe.expert_hidden=32",
        "--model.moe.moe_every=1",
        "--model.moe.dropless=true",
        "--train.loss.balance_loss_weight=0",
        "--train.loss.z_loss_weight=0",
        "--train.sparse_optimizer=sgd",
        f"--train.sparse_lr={SPARSE_LR}",
        "--train.tensorboard=false",
        "--train.sharding={" + ", ".join(f"{t}: {s}" for t, s in _sharding(sharding).items()) + "}",
    ]


def _sharding(case: str) -> dict[str, str]:
    return {**dict.fromkeys(SHARDED_TABLES, case.split("+")[0]), **OTHER_TABLES}


def _initial_table(index: int, rows: int, dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + index)
    return torch.randn(rows, dim, generator=g) * 0.1


def _step_groups(num_groups: int, per_step: int = GROUPS_PER_STEP) -> list[np.ndarray]:
    perm = np.random.default_rng(7).permutation(num_groups)
    return [perm[k * per_step : (k + 1) * per_step] for k in range(STEPS)]


def _is_table(key: str) -> bool:
    return ".sparse_arch." in key and key.endswith(".weight")


def _table_name(key: str) -> str:
    return key.split(".")[-2]


def _worker(rank: int, world_size: int, data_cfg: DataConfig) -> dict[str, Any]:
    """Build the trainer per sharding case, set identical tables, run STEPS pipeline steps; return what to compare."""
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    from supermoe_rec.data.generative import apply_layout
    from supermoe_rec.data.splits import load_data
    from supermoe_rec.distributed.process_group import DistContext
    from supermoe_rec.training.trainer import build_trainer

    ctx = DistContext(rank, world_size, rank, torch.device("cpu"))
    results: dict[str, Any] = {}
    for sharding in CASES:
        start = time.monotonic()
        cfg = apply_overrides(ExperimentConfig(data=data_cfg), _overrides(sharding))
        data = apply_layout(load_data(cfg.data), cfg)
        train = data.splits["train"]
        per_step = GENERATIVE_GROUPS_PER_STEP if sharding.endswith("+generative") else GROUPS_PER_STEP
        trainer = build_trainer(cfg, ctx, data)
        dmp = trainer.dmp

        # Same tables everywhere: TorchRec initialises each rank's shards from that rank's RNG.
        state = dmp.state_dict()
        table_keys = sorted(k for k in state if _is_table(k))
        with torch.no_grad():
            for i, key in enumerate(table_keys):
                value = state[key]
                full = _initial_table(i, *value.shape)
                if isinstance(value, torch.Tensor) and not hasattr(value, "local_shards"):
                    value.copy_(full)
                else:
                    for shard in value.local_shards():
                        (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                        shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
        state = dmp.state_dict()
        for i, key in enumerate(table_keys):  # the copies reached the tables themselves
            value = state[key]
            full = _initial_table(i, *value.shape)
            for shard in value.local_shards() if hasattr(value, "local_shards") else []:
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                assert torch.equal(shard.tensor, full[r0 : r0 + nr, c0 : c0 + nc]), key
            assert hasattr(value, "local_shards") or torch.equal(value, full), key

        # Every rank draws the same candidate ids for a step (the loader's rule), here from the trainer's source.
        source = trainer.loaders["train"].candidates
        batches = [
            train.batch_of_groups(g[rank::world_size], source(step) if source is not None else None)
            for step, g in enumerate(_step_groups(train.num_groups, per_step))
        ]
        pipeline = TrainPipelineSparseDist(dmp, trainer.optimizer, ctx.device)
        iterator = iter(batches)
        losses, per_task = [], []
        for _ in range(STEPS):
            out = pipeline.progress(iterator)
            losses.append(float(out.loss.total))
            per_task.append({k: float(v) for k, v in out.loss.per_task.items()})

        state = dmp.state_dict()
        tables: dict[str, Any] = {}
        for i, key in enumerate(table_keys):
            value = state[key]
            if hasattr(value, "local_shards"):
                shards = [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in value.local_shards()]
                tables[_table_name(key)] = {"index": i, "shape": tuple(value.shape), "shards": shards}
            else:
                tables[_table_name(key)] = {"index": i, "shape": tuple(value.shape), "full": value.detach().clone()}
        dense = {k: v.detach().clone() for k, v in state.items() if not _is_table(k) and isinstance(v, torch.Tensor)}
        grads = {
            k.removeprefix("_dmp_wrapped_module.").removeprefix("module."): p.grad.detach().clone()
            for k, p in dmp.named_parameters()
            if p.grad is not None
        }
        plan = {
            name: (ps.sharding_type, sorted(set(ps.ranks or [])))
            for module_plan in trainer.plan.plan.values()
            for name, ps in module_plan.items()  # type: ignore[attr-defined]
        }
        results[sharding] = {
            "next_items": [float(out.loss.next_items)] if out.loss.next_items is not None else [],
            "losses": losses,
            "per_task": per_task,
            "tables": tables,
            "dense": dense,
            "grads": grads,
            "plan": plan,
            "generative": batches[0].position_index is not None,
            # TorchRec's pipeline distributes these sharded lookups' inputs one batch ahead.
            "pipelined": sorted(type(m).__name__ for m in pipeline._pipelined_modules),
            "seconds": time.monotonic() - start,
        }
    return results


def _assemble(entry: dict[str, Any], ranks: list[dict[str, Any]] | None = None) -> torch.Tensor:
    """A table from one rank's full copy, or from the local shards of every rank."""
    if "full" in entry:
        return entry["full"]  # type: ignore[no-any-return]
    out = torch.full(entry["shape"], float("nan"))
    for rank_entry in ranks or [entry]:
        for (r0, c0), t in rank_entry["shards"]:
            out[r0 : r0 + t.shape[0], c0 : c0 + t.shape[1]] = t
    assert not out.isnan().any(), "the shards do not cover the table"
    return out


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict[str, Any]]]:
    data_cfg = DataConfig()
    return {ws: run_distributed(_worker, ws, data_cfg) for ws in (1, W)}


@pytest.mark.parametrize("sharding", list(CASES))
def test_two_rank_dmp_matches_one_process(runs: dict[int, list[dict[str, Any]]], sharding: str) -> None:
    (ref,) = (r[sharding] for r in runs[1])
    ranks = [r[sharding] for r in runs[W]]

    # The requested sharding was planned, the same at both world sizes; a column-wise table in 2 shards, one per rank.
    expected_plan = _sharding(sharding)
    for plan in (ref["plan"], ranks[0]["plan"], ranks[1]["plan"]):
        assert {t: kind for t, (kind, _) in plan.items()} == expected_plan, plan
    if sharding == "column_wise":
        for table in SHARDED_TABLES:
            assert ranks[0]["plan"][table][1] == [0, 1], ranks[0]["plan"]

    assert ref["generative"] == ranks[0]["generative"] == sharding.endswith("+generative")  # the layout trained
    # Both the pooled and the bags-of-one sequence tables are pipelined (the bags come from the batch).
    assert ranks[0]["pipelined"] == ["ShardedEmbeddingBagCollection", "ShardedEmbeddingBagCollection"], ranks[0]
    if "+next_items" in sharding:  # the next-items loss is part of the total, and is itself global
        assert ref["next_items"] and ref["next_items"][0] > 0
        mean = sum(r["next_items"][0] for r in ranks) / W
        assert mean == pytest.approx(ref["next_items"][0], abs=TOL, rel=TOL)
        assert any(".over_arch.user_proj." in k for k in ref["grads"]), "the [USER] projection got no gradient"

    # Loss: the mean of the ranks' losses is the 1-process loss, at every step.
    for step in range(STEPS):
        mean = sum(r["losses"][step] for r in ranks) / W
        assert mean == pytest.approx(ref["losses"][step], abs=TOL, rel=TOL), (step, mean, ref["losses"][step])
        for task, value in ref["per_task"][step].items():
            mean = sum(r["per_task"][step][task] for r in ranks) / W
            assert mean == pytest.approx(value, abs=TOL, rel=TOL), (step, task)

    # Tables after the updates: equal, and so are their changes, relative to the size of the change.
    for name, ref_entry in ref["tables"].items():
        expected = _assemble(ref_entry)
        initial = _initial_table(ref_entry["index"], *ref_entry["shape"])
        entries = [r["tables"][name] for r in ranks]
        if "full" in entries[0]:  # replicated (data_parallel): every rank holds the same table
            torch.testing.assert_close(entries[1]["full"], entries[0]["full"], atol=TOL, rtol=0)
        got = _assemble(entries[0], entries)
        torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL, msg=lambda m, n=name: f"table {n}: {m}")
        change, ref_change = got - initial, expected - initial
        touched = ref_change.abs().amax(dim=1) > 0
        assert touched.any(), f"table {name}: no row was updated"
        assert torch.equal(change[~touched], torch.zeros_like(change[~touched])), f"table {name}: untouched rows moved"
        if "full" in entries[0]:
            continue  # data-parallel: an Adam update (near scale invariant); its gradient is checked below
        # Fused SGD: the change is lr x the gradient, so it must match to a small fraction of its size.
        scale = float(ref_change.abs().max())
        assert float((change - ref_change).abs().max()) <= 1e-4 * scale, (
            f"table {name}: update differs (max ref change {scale:.3g}, "
            f"ratio of norms {float(change.norm() / ref_change.norm()):.4f})"
        )

    # Dense (and data-parallel tables): the DDP-averaged gradients of the last step, which Adam's near scale
    # invariance would hide in the parameters, and the parameters after both Adam updates. Adam turns a gradient at
    # rounding level (e.g. the attention key bias, whose true gradient is 0) into an lr-sized step of either sign,
    # so parameters are compared where the gradient is above that level.
    assert ref["grads"].keys() == ranks[0]["grads"].keys() == ranks[1]["grads"].keys()
    assert any(".over_arch.towers." in k for k in ref["grads"]), "no tower gradient was kept"
    for key, g in ref["grads"].items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][key], g, atol=1e-6, rtol=1e-4, msg=lambda m, k=key: f"grad {k}: {m}")
    assert ref["dense"].keys() == ranks[0]["dense"].keys()
    compared = total = 0
    for key, v in ref["dense"].items():
        live = ref["grads"][key].abs() > 1e-6 if key in ref["grads"] else torch.ones_like(v, dtype=torch.bool)
        compared, total = compared + int(live.sum()), total + live.numel()
        for r in ranks:
            torch.testing.assert_close(
                r["dense"][key][live], v[live], atol=TOL, rtol=TOL, msg=lambda m, k=key: f"{k}: {m}"
            )
    assert compared > 0.9 * total, (compared, total)


def test_row_wise_on_cpu_is_a_config_error_naming_the_table(
    ml100k_data: SplitData, monkeypatch: pytest.MonkeyPatch
) -> None:
    import supermoe_rec.distributed.sharding as sharding_mod
    import supermoe_rec.training.trainer as train_mod
    from supermoe_rec.distributed.process_group import DistContext

    built = []
    monkeypatch.setattr(sharding_mod, "build_model", lambda *a, **k: built.append(1))
    monkeypatch.setattr(train_mod, "build_model", lambda *a, **k: built.append(1))
    cfg = apply_overrides(ExperimentConfig(), ["--train.sharding={user: table_wise, item: row_wise}"])
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"train\.sharding\.item: 'row_wise'.*cpu"):
        train_mod.build_trainer(cfg, ctx, ml100k_data)
    assert not built, "a model was built before the sharding was checked"
    with pytest.raises(ConfigError, match=r"train\.sharding\.item"):
        sharding_mod.sharding_constraints(cfg.train.sharding, ml100k_data.schema, torch.device("cpu"))


def test_samples_per_epoch_and_per_rank_batch(ml100k_data: SplitData) -> None:
    train = ml100k_data.splits["train"]
    batch = 512
    one = ShardedBatchLoader(train, batch, 0, 1, shuffle=True, seed=3)
    two = [ShardedBatchLoader(train, batch // W, r, W, shuffle=True, seed=3) for r in range(W)]
    one_sizes = [b.batch_size for b in one]
    two_sizes = [[b.batch_size for b in loader] for loader in two]
    # Every sample once per epoch, whatever the world size; every rank yields the same number of batches.
    assert sum(one_sizes) == len(train) == sum(map(sum, two_sizes))
    assert len({len(s) for s in two_sizes}) == 1
    assert len(two[0]) == len(two_sizes[0])
    # Global batch = per-rank batch x world size: same step count, per-rank batches about half the 1-rank batch.
    assert abs(len(two_sizes[0]) - len(one_sizes)) <= 1
    per_rank = np.array(two_sizes, dtype=float)
    assert abs(per_rank.mean() * W / np.mean(one_sizes) - 1) < 0.01
    assert per_rank.max() <= batch // W + 8 and per_rank.min() >= batch // W - 8
    # The two ranks' groups of one epoch are disjoint and together all groups.
    seen = np.concatenate([np.concatenate(loader._plan()) for loader in two])
    assert np.array_equal(np.sort(seen), np.arange(train.num_groups))
