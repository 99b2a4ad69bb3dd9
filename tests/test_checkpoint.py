"""Checkpoint and resume on real runs: ``python -m supermoe_rec.training.trainer`` as 1 or 2 gloo processes on
MovieLens-100k.

One module fixture drives every run, overlapping them to fit 2 CPU cores:

1. runs A (uninterrupted) and B (identical) start together on 2 ranks: expert-parallel MoE (the experts differ per
   rank), dropout and router noise (the RNG states matter), a checkpoint every ``EVERY`` steps;
2. once B's LATEST names a checkpoint at step >= ``KILL_AT``, rank 1 of B gets SIGKILL mid-epoch (rank 0 is killed
   next: it would wait for its peer in a collective) and B's checkpoints are copied as a snapshot;
3. then, together: B resumes on 2 ranks with ``--train.resume=true``; a 1-rank probe loads the 2-rank snapshot into a
   model without expert parallelism, dumps its state and trains on; resumes from damaged copies of the snapshot.

Checked: B's test metrics, step count and final checkpoint (weights and optimizer states) equal A's bit for bit;
the 2-rank checkpoint loads on 1 rank exactly; truncated, corrupt, incomplete or absent checkpoints end every rank
with a CheckpointError (exit code 3) naming the path, never a run from scratch; a dir left by a crash mid-save is
skipped for the previous complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ml100k.yaml"
STEPS, EVERY, KILL_AT, MORE = 20, 4, 8, 4
MODEL = [
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=32",
    "--model.moe.moe_every=1",
    "--train.expert_parallel=true",
    "--model.encoder.dropout=0.1",
    "--model.moe.router_noise=0.1",
]
TRAIN = [
    "--train.tensorboard=false",
    "--train.batch_size=256",
    "--train.eval_batch_size=8192",
    f"--train.checkpoint_every={EVERY}",
]
TIMEOUT_S = 300.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Run:
    """One launch of ``world`` rank processes of the trainer (or of this module's probe), logging to files."""

    def __init__(self, out: Path, name: str, world: int, *args: str, tag: str = "", probe: bool = False) -> None:
        self.run_dir = out / name
        self.logs = [out / f"{name}{tag}.rank{r}.log" for r in range(world)]
        port = str(_free_port())
        module = ["tests.test_checkpoint", "probe"] if probe else ["supermoe_rec.training.trainer"]
        cmd = [sys.executable, "-m", *module, "--config", str(CONFIG), f"--train.out_dir={out}",
               f"--train.name={name}", *TRAIN, *MODEL, *args]  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
            log = open(self.logs[rank], "wb")  # noqa: SIM115 (closed in wait)
            self._files.append(log)
            self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def done(self) -> bool:
        return all(proc.poll() is not None for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait(timeout=30)

    def wait(self, deadline: float) -> list[int]:
        """Exit codes by rank; every process is killed (and the test fails) at ``deadline`` (time.monotonic)."""
        try:
            for proc in self.procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.run_dir.name}: timed out\n{self.tail()}")
        finally:
            for f in self._files:
                f.close()
        return [int(proc.returncode) for proc in self.procs]

    def log(self, rank: int = 0) -> str:
        return self.logs[rank].read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs)

    def metrics(self) -> dict[str, Any]:
        path = self.run_dir / "metrics.json"
        assert path.is_file(), f"{path} missing\n{self.tail()}"
        result: dict[str, Any] = json.loads(path.read_text())
        return result


def _latest(checkpoints: Path) -> Path | None:
    pointer = checkpoints / "LATEST"
    return checkpoints / pointer.read_text().strip() if pointer.is_file() else None


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[1])  # ckpt-000008-step8[.1]


def _dcp_tensors(ckpt: Path, tmp: Path) -> dict[str, Any]:
    """A DCP checkpoint as full (unsharded) tensors, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.parent.parent.name}-{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state: dict[str, Any] = torch.load(out, weights_only=False)
    return state


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): obj}


def _assert_same_tensors(got: dict[str, Any], want: dict[str, Any], what: str) -> int:
    got, want = _flatten(got), _flatten(want)
    assert got.keys() == want.keys(), f"{what}: keys differ: {sorted(got.keys() ^ want.keys())[:10]}"
    diff = [k for k in want if not torch.equal(torch.as_tensor(got[k]), torch.as_tensor(want[k]))]
    assert not diff, f"{what}: {len(diff)} of {len(want)} tensors differ, e.g. {diff[:5]}"
    return len(want)


# --------------------------------------------------------------------------------------------------- the runs

# Damaged copies of the snapshot: (ranks, how to damage the LATEST checkpoint dir, what the error must say).
CORRUPT_CASES: dict[str, tuple[int, str, str]] = {
    "truncated_distcp": (2, "truncate __1_0.distcp to half its size", "truncated"),
    "no_metadata": (1, "delete .metadata", ".metadata is missing"),
    "bitflip_distcp": (1, "flip one byte in __0_0.distcp", "CRC-32"),
    "no_complete_marker": (1, "delete COMPLETE", "incomplete"),
    "no_checkpoint": (1, "no checkpoints dir at all", "no checkpoint to resume from"),
}


def _damage(case: str, ckpt: Path) -> None:
    if case == "truncated_distcp":
        f = ckpt / "__1_0.distcp"
        os.truncate(f, f.stat().st_size // 2)
    elif case == "no_metadata":
        (ckpt / ".metadata").unlink()
    elif case == "bitflip_distcp":
        f = ckpt / "__0_0.distcp"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    elif case == "no_complete_marker":
        (ckpt / "COMPLETE").unlink()
    elif case == "no_checkpoint":
        shutil.rmtree(ckpt.parent)


@dataclasses.dataclass
class World:
    out: Path
    a: Run
    b: Run
    b_resume: Run
    probe: Run
    corrupt: dict[str, Run]
    crash: Run
    killed_at: int
    b_finished: bool
    snapshot: Path
    codes: dict[str, list[int]]
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def world(ml100k: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    out = tmp_path_factory.mktemp("ckpt")
    t0 = time.monotonic()
    deadline = t0 + TIMEOUT_S
    a = Run(out, "a", 2, f"--train.max_steps={STEPS}")
    b = Run(out, "b", 2, f"--train.max_steps={STEPS}")
    started: list[Run] = [a, b]
    try:
        # 2. SIGKILL rank 1 of B once a checkpoint at step >= KILL_AT is the latest (mid-epoch: an epoch is ~300).
        checkpoints = b.run_dir / "checkpoints"
        while (latest := _latest(checkpoints)) is None or _step(latest) < KILL_AT:
            if any(p.poll() is not None for p in b.procs):
                pytest.fail(f"run b ended before it could be killed\n{b.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"run b wrote no checkpoint at step >= {KILL_AT} in time\n{b.tail()}")
            time.sleep(0.01)
        os.kill(b.procs[1].pid, signal.SIGKILL)
        b.procs[1].wait(timeout=30)
        time.sleep(0.5)  # rank 0 is now stuck in (or failing out of) a collective with its dead peer
        b.kill()
        b_codes = b.wait(deadline)
        killed_ckpt = _latest(checkpoints)
        assert killed_ckpt is not None
        killed_at = _step(killed_ckpt)
        b_finished = (b.run_dir / "metrics.json").exists()
        snapshot = out / "snapshot"
        shutil.copytree(checkpoints, snapshot)

        # 3. Everything that starts from the killed run's checkpoints, at once.
        b_resume = Run(out, "b", 2, f"--train.max_steps={STEPS}", "--train.resume=true", tag=".resume")
        started.append(b_resume)
        shutil.copytree(snapshot, out / "probe" / "checkpoints")
        probe = Run(out, "probe", 1, "--train.expert_parallel=false", "--train.resume=true",
                    f"--train.max_steps={killed_at + MORE}", probe=True)  # fmt: skip
        started.append(probe)
        corrupt = {}
        for case, (ranks, _, _) in CORRUPT_CASES.items():
            shutil.copytree(snapshot, out / case / "checkpoints")
            _damage(case, out / case / "checkpoints" / killed_ckpt.name)
            corrupt[case] = Run(out, case, ranks, "--train.resume=true", f"--train.max_steps={killed_at}")
            started.append(corrupt[case])
        # A crash mid-save of a later step: its dir has partial files and no COMPLETE; LATEST still names the last
        # good checkpoint.
        crashed = out / "crash" / "checkpoints"
        shutil.copytree(snapshot, crashed)
        partial = crashed / f"ckpt-{killed_at + EVERY:06d}-step{killed_at + EVERY}"
        partial.mkdir(exist_ok=True)
        for name in (".metadata", "__0_0.distcp"):
            data = (crashed / killed_ckpt.name / name).read_bytes()
            (partial / name).write_bytes(data[: len(data) // 3])
        (partial / "COMPLETE").unlink(missing_ok=True)
        crash = Run(out, "crash", 1, "--train.resume=true", f"--train.max_steps={killed_at}")
        started.append(crash)

        codes = {"b_killed": b_codes}
        seconds = {"b_killed": time.monotonic() - t0}
        pending = {"a": a, "b_resume": b_resume, "probe": probe, "crash": crash, **corrupt}
        while pending:
            for name, run in list(pending.items()):
                if run.done() or time.monotonic() > deadline:
                    codes[name] = run.wait(deadline)
                    seconds[name] = time.monotonic() - t0
                    del pending[name]
            time.sleep(0.05)
        return World(out, a, b, b_resume, probe, corrupt, crash, killed_at, b_finished, snapshot, codes, seconds)
    except BaseException:
        for run in started:
            run.kill()
        raise


# --------------------------------------------------------------------------------------------------- the tests


def test_kill_one_rank_and_resume_is_bit_exact(world: World, tmp_path: Path) -> None:
    assert world.codes["b_killed"][1] == -signal.SIGKILL, world.b.tail()
    assert KILL_AT <= world.killed_at < STEPS
    assert not world.b_finished
    assert world.codes["a"] == [0, 0], world.a.tail()
    assert world.codes["b_resume"] == [0, 0], world.b_resume.tail()
    killed = _latest(world.snapshot)
    assert killed is not None
    assert f"loaded {world.b.run_dir / 'checkpoints' / killed.name}" in world.b_resume.log()  # resumed, not restarted
    a, b = world.a.metrics(), world.b_resume.metrics()
    assert a["steps"] == b["steps"] == STEPS
    assert b["test"] == a["test"], f"resumed {b['test']}\nuninterrupted {a['test']}"
    # The final checkpoints: every weight (embedding shards, experts of both ranks, dense) and optimizer state.
    a_ckpt, b_ckpt = _latest(world.a.run_dir / "checkpoints"), _latest(world.b.run_dir / "checkpoints")
    assert a_ckpt is not None and b_ckpt is not None and _step(a_ckpt) == _step(b_ckpt) == STEPS
    n = _assert_same_tensors(_dcp_tensors(b_ckpt, tmp_path), _dcp_tensors(a_ckpt, tmp_path), "final checkpoint")
    assert n > 50
    print(f"\nkilled at step {world.killed_at}; test loss A {a['test']['loss']!r} B {b['test']['loss']!r}; "
          f"finished at s: {({k: round(v, 1) for k, v in world.seconds.items()})}")  # fmt: skip


def test_checkpoint_of_2_ranks_loads_on_1_and_trains_on(world: World, tmp_path: Path) -> None:
    assert world.codes["probe"] == [0], world.probe.tail()
    ckpt = _latest(world.snapshot)
    assert ckpt is not None
    assert json.loads((ckpt / "COMPLETE").read_text())["world_size"] == 2
    saved = _dcp_tensors(ckpt, tmp_path)
    loaded = torch.load(world.out / "probe" / "loaded.pt", weights_only=False)
    # Experts: 2 ranks x 4 (expert parallel) in the checkpoint, 8 in one plain BatchedExperts here.
    experts = [k for k in loaded["model"] if k.endswith("experts.w1")]
    assert experts and all(loaded["model"][k].shape[0] == 8 for k in experts)
    _assert_same_tensors(loaded["model"], saved["model"], "weights")
    _assert_same_tensors(loaded["optim"]["state"], saved["optim"]["state"], "optimizer states")
    # restore_weights (BEST/LATEST weights before testing) undoes a wipe of every weight.
    _assert_same_tensors(loaded["restored"], saved["model"], "restored weights")
    assert loaded["state"]["step"] == world.killed_at
    log = world.probe.log()
    assert "written by 2 rank(s), this run has 1" in log
    metrics = world.probe.metrics()
    assert metrics["world_size"] == 1 and metrics["steps"] == world.killed_at + MORE
    # Every test metric is a number (metrics.json writes an undefined one as null, with its reason listed).
    numbers = [v for task in metrics["test"]["tasks"].values() for v in task.values()]
    assert all(isinstance(v, int | float) and v == v for v in numbers), metrics.get("undefined_metrics")


@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_damaged_or_missing_checkpoint_is_a_clear_error(world: World, case: str) -> None:
    ranks, _, reason = CORRUPT_CASES[case]
    run = world.corrupt[case]
    assert world.codes[case] == [3] * ranks, run.tail()
    ckpt = f"{world.out / case / 'checkpoints'}"
    if case != "no_checkpoint":
        latest = _latest(world.snapshot)
        assert latest is not None
        ckpt += f"/{latest.name}"
    for rank in range(ranks):
        log = run.log(rank)
        assert "supermoe-rec: checkpoint error: " + ckpt in log, log[-2000:]
        assert reason in log, log[-2000:]
    assert not (run.run_dir / "metrics.json").exists()
    assert "epoch 0:" not in run.log(0)  # no training started


def test_crash_mid_save_resumes_from_previous_checkpoint(world: World) -> None:
    assert world.codes["crash"] == [0], world.crash.tail()
    good = _latest(world.snapshot)
    assert good is not None
    assert f"loaded {world.crash.run_dir / 'checkpoints' / good.name}" in world.crash.log()
    assert world.crash.metrics()["steps"] == world.killed_at
    checkpoints = world.crash.run_dir / "checkpoints"
    assert not (checkpoints / f"ckpt-{world.killed_at + EVERY:06d}-step{world.killed_at + EVERY}").exists()
    latest = _latest(checkpoints)
    assert latest is not None and (latest / "COMPLETE").is_file() and _step(latest) == world.killed_at


def test_resaving_a_step_never_rewrites_the_checkpoint_a_pointer_names(tmp_path: Path) -> None:
    from supermoe_rec.config.experiment import ExperimentConfig
    from supermoe_rec.training.checkpoint import CheckpointManager

    manager = CheckpointManager(tmp_path, ExperimentConfig())
    assert manager._fresh_name("ckpt-000008-last") == "ckpt-000008-last"
    (tmp_path / "LATEST").write_text("ckpt-000008-last\n")
    (tmp_path / "BEST").write_text("ckpt-000008-last.1\n")
    assert manager._fresh_name("ckpt-000008-last") == "ckpt-000008-last.2"
    assert manager._fresh_name("ckpt-000008-best") == "ckpt-000008-best"


def test_the_manager_saves_a_dcp_stateful_not_a_trainer() -> None:
    import inspect

    from torch.distributed.checkpoint.stateful import Stateful

    from supermoe_rec.training.checkpoint import CheckpointManager, TrainState

    model = torch.nn.Linear(3, 2)
    state = TrainState(model)
    assert isinstance(state, Stateful)
    assert state.state_dict().keys() == {"model"}  # no optimizer: the weights alone
    other = TrainState(torch.nn.Linear(3, 2))
    other.load_state_dict(state.state_dict())
    assert torch.equal(other.model.weight, model.weight)
    for method in (CheckpointManager.save, CheckpointManager.load, CheckpointManager.restore_weights):
        assert "train_state" in inspect.signature(method).parameters, method


# ------------------------------------------------------------------------------------------------------ probe


def _full(obj: Any) -> Any:
    """Nested state with sharded tensors (all shards local: one rank) assembled into plain tensors."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(obj, dict):
        return {k: _full(v) for k, v in obj.items()}
    if isinstance(obj, ShardedTensor):
        full = torch.zeros(obj.size(), dtype=obj.dtype)
        for shard in obj.local_shards():
            index = tuple(
                slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True)
            )
            full[index] = shard.tensor
        return full
    if isinstance(obj, DTensor):
        return obj.full_tensor()
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return obj


def probe(argv: list[str]) -> int:
    """1 rank: load the run's LATEST checkpoint, dump weights, optimizer states and state, then train on."""
    import torch.distributed as dist

    from supermoe_rec.config.experiment import load_config
    from supermoe_rec.distributed.process_group import init_distributed
    from supermoe_rec.training.checkpoint import CheckpointManager
    from supermoe_rec.training.trainer import build_trainer, train

    cfg = load_config(argv[argv.index("--config") + 1], [a for a in argv if a.startswith("--") and "=" in a])
    ctx = init_distributed("cpu")
    try:
        trainer = build_trainer(cfg, ctx)
        manager = CheckpointManager(trainer.run_dir / "checkpoints", cfg)
        state = manager.load(trainer.state, {})
        dump = {"model": _full(trainer.dmp.state_dict()), "optim": _full(trainer.optimizer.state_dict())}
        dump["state"] = state
        with torch.no_grad():
            for value in trainer.dmp.state_dict().values():
                for t in [s.tensor for s in value.local_shards()] if hasattr(value, "local_shards") else [value]:
                    t.zero_()
        manager.restore_weights(trainer.state, tag="latest")
        dump["restored"] = _full(trainer.dmp.state_dict())
        torch.save(dump, trainer.run_dir / "loaded.pt")
        del trainer
        train(cfg)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["probe"]:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("supermoe_rec").setLevel(logging.INFO)
    sys.exit(probe(sys.argv[2:]))
