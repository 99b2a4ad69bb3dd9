"""``supermoe-rec plan``: TorchRec's planner on a simulated GPU cluster, for the 1B / 100B / 1T configs."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from supermoe_rec import cli
from supermoe_rec.config.experiment import Arch, ExperimentConfig, apply_overrides, load_config
from supermoe_rec.data.synthetic import USER_SEGMENTS, synthetic_schema
from supermoe_rec.distributed.planner import REPORT_KEYS, ClusterSpec, PlanError, PlanReport, plan_command
from supermoe_rec.models.factory import build_model, count_parameters

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"scale_1b": 1e9, "scale_100b": 1e11, "scale_1t": 1e12}
GIB = 1024**3


def _config(name: str) -> str:
    return str(ROOT / "configs" / f"{name}.yaml")


@pytest.fixture(scope="module")
def plan_1t_1024() -> tuple[PlanReport, float]:
    start = time.perf_counter()
    report = plan_command(_config("scale_1t"), [], ClusterSpec(world_size=1024, hbm_gb=80, local_world_size=8))
    return report, time.perf_counter() - start


@pytest.fixture(scope="module")
def plan_1b_8() -> PlanReport:
    return plan_command(_config("scale_1b"), [], ClusterSpec(world_size=8, hbm_gb=80))


def test_1t_plans_on_1024_ranks(plan_1t_1024: tuple[PlanReport, float]) -> None:
    report, elapsed = plan_1t_1024
    assert elapsed < 60, f"planning took {elapsed:.1f} s"  # a generous bound, not a benchmark (~20 s here)
    tables = {t["name"]: t for t in report.tables}
    assert set(tables) == {"user", "segment", "item"}
    for name in ("user", "item"):
        # 3e9+ rows x 128 fp32 (~1.5 TiB) cannot sit on one host of 8 x 80 GiB: the table must span hosts.
        assert tables[name]["num_ranks"] > 8, tables[name]
        assert tables[name]["num_shards"] >= tables[name]["num_ranks"]
    mem = report.memory_per_rank_bytes
    assert 0 < mem["total_max"] <= mem["hbm_capacity"] == 80 * GIB
    # Expert parallelism: E/W = 2048/1024 experts per layer on each rank; weights + Adam = 12 bytes per parameter.
    assert report.params["experts_per_rank_per_layer"] == 2
    assert mem["experts"] == report.params["experts"] // 1024 * 12
    perf = report.perf_ms
    assert perf["max_rank_total"] >= perf["mean_rank_total"] * (1 - 1e-9) > 0  # equal up to summation order
    parts = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "input_dist_comms", "prefetch_compute")
    assert sum(perf[p] for p in parts) == pytest.approx(perf["max_rank_total"])
    assert "expert parallelism" in report.where_parameters_live


def test_1t_does_not_fit_on_8_ranks() -> None:
    # 1T fp32 parameters are ~3.6 TiB of weights alone, while 8 ranks offer 8 x (80 GiB HBM + 128 GiB DDR) =
    # 1.6 TiB; and each rank's 256 experts per layer (weights + Adam + gradient) already need ~380 GiB. So the
    # planner must refuse, and the error must say how much is needed, how much there is, and what to change.
    start = time.perf_counter()
    with pytest.raises(PlanError) as info:
        plan_command(_config("scale_1t"), [], ClusterSpec(world_size=8, hbm_gb=80))
    assert time.perf_counter() - start < 60
    message = str(info.value)
    assert "scale_1t.yaml" in message and "does not fit on 8 ranks x 80 GiB HBM" in message
    needed = float(re.search(r"needs ~([\d,.]+) GiB", message).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert needed > 8 * (80 + 128)
    fewest = int(re.search(r"at least ~(\d+) ranks", message).group(1))  # type: ignore[union-attr]
    assert 8 < fewest <= 1024 and 2048 % fewest == 0  # expert parallelism needs W | E


def _hand_count(cfg: ExperimentConfig) -> tuple[int, int]:
    """(table params, expert params) from the config alone: rows x dim per table, E x (2DH + H + D) per MoE layer
    (the blocks' and, under generative training, the task readout's)."""
    d, m = cfg.data, cfg.model
    tables = (d.synthetic_users + USER_SEGMENTS + d.synthetic_items) * m.embedding_dim
    moe = m.arch is Arch.SUPERMOE
    slots = [(i + 1) % m.moe.moe_every == 0 for i in range(m.encoder.num_layers)]
    # The causal encoder's task readout has an FFN of the last block's kind: one more MoE layer after an MoE block.
    readout = m.encoder.generative and m.encoder.use_task_tokens and slots[-1]
    moe_layers = (sum(slots) + int(readout)) if moe else 0
    D, H = m.encoder.d_model, m.moe.expert_hidden
    experts = moe_layers * m.moe.num_experts * (2 * D * H + H + D)
    return tables, experts


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parameter_totals(name: str) -> None:
    cfg = load_config(_config(name))
    meta = torch.device("meta")
    counts = count_parameters(build_model(cfg.model, synthetic_schema(cfg.data), device=meta))
    tables, experts = _hand_count(cfg)
    # The rest of the dense part does not depend on the table sizes: count it on a copy with tiny tables.
    tiny = apply_overrides(cfg, ["--data.synthetic_users=10", "--data.synthetic_items=10"])
    tiny_counts = count_parameters(build_model(tiny.model, synthetic_schema(tiny.data), device=meta))
    other_dense = tiny_counts["dense"] - tiny_counts["experts"]
    assert counts["embedding"] == tables
    assert counts["experts"] == experts
    assert counts["total"] == tables + experts + other_dense
    assert other_dense < 0.01 * counts["total"]
    assert 0.9 <= counts["total"] / CONFIGS[name] <= 1.5, counts
    # The file's header states the exact total the command computes.
    header = (ROOT / "configs" / f"{name}.yaml").read_text().splitlines()[0]
    assert f"total {counts['total']:,}" in header, header


def test_memory_per_rank_includes_optimizer(plan_1b_8: PlanReport, plan_1t_1024: tuple[PlanReport, float]) -> None:
    for report in (plan_1b_8, plan_1t_1024[0]):
        W = report.cluster["world_size"]
        total = report.embedding_bytes_total
        table_bytes = sum(t["rows"] * t["dim"] * 4 for t in report.tables)
        assert total["weights"] == table_bytes
        # Row-wise Adagrad: one fp32 accumulator per row.
        assert total["optimizer"] == sum(t["rows"] * 4 for t in report.tables)
        assert total["storage_hbm"] + total["storage_ddr"] >= table_bytes + total["optimizer"]
        emb = report.memory_per_rank_bytes["embeddings"]
        assert emb["hbm"]["mean"] * W == pytest.approx(total["storage_hbm"])
        assert emb["hbm"]["max"] >= report.memory_per_rank_bytes["embedding_weights"]["max"]


def test_planner_storage_follows_sparse_optimizer() -> None:
    # The planner learns the optimizer from the fused (in-backward) optimizer on the table weights: Adam's two
    # states must add exactly 2x the weights to the planned storage compared with SGD (no state).
    cluster = ClusterSpec(world_size=8, hbm_gb=80)
    storage = {}
    for opt in ("sgd", "adam"):
        report = plan_command(_config("scale_1b"), [f"--train.sparse_optimizer={opt}"], cluster)
        storage[opt] = sum(t["storage_bytes"]["hbm"] + t["storage_bytes"]["ddr"] for t in report.tables)
        weights = report.embedding_bytes_total["weights"]
    assert storage["adam"] - storage["sgd"] == pytest.approx(2 * weights, rel=1e-3)


def test_cli_json_has_documented_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", _config("scale_1b"), "--world-size", "8", "--hbm-gb", "80", "--json", str(out)]
    assert cli.main(argv) == 0
    assert "where the parameters live" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert tuple(doc) == REPORT_KEYS
    assert {"total", "embedding", "dense", "experts", "dense_replicated", "per_table"} <= set(doc["params"])
    assert {"name", "sharding_type", "compute_kernel", "ranks", "num_ranks", "storage_bytes", "perf_ms"} <= set(
        doc["tables"][0]
    )
    mem = doc["memory_per_rank_bytes"]
    assert {"embeddings", "embedding_weights", "embedding_optimizer", "experts", "dense", "total_max"} <= set(mem)
    assert {"max", "mean"} <= set(mem["embeddings"]["hbm"])
    assert {"max_rank_total", "fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms"} <= set(doc["perf_ms"])
    assert doc["params"]["total"] == doc["params"]["embedding"] + doc["params"]["dense"]


def test_cli_expert_parallel_needs_w_dividing_e(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "--config", _config("scale_1b"), "--world-size", "6", "--local-world-size", "6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "num_experts=64 is not a multiple of --world-size 6" in err
