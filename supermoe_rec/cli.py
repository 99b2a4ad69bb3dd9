"""The ``supermoe-rec`` command line. It only parses arguments; the work lives in typed functions.

    supermoe-rec data summary --config configs/ml100k.yaml [--data.seed=1 ...]

Arguments after the known flags are ``--section.key=value`` config overrides, checked strictly.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from supermoe_rec.config import ConfigError, load_config, save_config
from supermoe_rec.data.errors import DataError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermoe-rec",
        description="SUPERMOE on TorchRec. Config overrides follow the flags as --section.key=value.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="dataset commands")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    summary = data_sub.add_parser("summary", help="print the dataset summary as JSON")
    summary.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    summary.add_argument("--out", default=None, help="also write summary.json and the resolved config.yaml here")
    train = sub.add_parser("train", help="train model.arch; writes <train.out_dir>/<train.name>/")
    train.add_argument("--config", required=True, help="YAML config file, e.g. configs/ml100k.yaml")
    return parser


def data_summary(config: str, overrides: Sequence[str], out: str | None = None) -> dict[str, object]:
    """Load the configured data, validate every split, and return the summary."""
    from supermoe_rec.data.splits import load_data

    cfg = load_config(config, overrides)
    summary = load_data(cfg.data).summary()
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    # Our progress at INFO; third-party libraries (fbgemm logs every .so it loads) only from WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
    args, overrides = _parser().parse_known_args(argv)
    if args.command == "train":
        from supermoe_rec import train

        return train.main(["--config", args.config, *overrides])
    try:
        if args.command == "data" and args.data_command == "summary":
            print(json.dumps(data_summary(args.config, overrides, args.out), indent=2))
            return 0
    except (ConfigError, DataError) as exc:
        print(f"supermoe-rec: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args}")  # argparse only admits the commands above


if __name__ == "__main__":
    sys.exit(main())
