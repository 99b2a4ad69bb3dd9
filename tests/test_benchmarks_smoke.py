"""Smoke tests of the benchmark scripts: each runs in its tiny mode as a subprocess, exits 0 and writes JSON with the
expected keys. No timing is asserted (the machines are shared; the figures live in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(script: str, args: list[str], out: Path, timeout_s: float = 240) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def test_train_throughput_quick(tmp_path: Path) -> None:
    out = _run(
        "train_throughput.py",
        [
            "--quick",
            "--data",
            "synthetic",
            "--archs",
            "supermoe",
            "--worlds",
            "1",
            "2",
            "--no-lookups",
            "--threads",
            "1",
        ],
        tmp_path / "train.json",
    )
    assert {"machine", "settings", "results", "ratios", "wall_s", "load_avg_start"} <= set(out)
    labels = {r["label"] for r in out["results"]}
    assert "synthetic/supermoe/torchrec/bags_of_one/groups/w1" in labels
    assert "synthetic/supermoe/torchrec/bags_of_one/groups/w2" in labels
    assert "synthetic/supermoe/plain/nn.Embedding/groups/w1/adagrad" in labels
    for r in out["results"]:
        assert "error" not in r, r
        assert {"samples_per_s", "ms_per_step", "rows_per_step", "load_avg_1m", "build_s"} <= set(r)
        assert r["samples_per_s"] > 0
    assert {r["ratio"] for r in out["ratios"]} >= {"torchrec/plain", "2 procs/1 proc"}


def test_train_throughput_generative_quick(tmp_path: Path) -> None:
    out = _run("train_throughput.py", ["--quick", "--generative", "--threads", "1"], tmp_path / "gen.json")
    by_label = {r["label"]: r for r in out["results"]}
    for label in (
        "ml100k_mt/supermoe/torchrec/bags_of_one/groups/w1",
        "ml100k_mt/supermoe/torchrec/bags_of_one/generative/w1",
        "ml100k_universal/supermoe/torchrec/bags_of_one/generative/w1",
        "ml100k_universal/supermoe/plain_causal/nn.Embedding/generative/w1/adam",
    ):
        assert "error" not in by_label[label], by_label[label]
        assert 0 < by_label[label]["targets_per_s"] < by_label[label]["samples_per_s"]
    # A generative step holds whole user chunks: far fewer groups than the per-group step's (user, position) pairs.
    generative = by_label["ml100k_mt/supermoe/torchrec/bags_of_one/generative/w1"]
    assert (
        generative["groups_per_step"] < by_label["ml100k_mt/supermoe/torchrec/bags_of_one/groups/w1"]["groups_per_step"]
    )
    assert {r["ratio"] for r in out["ratios"]} >= {"generative/per-group", "generative/plain causal"}


def test_embedding_memory_quick(tmp_path: Path) -> None:
    out = _run("embedding_memory.py", ["--quick"], tmp_path / "mem.json")
    assert {"machine", "settings", "tables", "does_not_fit", "wall_s"} <= set(out)
    impls = {r["impl"] for r in out["tables"]}
    assert impls == {"fused", "plain"}
    for r in out["tables"]:
        assert "error" not in r and "skipped" not in r, r
        assert {"rows", "dim", "peak_bytes", "baseline_bytes", "step_ms", "lookups_per_s", "load_avg_1m"} <= set(r)
        assert r["peak_bytes"] >= r["baseline_bytes"] > 0


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    out = _run("gpu_check.py", ["--dry-run"], tmp_path / "gpu.json")
    expected = {"dry_run", "device", "samples_per_s", "step_ms", "dense_flops_per_step", "mfu", "peak_tflops"}
    assert expected <= set(out)
    assert out["dry_run"] is True and out["bf16"] is True
    assert out["sequence_lookup"] == "embedding_collection"
    assert out["dense_flops_per_step"] > 0 and out["samples_per_s"] > 0
    # The expert paths ran on CPU (grouped_mm needs CUDA) and agree with the reference loop.
    rows = out["expert_paths"]["rows"]
    assert [r["E"] for r in rows] == [4, 8]
    for r in rows:
        assert "error" in r["grouped_mm"]
        for path in ("reference", "bmm", "loop"):
            assert r[path]["ms"] > 0 and r[path]["max_abs_diff_vs_reference"] < 1e-5, (path, r)


def test_moe_layer_quick_prints_the_three_ratios(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "moe_layer.py"), "--quick", "--tokens", "512", "--repeats", "1",
         "--threads", "1", "--no-wide", "--out", str(tmp_path / "moe.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    keys = [item.split("=")[0] for item in last.split()]
    assert keys == ["ratio_e256_e4", "fast_vs_loop_e64_k2", "expert_gemm_fraction"], last
    values = [float(item.split("=")[1]) for item in last.split()]
    assert all(v > 0 for v in values), last
    result = json.loads((tmp_path / "moe.json").read_text())
    assert result["mm_peak_gflops"] > 0 and {r["path"] for r in result["rows"]} >= {"capacity", "reference", "dense"}


def test_plain_twin_looks_up_what_sparse_arch_does() -> None:
    """The plain-PyTorch twin the throughput benchmark compares against returns the same embeddings as SparseArch
    (same weights), for both sequence lookups: the comparison is between implementations, not models."""
    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from train_throughput import PlainSparseArch

    from supermoe_rec.config.experiment import SequenceLookup
    from supermoe_rec.models.factory import tiny_schema_and_batch
    from supermoe_rec.modules.embeddings import SparseArch

    schema, batch = tiny_schema_and_batch()
    for lookup in (SequenceLookup.EMBEDDING_COLLECTION, SequenceLookup.BAGS_OF_ONE):
        ref = SparseArch(schema, 8, lookup)
        plain = PlainSparseArch(schema, 8)
        assert ref.ebc is not None
        seq = ref.sequence_ec.embeddings if ref.sequence_ec is not None else ref.sequence_ebc.embedding_bags  # type: ignore[union-attr]
        with torch.no_grad():
            plain.bags["user"].weight.copy_(ref.ebc.embedding_bags["user"].weight)
            plain.embeddings["item"].weight.copy_(seq["item"].weight)
        want, got = ref(batch.sparse_features, batch.sequence_features), plain(batch)
        for name in want.pooled:
            torch.testing.assert_close(got.pooled[name], want.pooled[name], rtol=0, atol=0)
        for name in want.sequences:
            torch.testing.assert_close(got.sequences[name], want.sequences[name], rtol=0, atol=0)
            torch.testing.assert_close(got.lengths[name], want.lengths[name])


def test_train_memory_quick(tmp_path: Path) -> None:
    out = _run("train_memory.py", ["--steps", "3", "--every", "0", "2", "--threads", "1"], tmp_path / "mem.json")
    assert [r["every"] for r in out["results"]] == [0, 2]
    for r in out["results"]:
        assert r["steps"] == 3 and r["peak_rss_bytes"] > 100 * 2**20 and r["train_samples_per_s"] > 0, r


def test_next_items_cost_quick(tmp_path: Path) -> None:
    out = _run("next_items_cost.py", ["--quick"], tmp_path / "cost.json", timeout_s=600)
    assert set(out["ms_per_step"]) == {
        "ml100k/supervised",
        "ml100k/joint_full",
        "synthetic/supervised",
        "synthetic/joint_sampled",
    }
    assert all(ms > 0 for ms in out["ms_per_step"].values())
    assert out["full_over_supervised_ml100k"] > 0 and out["sampled_over_supervised_synthetic"] > 0
