"""The report of scripts/generative_quality.sh: generative training on ml100k over seeds, next to its references.

Reads ``<runs>/mt-s<seed>/metrics.json`` (configs/ml100k.yaml, ml100k-mt) and ``<runs>/loo-s<seed>/metrics.json``
(configs/ml100k_universal.yaml on RecBole's leave-one-out split), whatever has finished, and writes the report
``--out`` (.md) with its .json beside it: test metrics as mean ± std over seeds (sample std; a single seed says
so), each run's wall time, best epoch and training samples/s, and the references: the seesaw study's supermoe
(reports/ml100k/report.json, per-group training, 3 seeds) and RecBole's SASRec and GRU4Rec
(reports/ml100k/recbole_peer.json).

    python scripts/generative_report.py --runs runs/generative --out reports/ml100k/generative.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MT_METRICS = (("watch", "auc"), ("like", "auc"), ("rating", "rmse"))
LOO_METRICS = ("hr@10", "ndcg@10", "mrr@10")


def _stats(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "per_seed": values,
    }


def _runs(root: Path, prefix: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(root.glob(f"{prefix}-s*/metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["name"] = path.parent.name
        out.append(metrics)
    return out


def _run_facts(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": m["name"],
        "seed": m["config"]["train"]["seed"],
        "wall_s": round(float(m["wall_s"]), 1),
        "epochs": m["epochs"],
        "best_epoch": m.get("best_epoch"),
        "train_samples_per_s": round(float(m["train_samples_per_s"]), 1),
    }


def build(runs: Path) -> dict[str, Any]:
    mt, loo = _runs(runs, "mt"), _runs(runs, "loo")
    study = json.loads((ROOT / "reports/ml100k/report.json").read_text())["archs"]["supermoe"]["tasks"]
    peers = json.loads((ROOT / "reports/ml100k/recbole_peer.json").read_text())["models"]
    result: dict[str, Any] = {"ml100k_mt": {}, "leave_one_out": {}, "runs": [_run_facts(m) for m in (*mt, *loo)]}
    if mt:
        result["ml100k_mt"] = {
            f"{task}.{metric}": {
                **_stats([float(m["test"]["tasks"][task][metric]) for m in mt]),
                "per_group_study": {"mean": study[task]["mean"], "std": study[task]["std"]},
            }
            for task, metric in MT_METRICS
        }
    if loo:
        result["leave_one_out"] = {
            metric: {
                **_stats([float(m["test"]["next_item"][metric]) for m in loo]),
                "recbole": {name: peers[name][metric] for name in ("SASRec", "GRU4Rec") if name in peers},
                "recbole_epochs": {
                    name: f"{peers[name].get('epochs')} epochs, stopped by {peers[name].get('stopped_by')}"
                    for name in ("SASRec", "GRU4Rec")
                    if name in peers
                },
            }
            for metric in LOO_METRICS
        }
    return result


def _fmt(s: dict[str, Any]) -> str:
    spread = f" ± {s['std']:.4f}" if s["n"] > 1 else " (one seed)"
    return f"{s['mean']:.4f}{spread}"


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "# Generative training on ml100k",
        "",
        "One causal pass per user, every position supervised (docs/design.md, generative training). Test metrics,",
        "mean ± sample std over the seeds that have finished; every figure below comes from this command:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    if result["ml100k_mt"]:
        lines += [
            "## ml100k-mt (configs/ml100k.yaml)",
            "",
            "| task | generative | per-group supermoe, seesaw study (3 seeds) | within one std or better |",
            "|---|---|---|---|",
        ]
        for key, s in result["ml100k_mt"].items():
            ref = s["per_group_study"]
            higher = not key.endswith("rmse")
            better = s["mean"] >= ref["mean"] - ref["std"] if higher else s["mean"] <= ref["mean"] + ref["std"]
            lines.append(
                f"| {key} | {_fmt(s)} | {ref['mean']:.4f} ± {ref['std']:.4f} | {'yes' if better else '**no**'} |"
            )
        lines.append("")
    if result["leave_one_out"]:
        lines += [
            "## Next-item retrieval, RecBole's leave-one-out protocol (configs/ml100k_universal.yaml)",
            "",
            "Full ranking over the catalogue, unmasked, as RecBole scores its sequential models. RecBole's figures",
            "come from reports/ml100k/recbole_peer.json, runs made on this machine in an earlier session, not",
            "run to convergence: "
            + "; ".join(f"{k} {v}" for k, v in next(iter(result["leave_one_out"].values()))["recbole_epochs"].items())
            + ".",
            "",
            "| metric | generative | RecBole SASRec | RecBole GRU4Rec |",
            "|---|---|---|---|",
        ]
        for key, s in result["leave_one_out"].items():
            peers = s["recbole"]
            lines.append(f"| {key} | {_fmt(s)} | {peers.get('SASRec', float('nan')):.4f} | "
                         f"{peers.get('GRU4Rec', float('nan')):.4f} |")  # fmt: skip
        lines.append("")
    lines += [
        "## Runs",
        "",
        "| run | seed | wall s (load, train, every evaluation) | epochs | best epoch | train samples/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        row = (r["run"], r["seed"], r["wall_s"], r["epochs"], r["best_epoch"], r["train_samples_per_s"])
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=Path, required=True, help="the study's run directory")
    parser.add_argument("--out", type=Path, required=True, help="the report's .md path (the .json goes beside it)")
    args = parser.parse_args()
    result = build(args.runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    command = f"scripts/generative_quality.sh {args.runs}"
    args.out.with_suffix(".md").write_text(markdown(result, command))
    print(f"wrote {args.out.with_suffix('.md')} and .json ({len(result['runs'])} runs)")


if __name__ == "__main__":
    main()
