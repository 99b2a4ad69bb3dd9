"""Peak memory and speed of ml100k training vs how often freed heap memory is returned to the OS.

Training batches vary in size, so glibc keeps freed heap blocks resident and a run's RSS grows every step
(:mod:`supermoe_rec.training.memory`). The trainer calls ``malloc_trim(0)`` every ``RELEASE_MEMORY_EVERY`` steps; this
benchmark trains the first ``--steps`` steps of ``configs/ml100k.yaml`` once per interval in ``--every`` (0: never),
each in a fresh process, and reports:

- ``peak_rss_bytes``: ``VmHWM`` from ``/proc/self/status`` at the end of the process (training, then the test
  evaluation that a ``max_steps`` run ends with);
- ``train_samples_per_s``: from the run's ``metrics.json`` (training steps only).

    python benchmarks/train_memory.py --out runs/bench_train_memory.json
    python benchmarks/train_memory.py --steps 5 --every 0 2 --out /tmp/m.json  # smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: set the interval, train, print VmHWM. Arguments: every, steps, threads, out_dir, the
# benchmarks folder (for embedding_memory's /proc reader).
CHILD = """
import json, sys
import supermoe_rec.training.trainer as train
every, steps, threads, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
train.RELEASE_MEMORY_EVERY = every if every > 0 else 1 << 62
from supermoe_rec.config.experiment import load_config
overrides = [f"--train.max_steps={steps}", f"--train.num_threads={threads}", f"--train.out_dir={out_dir}"]
cfg = load_config("configs/ml100k.yaml", [*overrides, "--train.name=bench", "--train.tensorboard=false"])
train.train(cfg)
sys.path.insert(0, sys.argv[5])
from embedding_memory import status_bytes
print("RESULT " + json.dumps({"peak_rss_bytes": status_bytes("VmHWM")}))
"""


def run_one(every: int, steps: int, threads: int) -> dict[str, Any]:
    """Train ``steps`` steps in a fresh process with the given trim interval; its peak RSS and samples/s."""
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(every), str(steps), str(threads), out_dir, str(ROOT / "benchmarks")],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"every={every}: training exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"every={every}: no RESULT line in the child's output:\n{proc.stdout[-2000:]}")
        result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
        metrics = json.loads((Path(out_dir) / "bench" / "metrics.json").read_text())
    result.update(every=every, steps=steps, train_samples_per_s=metrics["train_samples_per_s"], wall_s=wall)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (default 150)")
    parser.add_argument("--every", type=int, nargs="+", default=[0, 10, 50, 100], help="trim intervals; 0: never")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    args = parser.parse_args()
    results = []
    for every in args.every:
        r = run_one(every, args.steps, args.threads)
        results.append(r)
        label = f"every {every}" if every else "never"
        print(
            f"trim {label:9s} {r['peak_rss_bytes'] / 2**30:6.2f} GiB peak RSS "
            f"{r['train_samples_per_s']:8.0f} train samples/s {r['wall_s']:6.1f} s wall",
            flush=True,
        )
    out = {"settings": vars(args) | {"out": str(args.out)}, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
