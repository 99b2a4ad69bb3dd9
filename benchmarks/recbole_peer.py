"""RecBole 1.2.1 as a peer for next-item retrieval on ml-100k, side by side with our figures.

It installs ``recbole==1.2.1`` into its OWN venv (``.venv-recbole/``, pinned in ``requirements/recbole.txt``, torch
at the project's version; never the project's ``.venv``), then runs RecBole's models on RecBole's own ml-100k atomic
files (``recbole/dataset_example/ml-100k`` inside the wheel) under its sequential protocol:

- ``eval_args: {split: {LS: valid_and_test}, order: TO, group_by: user, mode: full}``: leave-one-out by time, the
  second-to-last interaction of each user is the valid target and the last the test target;
- full ranking over all items; HR@10, NDCG@10, MRR@10 averaged over users;
- early stopping on valid NDCG@10 with patience 10, and the best-valid checkpoint is tested.

RecBole's sequential models score every item (``repeatable=True``: already-seen items are not excluded). Pop, a
general model, masks the user's seen items; it is run both ways (batch size 1, since Pop counts an item once per
batch) as a sanity check against figures measured before: unmasked test HR@10 0.0498 / NDCG@10 0.0226, masked
0.0859 / 0.0444.

Each model gets a wall-clock budget (``--budget-min``, capped by ``--deadline``): after every epoch, training stops
cleanly when the next epoch (estimated as the slowest so far) would overrun it, and the best-valid checkpoint is
tested. The JSON records the epochs run and whether patience or the budget stopped training; it is rewritten after
every model, so a later run of another model adds to it.

The config, dataset and trainer steps are called directly (``recbole.quick_start`` imports ray, which is left out).
torch >= 2.6 loads checkpoints with ``weights_only=True``, which breaks RecBole's reload of its own best checkpoint, so
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set for the venv's process only. Training uses one torch thread unless
``--threads`` says otherwise.

    python benchmarks/recbole_peer.py --models SASRec,GRU4Rec --budget-min 110 --deadline 01:10 \\
        --out reports/ml100k/recbole_peer.json --ours reports/ml100k/universal.json
    python benchmarks/recbole_peer.py --report-only --out reports/ml100k/recbole_peer.json --ours OURS.json

``--ours`` reads ``{"retrieval": {MODEL: {"ndcg@10": x, "hr@10": y, "mrr@10": z}}}`` and prints our figures next to
RecBole's with the ratio ours / theirs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements" / "recbole.txt"
DEFAULT_VENV = REPO / ".venv-recbole"
METRICS = ("hr@10", "ndcg@10", "mrr@10")
RECBOLE_METRIC = {"hr@10": "hit@10", "ndcg@10": "ndcg@10", "mrr@10": "mrr@10"}
TEST_RESERVE_S = 120.0  # kept back from a deadline for loading the best checkpoint and the test pass

# RecBole's sequential protocol on ml-100k, shared by every model.
COMMON: dict[str, Any] = {
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
    "metrics": ["Hit", "NDCG", "MRR"],
    "topk": [10],
    "valid_metric": "NDCG@10",
    "stopping_step": 10,
    "show_progress": False,
    "save_dataset": False,
    "save_dataloaders": False,
}
MODELS: dict[str, dict[str, Any]] = {
    "SASRec": {
        "hidden_size": 64,
        "n_layers": 2,
        "n_heads": 2,
        "MAX_ITEM_LIST_LENGTH": 50,
        "train_batch_size": 256,
        "learning_rate": 1e-3,
        "loss_type": "CE",
        "train_neg_sample_args": None,
    },
    "GRU4Rec": {
        "MAX_ITEM_LIST_LENGTH": 50,
        "train_batch_size": 256,
        "learning_rate": 1e-3,
        "loss_type": "CE",
        "train_neg_sample_args": None,
    },
    "Pop": {"train_batch_size": 1, "train_neg_sample_args": None},
}


# ----------------------------------------------------------------------------------------------- outer process
def _stamp(venv: Path) -> Path:
    return venv / ".recbole-peer-stamp"


def ensure_venv(venv: Path) -> Path:
    """Create ``venv`` and install ``requirements/recbole.txt`` into it, unless it already matches; its python."""
    python = venv / "bin" / "python"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and _stamp(venv).exists() and _stamp(venv).read_text().strip() == digest:
        return python
    print(f"[recbole_peer] installing {REQUIREMENTS.relative_to(REPO)} into {venv}", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # Every dependency is pinned in the file, so --no-deps keeps recbole's ray requirement (and any unpinned torch,
    # which would be a multi-GB CUDA build) out.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "-q", "-r", str(REQUIREMENTS)],
        check=True,
    )
    _stamp(venv).write_text(digest + "\n")
    return python


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def side_by_side(peer: dict[str, Any], ours: dict[str, Any]) -> str:
    """Our retrieval figures next to RecBole's, and the ratio ours / theirs for each pair."""
    theirs = {name: row for name, row in peer.get("models", {}).items() if all(m in row for m in METRICS)}
    mine = ours.get("retrieval", {})
    lines = ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for who, rows in (("ours", mine), ("recbole", theirs)):
        for name, row in rows.items():
            cells = [f"{row[m]:.4f}" if m in row else "-" for m in METRICS]
            extra = f" ({row['epochs']} ep, {row['stopped_by']})" if "epochs" in row else ""
            lines.append(f"| {who}: {name}{extra} | " + " | ".join(cells) + " |")
    if mine and theirs:
        lines += ["", "ratio ours / recbole:", ""]
        lines.append("| ours | recbole | " + " | ".join(METRICS) + " |")
        lines.append("|---|---|" + "---|" * len(METRICS))
        for name, row in mine.items():
            for peer_name, peer_row in theirs.items():
                cells = [f"{row[m] / peer_row[m]:.3f}" if m in row and peer_row[m] > 0 else "-" for m in METRICS]
                lines.append(f"| {name} | {peer_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="SASRec,GRU4Rec", help="comma list, run in order: SASRec, GRU4Rec, Pop")
    p.add_argument("--budget-min", type=float, default=120.0, help="wall-clock training budget per model")
    p.add_argument("--deadline", default=None, help="UTC HH:MM by which the whole run must end (caps each budget)")
    p.add_argument("--min-budget-min", type=float, default=0.5, help="skip a model offered less than this")
    p.add_argument("--epochs", type=int, default=300, help="the most epochs (RecBole's default)")
    p.add_argument("--seed", type=int, default=2020, help="RecBole's seed (its default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the venv's process")
    p.add_argument("--out", type=Path, default=REPO / "reports" / "ml100k" / "recbole_peer.json")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recbole_peer/work"), help="RecBole's log/, saved/")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    p.add_argument("--ours", type=Path, default=None, help='JSON {"retrieval": {MODEL: {"ndcg@10": ...}}}')
    p.add_argument("--report-only", action="store_true", help="print --out next to --ours without training")
    p.add_argument("--setup-only", action="store_true", help="only create the venv")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()

    if args.inner:
        return inner(args)
    if not args.report_only:
        python = ensure_venv(args.venv.resolve())
        if args.setup_only:
            return 0
        env = dict(os.environ)
        env.update(
            TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",  # RecBole reloads its own best checkpoint; this process only
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
            PYTHONUNBUFFERED="1",
        )
        env.pop("PYTHONPATH", None)
        cmd = [str(python), str(Path(__file__).resolve()), "--inner", *(argv if argv is not None else sys.argv[1:])]
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            return rc
    peer = load_json(args.out)
    if args.ours is not None:
        print(side_by_side(peer, load_json(args.ours)), flush=True)
    else:
        print(side_by_side(peer, {}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- venv process
class BudgetSpent(Exception):
    """Raised from RecBole's end-of-epoch callback when the next epoch would overrun the budget."""


def _deadline_s(deadline: str | None) -> float:
    """Seconds from now to the next ``HH:MM`` UTC (inf without one)."""
    if deadline is None:
        return float("inf")
    now = dt.datetime.now(dt.UTC)
    hh, mm = (int(x) for x in deadline.split(":"))
    end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    if end <= now:
        end += dt.timedelta(days=1)
    return (end - now).total_seconds()


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    return {ours: round(float(result[theirs]), 4) for ours, theirs in RECBOLE_METRIC.items()}


def _write(out: Path, name: str, row: dict[str, Any], header: dict[str, Any]) -> None:
    data = load_json(out)
    data.update(header)
    data.setdefault("models", {})[name] = row
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(out)


def run_model(name: str, args: argparse.Namespace, budget_s: float) -> list[tuple[str, dict[str, Any]]]:
    """Train ``name`` within ``budget_s`` and test its best-valid checkpoint; rows for the JSON."""
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    started = time.monotonic()
    data_path = Path(recbole.__file__).parent / "dataset_example"
    config_dict = {
        **COMMON,
        **MODELS[name],
        "data_path": str(data_path),
        "checkpoint_dir": str(args.workdir / "saved"),
        "epochs": args.epochs,
        "seed": args.seed,
    }
    config = Config(model=name, dataset="ml-100k", config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    torch.set_num_threads(args.threads)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    fit_start = time.monotonic()
    state = {"epochs": 0, "last": fit_start, "slowest": 0.0}

    def end_of_epoch(epoch_idx: int, valid_score: float) -> None:
        now = time.monotonic()
        state["epochs"] += 1
        state["slowest"] = max(state["slowest"], now - state["last"])
        state["last"] = now
        print(
            f"[recbole_peer] {name} epoch {epoch_idx} done: {state['slowest']:.0f}s slowest epoch, "
            f"{now - fit_start:.0f}s of {budget_s:.0f}s budget, valid ndcg@10 {valid_score:.4f}",
            flush=True,
        )
        patience_stops = trainer.cur_step > trainer.stopping_step
        if not patience_stops and now - fit_start + 1.1 * state["slowest"] > budget_s:
            raise BudgetSpent

    stopped_by = "patience"
    try:
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=end_of_epoch)
    except BudgetSpent:
        stopped_by = "budget"
        print(f"[recbole_peer] {name}: budget spent after {state['epochs']} epochs", flush=True)
    else:
        if state["epochs"] >= trainer.epochs and trainer.cur_step <= trainer.stopping_step:
            stopped_by = "max_epochs"
    train_s = time.monotonic() - fit_start
    test = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    common = {
        "epochs": state["epochs"],
        "stopped_by": stopped_by,
        "best_valid_ndcg@10": round(float(trainer.best_valid_score), 4),
        "seconds_per_epoch": round(train_s / max(state["epochs"], 1), 1),
    }
    rows = []
    if name == "Pop":
        rows.append((f"{name}_masked", {**_metrics(test), "masked": True, **common}))
        # The same counts, scored like RecBole's sequential models: seen items not excluded.
        empty = torch.zeros(0, dtype=torch.int64)
        for uid in range(len(test_data.uid2history_item)):
            if test_data.uid2history_item[uid] is not None:
                test_data.uid2history_item[uid] = empty
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
        rows.append((name, {**_metrics(test), "masked": False, **common}))
    else:
        rows.append((name, {**_metrics(test), "masked": False, **common}))
    seconds = round(time.monotonic() - started, 1)
    for _, row in rows:
        row["seconds"] = seconds
    print(f"[recbole_peer] {name} done in {seconds:.0f}s: " + json.dumps(rows), flush=True)
    return rows


def inner(args: argparse.Namespace) -> int:
    import recbole
    import torch

    torch.set_num_threads(args.threads)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # RecBole writes ./log/ and ./log_tensorboard/ into the working directory
    outer = [a for a in sys.argv[1:] if a != "--inner"]
    command = shlex.join(["python", str(Path(__file__).resolve().relative_to(REPO)), *outer])
    sys.argv = sys.argv[:1]  # RecBole's Config reads --key=value from the command line; ours are not for it
    header = {
        "protocol": "RecBole sequential: eval_args {split: {LS: valid_and_test}, order: TO, group_by: user, "
        "mode: full}; full ranking over all items; test on the best-valid-NDCG@10 checkpoint, patience 10",
        "dataset": "ml-100k (recbole 1.2.1 dataset_example atomic files)",
        "recbole": recbole.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        budget_s = min(args.budget_min * 60.0, _deadline_s(args.deadline) - TEST_RESERVE_S)
        if budget_s < args.min_budget_min * 60.0:
            print(f"[recbole_peer] {name}: skipped, {budget_s:.0f}s left before the deadline", flush=True)
            continue
        for row_name, row in run_model(name, args, budget_s):
            row["command"] = command
            row["finished_utc"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            _write(args.out, row_name, row, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
