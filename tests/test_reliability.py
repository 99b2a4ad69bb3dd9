"""Issue 14: refuse what cannot be done safely, and make every bad input one clear line with a documented exit code.

Unit checks of the run-dir lock, the run name and the resume policy run in-process; the CLI checks run the real
``supermoe-rec`` entry point (``python -m supermoe_rec.cli``) in subprocesses, as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from supermoe_rec import cli
from supermoe_rec.config.experiment import ConfigError
from supermoe_rec.data.errors import DataError
from supermoe_rec.errors import exit_code, one_line
from supermoe_rec.training.rundir import LOCK_FILE, RunDirLock, RunDirLocked, check_run_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "ml100k.yaml"
SCHEMA = ROOT / "configs" / "schema_example.yaml"
BYO = ROOT / "configs" / "byo.yaml"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "supermoe_rec.cli", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("supermoe-rec:")]


def bad_timestamp_table(tmp_path: Path) -> Path:
    """The example schema's table as CSV, with a string where row 2's timestamp should be."""
    rows = [
        "user_id,request_id,ts,country,categories,history,item_id,price,clicked,purchased,purchase_known,dwell_seconds",
        "7,r1,100,de,1 2,10 11,12,9.5,1,1,1,30.0",
        "9,r3,300,fr,3,,40,1.0,0,0,1,",
        "7,r1,yesterday,de,,10 11,13,3.0,0,,0,",
        "9,r3,300,fr,4 5 6,,41,2.5,1,0,1,12.5",
    ]
    path = tmp_path / "shop.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def table_overrides(table: Path) -> list[str]:
    """configs/byo.yaml's overrides for the example schema and ``table`` as the only split."""
    return [f"--data.schema={SCHEMA}", f"--data.table={table}", "--data.valid_table=null", "--data.test_table=null"]


# ------------------------------------------------------------------------------------ 5: CLI error mapping


def test_exit_codes_of_the_projects_errors() -> None:
    from supermoe_rec.training.checkpoint import CheckpointError

    try:
        from supermoe_rec.studies.executor import RunError
    except ImportError:  # before compare's run executor had its own module
        from supermoe_rec.studies.compare import CompareError as RunError  # type: ignore[attr-defined,no-redef]

    assert exit_code(ConfigError("x")) == 2
    assert exit_code(DataError("t.csv", "bad", row=1, column="c")) == 2
    assert exit_code(RunDirLocked("locked")) == 2
    assert exit_code(CheckpointError("gone")) == 3
    assert exit_code(RunError("a run failed")) == 1
    assert exit_code(ValueError("a bug")) is None
    assert one_line(ConfigError("a:\n  b\n\n c")) == "a: b c"


def test_train_prints_a_data_error_as_one_line_with_exit_code_2(tmp_path: Path) -> None:
    # Before: `supermoe-rec train` printed the DataError as a traceback, rc 1 (data summary gave rc 2).
    args = ["train", "--config", str(BYO), *table_overrides(bad_timestamp_table(tmp_path))]
    args += [f"--train.out_dir={tmp_path / 'runs'}", "--train.tensorboard=false"]
    table = tmp_path / "shop.csv"
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [
        f"supermoe-rec: error: {table}: row 2, column 'ts': timestamp is not an integer: 'yesterday'"
    ]
    assert not (tmp_path / "runs").exists()


def test_debug_flag_or_environment_prints_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {source: ml100k\n")
    monkeypatch.delenv("SUPERMOE_REC_DEBUG", raising=False)
    assert cli.main(["data", "summary", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(error_lines(err)) == 1 and "bad.yaml: not valid YAML" in err
    assert cli.main(["--debug", "data", "summary", "--config", str(bad)]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    assert cli.main(["data", "summary", "--config", str(bad), "--debug"]) == 2  # after the command, too
    assert "Traceback (most recent call last)" in capsys.readouterr().err
    monkeypatch.setenv("SUPERMOE_REC_DEBUG", "1")
    assert cli.main(["data", "summary", "--config", str(bad)]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_malformed_schema_yaml_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a raw yaml.parser.ParserError traceback.
    schema = tmp_path / "schema.yaml"
    schema.write_text("user_column: u\ntables: [{name: item\n")
    argv = ["data", "summary", "--config", str(CONFIG), "--data.source=table", f"--data.schema={schema}"]
    assert cli.main([*argv, f"--data.table={tmp_path / 't.csv'}"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"supermoe-rec: error: {schema}: not valid YAML: ")
    assert lines[0].endswith("(line 3, column 1)")


# ------------------------------------------------------------------------------------------ 4: train.name


@pytest.mark.parametrize("name", ["../x", "../../x", "/abs/x", "a/b", "..", ".", "", ".hidden", "-x", "a\nb", "é"])
def test_unsafe_run_names_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match=r"^train.name: .* must be one path component"):
        check_run_name(name)


@pytest.mark.parametrize("name", ["ml100k-supermoe", "supermoe-multi-seed0-1a2b3c4d", "run_1.2", "a+b=c@d"])
def test_safe_run_names_pass(name: str) -> None:
    check_run_name(name)


# ---------------------------------------------------------------------------------------------- 3: the lock


def test_second_lock_names_the_holder_and_release_leaves_the_dir_as_it_was(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}\n")
    with RunDirLock(run) as lock:
        assert lock.held and (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunDirLocked, match=rf"^{run}: the run dir is in use by another run \(pid {os.getpid()} "):
            RunDirLock(run).acquire()
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]
    RunDirLock(run).acquire().release()  # free again


def test_a_fresh_dir_refused_before_any_write_is_removed(tmp_path: Path) -> None:
    RunDirLock(tmp_path / "out" / "new").acquire().release()
    assert not (tmp_path / "out").exists()


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = f"from supermoe_rec.training.rundir import RunDirLock; RunDirLock({str(run)!r}).acquire(); print('locked')"
    holder = subprocess.Popen(
        [sys.executable, "-u", "-c", code + "; import time; time.sleep(600)"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} "):
            RunDirLock(run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert (run / LOCK_FILE).read_text().split()[0] == str(holder.pid)  # left behind by the killed run
    lock = RunDirLock(run).acquire()
    assert lock.took_over.split()[0] == str(holder.pid)
    assert (run / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    lock.release()


def test_lock_is_exclusive_across_processes_racing_for_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = (
        "import sys, time\nfrom supermoe_rec.training.rundir import RunDirLock, RunDirLocked\n"
        f"deadline = time.time() + 3\nwins = 0\n"
        "while time.time() < deadline:\n"
        f"    try:\n        lock = RunDirLock({str(run)!r}).acquire()\n    except RunDirLocked:\n        continue\n"
        f"    marker = {str(tmp_path / 'inside')!r}\n"
        "    open(marker, 'x').close()  # fails if another process is inside too\n"
        "    time.sleep(0.001)\n    import os; os.unlink(marker)\n    lock.release()\n    wins += 1\n"
        "print(wins)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    start = time.monotonic()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert int(out) > 0
    assert time.monotonic() - start < 60


# ----------------------------------------------------------------------------------- 8: shapes at config load


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--train.batch_size=-5", r"^train.batch_size: must be at least 1, got -5$"),
        ("--model.moe.top_k=9", r"^model.moe.top_k: 9 is more than model.moe.num_experts \(8\)$"),
        ("--model.encoder.num_heads=3", r"^model.encoder.num_heads: 3 does not divide model.encoder.d_model \(64\)$"),
        ("--model.encoder.d_model=0", r"^model.encoder.d_model: must be at least 1, got 0$"),
        ("--model.towers.hidden=[64,0]", r"^model.towers.hidden\[1\]: must be at least 1, got 0$"),
        ("--train.max_steps=-1", r"^train.max_steps: must be at least 0, got -1$"),
        ("--train.name=../escape", r"^train.name: '../escape' must be one path component"),
    ],
)
def test_shape_errors_are_config_errors_at_load(override: str, message: str) -> None:
    # Before: a negative batch size, top_k > num_experts or num_heads not dividing d_model failed after data loading
    # and model build, as tracebacks.
    from supermoe_rec.config.experiment import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(CONFIG, [override])


def test_shape_error_in_a_config_file_names_the_file_and_key(tmp_path: Path) -> None:
    from supermoe_rec.config.experiment import load_config

    path = tmp_path / "bad.yaml"
    path.write_text(CONFIG.read_text().replace("top_k: 2", "top_k: 12"))
    with pytest.raises(ConfigError, match=rf"^{path}: model.moe.top_k: 12 is more than model.moe.num_experts"):
        load_config(path)


def test_train_refuses_a_bad_shape_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", str(CONFIG), f"--train.out_dir={tmp_path}", "--model.moe.top_k=9"]
    assert cli.main(argv) == 2
    assert error_lines(capsys.readouterr().err) == [
        "supermoe-rec: error: model.moe.top_k: 9 is more than model.moe.num_experts (8)"
    ]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 1: the checkpoint's config, read before writes


def fake_checkpoint(root: Path, config_text: str) -> Path:
    """A LATEST checkpoint dir holding only config.yaml, with its size and CRC-32 in the COMPLETE manifest."""
    import zlib

    ckpt = root / "ckpt-000002-last"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(config_text)
    data = (ckpt / "config.yaml").read_bytes()
    manifest = {"format": 1, "files": {"config.yaml": [len(data), zlib.crc32(data)]}}
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))
    (root / "LATEST").write_text(ckpt.name)
    return ckpt / "config.yaml"


def test_the_checkpoint_config_is_read_and_a_damaged_one_is_a_checkpoint_error(tmp_path: Path) -> None:
    from supermoe_rec.config.experiment import load_config, save_config
    from supermoe_rec.training.checkpoint import CheckpointError, CheckpointManager

    cfg = load_config(CONFIG, ["--model.encoder.d_model=32"])
    save_config(cfg, tmp_path / "c.yaml")
    config = fake_checkpoint(tmp_path / "checkpoints", (tmp_path / "c.yaml").read_text())
    manager = CheckpointManager(tmp_path / "checkpoints", cfg)
    saved, source = manager.saved_config()
    assert saved == to_dict_plain(cfg) and source == str(config)
    # A damaged config.yaml is a damaged checkpoint (exit 3), never a "changed config" (exit 2).
    config.write_text(config.read_text().replace("d_model: 32", "d_model: 64"))  # same size, other CRC
    with pytest.raises(CheckpointError, match=r"checkpoint is corrupt: config.yaml fails its size/CRC-32 check"):
        manager.saved_config()
    (tmp_path / "checkpoints" / "LATEST").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from"):
        manager.saved_config()


def to_dict_plain(cfg: object) -> object:
    """The config as config.yaml holds it (lists, not tuples)."""
    from supermoe_rec.config.experiment import to_dict

    return yaml.safe_load(yaml.safe_dump(to_dict(cfg)))


# ------------------------------------------------------------------------------------------- issue 25


def test_overwrite_replaces_a_finished_run_and_nothing_else(tmp_path: Path) -> None:
    from supermoe_rec.training.rundir import check_fresh_start

    run = tmp_path / "run"
    (run / "checkpoints" / "ckpt-000001-last").mkdir(parents=True)
    (run / "checkpoints" / "LATEST").write_text("ckpt-000001-last")
    (run / "metrics.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run"):
        check_fresh_start(run, overwrite=False)
    assert (run / "checkpoints" / "LATEST").is_file()
    check_fresh_start(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    check_fresh_start(run, overwrite=False)  # an empty (or crashed, checkpoint-less) dir may start afresh


def test_the_load_planner_reads_values_without_running_code(tmp_path: Path) -> None:
    # DCP's own planner reads non-tensor values with torch.load(weights_only=False).
    import io
    import pickle

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from supermoe_rec.training.checkpoint import CheckpointError, SafeLoadPlanner

    marker = tmp_path / "pwned"

    class CreatesFile:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("optim.x"), (), MetadataIndex("optim.x"), (), ())
    with pytest.raises(CheckpointError, match=r"refused a value of the checkpoint \(optim.x\)"):
        SafeLoadPlanner().load_bytes(item, io.BytesIO(pickle.dumps(CreatesFile())))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["--train.resume=true", "--train.init_from=runs/pretrained"],
            "train.init_from: 'runs/pretrained' cannot be combined with train.resume=true",
        ),
        (["--train.resume=true", "--train.overwrite=true"], "train.overwrite: cannot be combined with train.resume"),
        (["--train.early_stopping_metric=watch.accuracy"], "train.early_stopping_metric: 'watch.accuracy' is not"),
        (["--train.early_stopping_metric=auc"], "train.early_stopping_metric: 'auc' is not a valid metric"),
        (
            ["--data.tasks=[watch]", "--train.early_stopping_metric=like.auc"],
            "train.early_stopping_metric: 'like.auc' is not a valid metric (use loss, <task>.<metric> of the tasks "
            "['watch']",
        ),
    ],
)
def test_option_conflicts_and_bad_metrics_are_refused_at_config_load(overrides: list[str], message: str) -> None:
    # Before: resume + init_from ignored init_from yet recorded it; a bad early_stopping_metric failed only after
    # the data load, leaving a half-made run dir.
    from supermoe_rec.config.experiment import load_config

    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, overrides)
    assert message in str(info.value)


def test_valid_early_stopping_metrics_load() -> None:
    from supermoe_rec.config.experiment import load_config

    for metric in ("loss", "watch.auc", "rating.rmse", "like.logloss", "next_item.ndcg@10"):
        assert load_config(CONFIG, [f"--train.early_stopping_metric={metric}"]).train.early_stopping_metric == metric


def _guard(tmp_path: Path, out_dir: Path, name: str = "run") -> None:
    from supermoe_rec.config.experiment import load_config
    from supermoe_rec.training.rundir import guard_run

    cfg = load_config(CONFIG, [f"--train.out_dir={out_dir}", f"--train.name={name}"])
    guard_run(cfg, out_dir / name, True, lambda: ({}, "none")).release()


def test_a_file_in_place_of_the_run_dir_or_checkpoints_is_refused(tmp_path: Path) -> None:
    # Before: NotADirectoryError tracebacks (out_dir a file; a file named checkpoints, after the data load).
    out_file = tmp_path / "runs.txt"
    out_file.write_text("not a dir")
    with pytest.raises(ConfigError, match=rf"^{out_file}: is a file, not a directory \(for {out_file}/run\)"):
        _guard(tmp_path, out_file)
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "checkpoints").write_text("not a dir")
    with pytest.raises(ConfigError, match=rf"^{run / 'checkpoints'}: is a file, not a directory"):
        _guard(tmp_path, tmp_path / "runs")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"]  # the lock was released and removed


def test_a_run_dir_that_cannot_be_written_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before: a read-only checkpoints dir trained first, then died with a PermissionError at the first save. As root
    # a mode of 0o555 does not stop writes, so the write probe itself is made to fail.
    import errno
    import tempfile

    def read_only(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied")

    (tmp_path / "runs" / "run" / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'runs' / 'run'}: not writable \(Permission denied\)"):
        _guard(tmp_path, tmp_path / "runs")


def test_ctrl_c_during_a_checkpoint_save_waits_for_the_save() -> None:
    import signal

    from supermoe_rec.training.checkpoint import _sigint_deferred

    done = []
    with pytest.raises(KeyboardInterrupt), _sigint_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a handler runs between bytecodes: the default one would raise here
        done.append("saved")
    assert done == ["saved"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_is_one_line_and_exit_130(capsys: pytest.CaptureFixture[str]) -> None:
    from supermoe_rec.errors import run_reporting

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_reporting(interrupted, on_interrupt=lambda: "the last checkpoint is kept") == 130
    assert capsys.readouterr().err == "\nsupermoe-rec: interrupted: the last checkpoint is kept\n"


def test_task_weights_of_another_source_are_refused_at_config_load() -> None:
    # Before: --data.source=amazon_beauty on the ml100k config ended, after the data load, in a ValueError traceback
    # (task_weights: unknown task(s) ['watch']): the check existed for table sources only.
    from supermoe_rec.config.experiment import load_config

    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, ["--data.source=amazon_beauty"])
    assert str(info.value) == (
        "train.loss.task_weights: unknown task(s) ['watch']: data.source 'amazon_beauty' has the tasks ['click']; "
        "configs/amazon_beauty.yaml is a config for this source"
    )
    with pytest.raises(ConfigError, match=r"^data.tasks: unknown task\(s\) \['click'\]: data.source 'ml100k' has"):
        load_config(CONFIG, ["--data.tasks=[click]"])
    for source in ("amazon_beauty", "amazon_sports"):
        assert load_config(ROOT / "configs" / f"{source}.yaml").data.source == source


def test_source_tasks_are_the_tasks_the_sources_build(ml100k_data: object, tmp_path: Path) -> None:
    from supermoe_rec.config.experiment import SOURCE_TASKS, DataConfig
    from supermoe_rec.data.splits import SplitData, load_data

    assert isinstance(ml100k_data, SplitData)
    assert tuple(t.name for t in ml100k_data.tasks) == SOURCE_TASKS["ml100k"] == SOURCE_TASKS["ml1m"]
    (tmp_path / "seq.txt").write_text("1 1 2 3 4\n2 2 3 4 5\n")
    data = load_data(DataConfig(source="sequences", table=str(tmp_path / "seq.txt")))
    assert tuple(t.name for t in data.tasks) == SOURCE_TASKS["sequences"] == SOURCE_TASKS["amazon_beauty"]


def test_plan_json_onto_its_config_or_a_directory_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --json equal to --config replaced the config with the report; a directory gave a traceback.
    config = tmp_path / "ml100k.yaml"
    config.write_text(CONFIG.read_text())
    args = ["plan", "--config", str(config), "--world-size", "2", "--json"]
    assert cli.main([*args, str(config)]) == 2
    assert f"--json: {config} is also an input of this command" in capsys.readouterr().err
    assert config.read_text() == CONFIG.read_text()
    assert cli.main([*args, str(tmp_path)]) == 2
    assert f"--json: {tmp_path} is a directory" in capsys.readouterr().err


def test_report_writes_replace_a_file_whole_or_not_at_all(tmp_path: Path) -> None:
    """Reports (probe, suite, compare, ablate, scale, plots) go through a temporary file renamed into place."""
    from supermoe_rec.data.output import atomic_output, write_text

    report = tmp_path / "report.md"
    write_text(report, "first\n")
    with pytest.raises(RuntimeError), atomic_output(report) as part:
        part.write_text("half a")
        raise RuntimeError("the writer died")
    assert report.read_text() == "first\n"  # the old report is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]  # and no temporary file is left
    write_text(report, "second\n")
    assert report.read_text() == "second\n"
