"""What the example scripts and notebooks share: where their outputs go, and quieter third-party logs.

Outputs go to ``$SUPERMOE_EXAMPLES_OUT/<example>`` when that variable is set (the tests point it at a temporary
folder), else to ``runs/examples/<example>`` in the repository (``runs/`` is git-ignored).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs" / "ml100k.yaml"


def out_dir(example: str) -> Path:
    """The output folder of one example (not created here)."""
    base = os.environ.get("SUPERMOE_EXAMPLES_OUT")
    return (Path(base) if base else REPO_ROOT / "runs" / "examples") / example


def quiet() -> None:
    """Hide the known, harmless warnings of torch/TorchRec on CPU, and show supermoe_rec's INFO logs.

    Hidden: deprecation notices (``FutureWarning``) and the planner's notes on how its topology was built. Kept:
    everything else, e.g. TorchRec's warning when a sharded module cannot be pipelined.
    """
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    warnings.filterwarnings("ignore", message=".*is_fx_tracing.*")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("torchrec.distributed.planner", "torch.fx._symbolic_trace", "torch.distributed.checkpoint"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
