"""The ``supermoe-rec`` command line. It only parses arguments; the work lives in typed functions.

    supermoe-rec train --config configs/ml100k.yaml [--train.epochs=3 --model.arch=mmoe ...]
    supermoe-rec data summary --config configs/ml100k.yaml [--data.seed=1 ...]
    supermoe-rec schema infer --table train.parquet --label click [--label rating:regression] > schema.yaml
    supermoe-rec export --run runs/<name> [--out user_embeddings.parquet] [--model.moe.dropless=true ...]
    supermoe-rec export --run runs/<name> --artifact DIR    (inference artifact: tables, encoder + towers, manifest)
    supermoe-rec embed --artifact DIR --events new.parquet --out vectors.parquet
    supermoe-rec retrieve --artifact DIR --vectors vectors.parquet --k 10 --out topk.parquet [--index faiss]
    supermoe-rec probe --run runs/<name> [--seed 0] [--test-fraction 0.3] [--balanced]
    supermoe-rec probe --suite --run runs/<name> [--compare-run NAME=RUN ...] [--scorer auto] [--seed 0]
    supermoe-rec probe --suite-aggregate RUN1 RUN2 RUN3 --out reports/ml100k [--peer recbole_peer.json]
                       [--retrieval-runs LOO1 LOO2 LOO3]
    supermoe-rec plan --config configs/scale_1t.yaml --world-size 1024 --hbm-gb 80 [--local-world-size 8] [--json F]
    supermoe-rec compare --config configs/ml100k.yaml --archs supermoe,mmoe --seeds 3 [--out DIR] [--force] [--jobs N]
    supermoe-rec ablate --config configs/ml100k.yaml [--seeds 1] [--out DIR] [--force] [--jobs N] [--variants A,B]
    supermoe-rec scale --config configs/ml100k.yaml [--seeds 2] [--out reports] [--jobs N] [--experts 4 16 64]
                       [--shared 0 1] [--balance aux_loss bias]

Arguments after the known flags are ``--section.key=value`` config overrides, checked strictly.

Exit codes (every command): 0 success; 1 a compare/ablate run failed; 2 bad config or data, or a refused request
(changed-shape resume, a locked run dir, an unsafe ``train.name``); 3 an unusable checkpoint. The project's errors
print one line, ``supermoe-rec: error: ...``; ``--debug`` (anywhere on the line) or ``SUPERMOE_REC_DEBUG=1`` also
prints their traceback. See :mod:`supermoe_rec.errors`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from supermoe_rec.config.experiment import load_config, save_config
from supermoe_rec.config.help import add_config_help
from supermoe_rec.errors import DEBUG_ENV, run_reporting
from supermoe_rec.studies.compare import COMPARABLE_ARCHS, compare


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermoe-rec",
        description="SUPERMOE on TorchRec. Config overrides follow the flags as --section.key=value.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="print tracebacks of config, data and checkpoint errors (any position)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = data_sub.add_parser("summary", help="print the dataset summary as JSON")
    summary.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    summary.add_argument("--out", default=None, help="also write summary.json and the resolved config.yaml here")
    schema = sub.add_parser("schema", help="schema commands")
    schema_sub = schema.add_subparsers(dest="schema_command", required=True)
    infer = schema_sub.add_parser(
        "infer",
        help="propose a schema YAML for an interaction table; prints it with the reason for each line as comments",
    )
    infer.add_argument("--table", required=True, help="the train table: .parquet, .csv or .tsv")
    infer.add_argument(
        "--label",
        action="append",
        default=[],
        help="a label column (repeat, or comma-separate); NAME:regression or NAME:binary forces the task type",
    )
    for role, example in (
        ("user", "user_id"),
        ("group", "request_id: rows sharing one history"),
        ("timestamp", "ts"),
        ("history", "a list column of past items"),
        ("item", "the candidate item id"),
    ):
        infer.add_argument(
            f"--{role}", default=None, help=f"the {role} column, when its name does not say (e.g. {example})"
        )
    train = sub.add_parser("train", help="train model.arch; writes <train.out_dir>/<train.name>/")
    train.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    export = sub.add_parser(
        "export", help="user representations (parquet), routing.json and plots of a trained run (best weights)"
    )
    export.add_argument("--run", required=True, help="run directory, e.g. runs/ml100k-supermoe")
    export.add_argument("--out", default=None, help="parquet path (default: <run>/user_embeddings.parquet)")
    export.add_argument(
        "--artifact",
        default=None,
        help="write the inference artifact into this directory instead (see docs/serving.md)",
    )
    export.add_argument(
        "--overwrite", action="store_true", help="--artifact: replace an artifact that another run exported there"
    )
    emb = sub.add_parser("embed", help="[USER] vectors of the users in new events, with an exported artifact")
    emb.add_argument("--artifact", required=True, help="artifact directory from export --artifact")
    emb.add_argument("--events", required=True, help="events (parquet or CSV) in the schema's columns")
    emb.add_argument("--out", required=True, help="vectors parquet to write")
    emb.add_argument("--batch-size", type=int, default=1024, help="users per forward pass (default 1024)")
    ret = sub.add_parser("retrieve", help="top-k items per user by inner product, excluding the user's seen items")
    ret.add_argument("--artifact", required=True, help="artifact directory from export --artifact")
    ret.add_argument("--vectors", required=True, help="vectors parquet from embed")
    ret.add_argument("--out", required=True, help="top-k parquet to write (one row per user and rank)")
    ret.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    ret.add_argument("--index", choices=("exact", "faiss"), default="exact", help="exact torch.topk, or faiss IVF")
    ret.add_argument("--column", default="user", help="vector column to query with (default: user, the [USER])")
    ret.add_argument("--nprobe", type=int, default=16, help="faiss: inverted lists searched per query (default 16)")
    probe = sub.add_parser(
        "probe", help="linear probes of a behaviour-only run's user representation for gender, age, occupation"
    )
    probe.add_argument("--run", default=None, help="run directory trained with configs/ml100k_behaviour.yaml")
    probe.add_argument("--suite", action="store_true", help="the universality suite: universal.json/.md in the run")
    probe.add_argument(
        "--compare-run", action="append", default=[], metavar="NAME=RUN", help="suite: another run's [USER] as NAME"
    )
    probe.add_argument("--scorer", default="auto", help="suite retrieval: auto | score_items | stand_in")
    probe.add_argument("--suite-aggregate", nargs="+", default=None, metavar="RUN", help="mean ± std of suites")
    probe.add_argument("--out", default=None, help="--suite-aggregate: report directory")
    probe.add_argument("--peer", default=None, help="suite: RecBole figures from benchmarks/recbole_peer.py (JSON)")
    probe.add_argument(
        "--retrieval-runs", nargs="+", default=None, metavar="RUN", help="--suite-aggregate: retrieval from these"
    )
    probe.add_argument("--seed", type=int, default=0, help="seed of the user split and CV folds (default 0)")
    probe.add_argument("--test-fraction", type=float, default=0.3, help="held-out share of users (default 0.3)")
    probe.add_argument(
        "--balanced",
        action="store_true",
        help="balanced class weights and C chosen by balanced accuracy, so a weak signal is not hidden behind the "
        "majority class",
    )
    comp = sub.add_parser(
        "compare",
        help="multi-task vs single-task runs of several archs over seeds; writes report.json/.md and plots",
    )
    comp.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    comp.add_argument(
        "--archs",
        default=",".join(a.value for a in COMPARABLE_ARCHS),
        help="comma-separated architectures (default: all of %(default)s)",
    )
    comp.add_argument("--seeds", type=int, default=3, help="seeds per run: train.seed, train.seed+1, ... (default 3)")
    comp.add_argument("--out", default=None, help="report directory (default: reports/<config file stem>)")
    comp.add_argument("--force", action="store_true", help="retrain runs that already finished with the same config")
    comp.add_argument(
        "--jobs", type=int, default=1, help="runs trained at once, sharing the CPU cores between them (default 1)"
    )
    abl = sub.add_parser(
        "ablate",
        help="supermoe with one switch changed at a time (task tokens, top-k, experts, ...); writes ablations.md/json",
    )
    abl.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    abl.add_argument("--seeds", type=int, default=1, help="seeds per variant (default 1)")
    abl.add_argument("--out", default=None, help="report directory (default: reports/<config file stem>)")
    abl.add_argument("--force", action="store_true", help="retrain runs that already finished with the same config")
    abl.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    abl.add_argument(
        "--variants",
        default=None,
        help="comma-separated variant names to run besides 'default' (default: all; see studies/ablate.py)",
    )
    scl = sub.add_parser(
        "scale",
        help="MoE scaling study: dense vs fine-grained MoE (E, shared experts, balancing) at fixed active parameters",
    )
    scl.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    scl.add_argument("--seeds", type=int, default=2, help="seeds per arm (default 2)")
    scl.add_argument("--out", default="reports", help="writes moe_scaling.md/json/png here (default: reports)")
    scl.add_argument("--force", action="store_true", help="retrain runs that already finished with the same config")
    scl.add_argument("--jobs", type=int, default=1, help="runs trained at once (default 1)")
    scl.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64], help="routed experts E (default 4 16 64)")
    scl.add_argument("--shared", type=int, nargs="+", default=[0, 1], help="shared experts S (default 0 1)")
    scl.add_argument("--balance", nargs="+", default=["aux_loss", "bias"], help="load_balance (default aux_loss bias)")
    plan = sub.add_parser(
        "plan",
        help="plan the tables' sharding on a simulated GPU cluster (no GPU needed): parameters, memory per rank",
    )
    plan.add_argument("--config", required=True, help="YAML config file, e.g. configs/scale_1t.yaml")
    plan.add_argument("--world-size", type=int, required=True, help="ranks (GPUs) in the simulated cluster")
    plan.add_argument("--hbm-gb", type=float, default=80.0, help="HBM per rank, GiB (default %(default)s)")
    plan.add_argument("--local-world-size", type=int, default=8, help="ranks per host (default %(default)s)")
    plan.add_argument("--ddr-gb", type=float, default=128.0, help="host memory per rank for UVM, GiB (default 128)")
    plan.add_argument("--json", default=None, help="also write the report as JSON to this file")
    # Every command that reads a config lists its keys (types, defaults, by section) under --help.
    add_config_help(parser, skip=("schema infer",))
    return parser


def data_summary(config: str, overrides: Sequence[str], out: str | None = None) -> dict[str, object]:
    """Load the configured data, validate every split, and return the summary."""
    from supermoe_rec.data.generative import apply_layout
    from supermoe_rec.data.output import atomic_output, check_output_dir, write_json
    from supermoe_rec.data.splits import load_data

    cfg = load_config(config, overrides)
    out_dir = check_output_dir(out, "--out") if out is not None else None  # before the data load
    # In the layout the model trains on: under generative training each split also reports its chunks.
    summary = apply_layout(load_data(cfg.data), cfg).summary()
    if out_dir is not None:
        with atomic_output(out_dir / "config.yaml") as part:
            save_config(cfg, part)
        write_json(out_dir / "summary.json", summary)
    return summary


def _representation_command(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """``export`` / ``probe``: overrides apply to the run's saved config; an unusable checkpoint exits 3."""
    if args.command == "export" and args.artifact is not None:
        from supermoe_rec.serving.export_artifact import main as artifact_main

        return artifact_main(args.run, args.artifact, overrides, args.overwrite)
    if args.command == "export":
        from supermoe_rec.evaluation.export import main as export_main

        return export_main(args.run, args.out, overrides)
    from supermoe_rec.evaluation.probe import main as probe_main
    from supermoe_rec.evaluation.suite import suite_command

    if args.suite or args.suite_aggregate:
        return suite_command(
            args.run,
            overrides,
            args.seed,
            args.compare_run,
            args.scorer,
            args.suite_aggregate,
            args.out,
            args.peer,
            args.retrieval_runs,
        )
    if args.run is None:
        from supermoe_rec.config.experiment import ConfigError

        raise ConfigError("probe: --run is required")
    return probe_main(args.run, overrides, args.test_fraction, args.seed, args.balanced)


def main(argv: Sequence[str] | None = None) -> int:
    # Our progress at INFO; third-party libraries (fbgemm logs every .so it loads) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line: overrides always have a dot and a value
    args, overrides = _parser().parse_known_args([a for a in argv if a != "--debug"])
    previous = os.environ.get(DEBUG_ENV)
    if debug:  # train's own entry point and the runs compare/ablate start read it too
        os.environ[DEBUG_ENV] = "1"
    try:
        return run_reporting(lambda: _dispatch(args, overrides), debug)
    finally:
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous


def _dispatch(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Run one command; the project's errors propagate to :func:`run_reporting` (one line, exit code)."""
    if args.command == "train":
        from supermoe_rec.training import trainer as train

        return train.main(["--config", args.config, *overrides])
    if args.command == "data" and args.data_command == "summary":
        print(json.dumps(data_summary(args.config, overrides, args.out), indent=2))
        return 0
    if args.command == "schema":
        from supermoe_rec.config.experiment import ConfigError
        from supermoe_rec.data.infer import infer_command

        if overrides:
            raise ConfigError(f"schema infer: unknown arguments {list(overrides)}")
        roles = {r: getattr(args, r) for r in ("user", "group", "timestamp", "history", "item")}
        print(infer_command(args.table, args.label, **roles), end="")
        return 0
    if args.command in ("export", "probe"):
        return _representation_command(args, overrides)
    if args.command in ("embed", "retrieve"):
        from supermoe_rec.config.experiment import ConfigError as _ConfigError
        from supermoe_rec.serving import index as retrieval

        if overrides:
            raise _ConfigError(f"{args.command}: unknown arguments {list(overrides)}")
        if args.command == "embed":
            return retrieval.embed_main(args.artifact, args.events, args.out, args.batch_size)
        return retrieval.retrieve_main(
            args.artifact, args.vectors, args.out, args.k, args.index, args.column, args.nprobe
        )
    if args.command == "plan":
        from supermoe_rec.distributed.planner import ClusterSpec, format_report, plan_command

        cluster = ClusterSpec(args.world_size, args.hbm_gb, args.local_world_size, args.ddr_gb)
        print(format_report(plan_command(args.config, overrides, cluster, args.json)))
        return 0
    if args.command == "compare":
        archs = [a for a in args.archs.split(",") if a.strip()]
        compare(args.config, archs, args.seeds, args.out, args.force, overrides, jobs=args.jobs)
        return 0
    if args.command == "scale":
        from supermoe_rec.studies.scale import scale

        scale(args.config, args.seeds, args.out, args.force, overrides, args.jobs, True, args.experts, args.shared,
              args.balance)  # fmt: skip
        return 0
    if args.command == "ablate":
        from supermoe_rec.studies.ablate import VARIANTS, ablate, select_variants

        variants = select_variants(args.variants.split(",")) if args.variants else VARIANTS
        ablate(args.config, args.seeds, args.out, args.force, overrides, jobs=args.jobs, variants=variants)
        return 0
    raise AssertionError(f"unhandled command {args}")  # argparse only admits the commands above


if __name__ == "__main__":
    sys.exit(main())
