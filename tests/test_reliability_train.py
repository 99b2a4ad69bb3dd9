"""Issue 14's done-when, on the real ``supermoe-rec train`` (subprocesses, MovieLens-100k, a tiny model).

One short run is trained into a temp ``out_dir``; then each refused request must exit 2 with one line naming the
offending key, path or row, and leave that run dir byte-identical:

- ``--train.name=../escape`` (a name that leaves ``out_dir``);
- a resume with a changed ``--model.encoder.d_model`` (refused before anything is written: config.yaml, plan.txt
  and the checkpoints stay as they were);
- a second run on a locked run dir;
- a table with a string timestamp.

Then a resume with changed hyper-parameters is refused without ``--train.resume_allow_changes`` and accepted with
it, the accepted changes printed and recorded in ``metrics.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from supermoe_rec.training.rundir import RunDirLock

from .test_reliability import BYO, CONFIG, SCHEMA, bad_timestamp_table, error_lines, run_cli, table_overrides

# Seven CLI runs (two of them train): about 4.5 minutes on 2 busy cores.
pytestmark = pytest.mark.slow

TINY = [
    f"--config={CONFIG}",
    "--train.tensorboard=false",
    "--train.num_threads=1",
    "--train.batch_size=512",
    "--train.eval_batch_size=16384",
    "--train.max_steps=2",
    "--model.encoder.num_layers=1",
    "--model.encoder.d_model=32",
    "--model.encoder.ffn_hidden=32",
    "--model.moe.expert_hidden=32",
]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    proc = run_cli("train", *TINY, f"--train.out_dir={out}", "--train.name=base")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "base" / "metrics.json").is_file() and (out / "base" / "checkpoints" / "LATEST").is_file()
    assert not (out / "base" / "LOCK").exists()  # released at the end of the run
    shutil.copytree(out / "base", pristine(out))  # as trained: later tests resume (and change) out/base
    return out


def pristine(out: Path) -> Path:
    """The fixture's run as it was trained, before any test resumed it."""
    return out.parent / f"{out.name}-pristine"


def refused(out: Path, *args: str, code: int = 2) -> str:
    """Run ``train`` on ``out/base`` with ``args``; check rc ``code``, one error line, no traceback and an untouched
    dir."""
    before = snapshot(out.parent)
    proc = run_cli("train", *TINY, f"--train.out_dir={out}", "--train.name=base", *args)
    assert proc.returncode == code, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    label = "checkpoint error" if code == 3 else "error"
    assert len(lines) == 1 and lines[0].startswith(f"supermoe-rec: {label}: "), proc.stderr[-4000:]
    assert snapshot(out.parent) == before
    return lines[0]


def test_a_name_outside_out_dir_is_refused(out: Path) -> None:
    # Before: --train.name=../escape trained into out_dir/../escape (and pruned ckpt-* dirs there).
    line = refused(out, "--train.name=../escape")
    assert "train.name: '../escape' must be one path component" in line
    assert not (out.parent / "escape").exists()


def test_a_changed_shape_resume_is_refused_before_anything_is_written(out: Path) -> None:
    # Before: config.yaml and plan.txt were overwritten, then DCP's CheckpointException (a BaseException) escaped
    # as a 77-line traceback, rc 1, and the run could no longer be exported.
    line = refused(out, "--train.resume=true", "--model.encoder.d_model=64")
    assert "model.encoder.d_model: 32 -> 64" in line and "refused" in line


def test_a_second_run_on_a_locked_run_dir_is_refused(out: Path) -> None:
    # Before: two concurrent runs of one train.name both exited 0 with a mixed run dir.
    with RunDirLock(out / "base"):
        line = refused(out, "--train.resume=true")
    assert f"is in use by another run (pid {os.getpid()} " in line


def test_a_string_timestamp_is_refused_naming_the_row(out: Path, tmp_path: Path) -> None:
    table = bad_timestamp_table(tmp_path)
    line = refused(out, f"--config={BYO}", *table_overrides(table), "--train.name=fresh")
    assert line.endswith(f"{table}: row 2, column 'ts': timestamp is not an integer: 'yesterday'")


def test_changed_hyper_parameters_need_resume_allow_changes(out: Path) -> None:
    # Before: --model.moe.top_k=1 --train.lr=0.5 resumed silently (rc 0) and changed the test metrics.
    changed = ["--train.resume=true", "--model.moe.top_k=1", "--train.lr=0.5"]
    line = refused(out, *changed)
    assert "not allowed: model.moe.top_k: 2 -> 1; train.lr: 0.001 -> 0.5" in line
    assert "--train.resume_allow_changes=model.moe.top_k,train.lr" in line
    allow = "--train.resume_allow_changes=model.moe.top_k,train.lr"
    proc = run_cli("train", *TINY, f"--train.out_dir={out}", "--train.name=base", *changed, allow)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resume: accepted change model.moe.top_k: 2 -> 1" in proc.stderr
    assert "resume: accepted change train.lr: 0.001 -> 0.5" in proc.stderr
    metrics = json.loads((out / "base" / "metrics.json").read_text())
    assert metrics["resume_changes"] == [
        {"key": "model.moe.top_k", "from": 2, "to": 1},
        {"key": "train.lr", "from": 0.001, "to": 0.5},
    ]


# ------------------------------------------------------------------------------------------- issue 25


def test_a_fresh_run_with_the_name_of_a_finished_run_is_refused(out: Path) -> None:
    # Before: train with the name of a finished run and no --train.resume pruned its checkpoints and replaced its
    # metrics.json without a word. refused() checks that every file of the run stays byte-identical.
    line = refused(out)
    assert f"{out / 'base'}: train.name 'base' already holds a run" in line
    assert "--train.resume=true" in line and "--train.name" in line and "--train.overwrite=true" in line


def _rehash(ckpt: Path, name: str) -> None:
    """Rewrite the COMPLETE manifest's entry of ``name`` to match the file, as anyone who can write it could."""
    import zlib

    manifest = json.loads((ckpt / "COMPLETE").read_text())
    data = (ckpt / name).read_bytes()
    manifest["files"][name] = [len(data), zlib.crc32(data)]
    (ckpt / "COMPLETE").write_text(json.dumps(manifest))


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file exists afterwards iff the pickle's code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def test_a_crafted_checkpoint_metadata_runs_no_code(out: Path, tmp_path: Path) -> None:
    # Before: export and resume read DCP's .metadata with pickle.load, so the payload created the file.
    import pickle

    run = tmp_path / "runs" / "base"
    shutil.copytree(pristine(out), run)
    marker = tmp_path / "pwned"
    for ckpt in (run / "checkpoints").glob("ckpt-*"):
        metadata = pickle.loads((ckpt / ".metadata").read_bytes())  # the file the fixture's run just wrote
        metadata.planner_data = _CreatesFile(marker)  # a valid metadata file but for one crafted field
        (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
        _rehash(ckpt, ".metadata")
    proc = run_cli("export", "--run", str(run), "--out", str(tmp_path / "u.parquet"))
    assert not marker.exists()
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert ".metadata: refused to load the checkpoint's metadata" in line and "is not allowed" in line, line
    assert not (tmp_path / "u.parquet").exists()
    proc = run_cli("train", *TINY, f"--train.out_dir={run.parent}", "--train.name=base", "--train.resume=true")
    assert not marker.exists()
    assert proc.returncode == 3 and "refused to load the checkpoint's metadata" in proc.stderr, proc.stderr[-4000:]


def test_a_pointer_leading_out_of_the_run_is_refused(out: Path, tmp_path: Path) -> None:
    # Before: LATEST holding ../../x was followed outside the checkpoints folder.
    run = tmp_path / "runs" / "base"
    shutil.copytree(pristine(out), run)
    outside = tmp_path / "elsewhere"
    shutil.copytree(next((run / "checkpoints").glob("ckpt-*")), outside)
    (run / "checkpoints" / "LATEST").write_text("../../../elsewhere")
    proc = run_cli("train", *TINY, f"--train.out_dir={run.parent}", "--train.name=base", "--train.resume=true")
    assert proc.returncode == 3, proc.stderr[-4000:]
    (line,) = error_lines(proc.stderr)
    assert "LATEST: names '../../../elsewhere', which is not a checkpoint folder" in line, line


def test_a_resume_on_changed_data_is_refused_naming_the_file(out: Path, tmp_path: Path) -> None:
    # Before: the same data settings on other rows resumed silently (rc 0), mixing two datasets in one run.
    import zipfile

    from supermoe_rec.config.experiment import DataConfig
    from supermoe_rec.data.movielens import RECBOLE_ML100K, RECBOLE_WHEEL_FILE

    wheel = Path(DataConfig().cache_dir).expanduser() / RECBOLE_WHEEL_FILE
    assert wheel.is_file(), "the fixture's run read MovieLens-100k from this wheel"
    cache = tmp_path / "cache"
    cache.mkdir()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(cache / RECBOLE_WHEEL_FILE, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == f"{RECBOLE_ML100K}.inter":
                data = b"\n".join(data.rstrip(b"\n").split(b"\n")[:-1000]) + b"\n"  # the last 1000 ratings gone
            dst.writestr(info, data)
    runs = tmp_path / "runs"
    shutil.copytree(pristine(out), runs / "base")
    line = refused(runs, "--train.resume=true", f"--data.cache_dir={cache}", "--data.try_url=false")
    assert line.startswith(f"supermoe-rec: error: {cache / RECBOLE_WHEEL_FILE} (ml100k-mt/"), line
    assert "train.resume: the data of split" in line and "changed since the checkpoint" in line, line
    # The same rows from another place resume: the fingerprint is of the rows, not of the path.
    shutil.copy(wheel, cache / RECBOLE_WHEEL_FILE)
    proc = run_cli("train", *TINY, f"--train.out_dir={runs}", "--train.name=base", "--train.resume=true",
                   f"--data.cache_dir={cache}", "--train.max_steps=3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------- serving: embed, retrieve


@pytest.fixture(scope="module")
def artifact(out: Path) -> Path:
    """The fixture's run exported as an inference artifact (CLI ``export --artifact``)."""
    path = out.parent / f"{out.name}-artifact"
    proc = run_cli("export", "--run", str(pristine(out)), "--artifact", str(path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return path


@pytest.fixture(scope="module")
def events(out: Path) -> Path:
    """200 test-split events of the fixture's run, one row per event, as parquet."""
    from supermoe_rec.config.experiment import DataConfig, load_config
    from supermoe_rec.data.movielens import fetch_movielens
    from supermoe_rec.data.protocol import build_ml_mt

    cfg = load_config(pristine(out) / "config.yaml")
    ml = fetch_movielens("ml100k", cfg.data.cache_dir, try_url=False, url_timeout_s=DataConfig().url_timeout_s)
    test = build_ml_mt(ml, cfg.data).frames["test"].head(200)
    path = out.parent / f"{out.name}-events.parquet"
    test[["user_id", "timestamp", "item", "user", "age", "gender", "occupation", "zip3"]].to_parquet(path)
    return path


def cli_refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """``supermoe-rec *args`` in-process: exit code 2 and one error line, which is returned."""
    from supermoe_rec import cli

    capsys.readouterr()
    assert cli.main(list(args)) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("supermoe-rec: error: "), lines
    return lines[0]


def test_retrieve_refuses_vectors_of_another_artifact(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: retrieve scored another artifact's vectors against this artifact's items (rc 0, meaningless items).
    from supermoe_rec import cli

    vectors = tmp_path / "vectors.parquet"
    assert cli.main(["embed", "--artifact", str(artifact), "--events", str(events), "--out", str(vectors)]) == 0
    other = tmp_path / "other"
    shutil.copytree(artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["source"]["step"] = manifest["source"].get("step", 0) + 1  # another export: another manifest
    (other / "manifest.json").write_text(json.dumps(manifest))
    line = cli_refused(capsys, "retrieve", "--artifact", str(other), "--vectors", str(vectors), "--out",
                       str(tmp_path / "topk.parquet"))  # fmt: skip
    assert f"{vectors}: these vectors were made by another artifact ({artifact}" in line, line
    assert not (tmp_path / "topk.parquet").exists()
    assert cli.main(["retrieve", "--artifact", str(artifact), "--vectors", str(vectors), "--out",
                     str(tmp_path / "topk.parquet")]) == 0  # fmt: skip


def test_embed_refuses_to_overwrite_its_events(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: --out equal to --events replaced the events with the vectors.
    copy = tmp_path / "events.parquet"
    shutil.copy(events, copy)
    before = copy.read_bytes()
    line = cli_refused(capsys, "embed", "--artifact", str(artifact), "--events", str(copy), "--out", str(copy))
    assert f"--out: {copy} is also an input of this command" in line, line
    assert copy.read_bytes() == before


def test_an_artifact_manifest_naming_a_file_outside_it_is_refused(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: a manifest listing ../secret.txt read that file, and the size check printed its size.
    secret = tmp_path / "secret.txt"
    secret.write_text("12345")
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["../secret.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = cli_refused(capsys, "embed", "--artifact", str(copy), "--events", str(events), "--out",
                       str(tmp_path / "v.parquet"))  # fmt: skip
    assert line.endswith(f"{copy}: the manifest lists '../secret.txt', a path outside the artifact"), line
    assert "5 bytes" not in line


def test_a_pickle_in_an_artifact_file_is_an_artifact_error(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: weights_only stopped the payload, but its UnpicklingError escaped as a traceback (rc 1).
    import hashlib
    import pickle

    marker = tmp_path / "pwned"
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    (copy / "tables.pt").write_bytes(pickle.dumps(_CreatesFile(marker)))
    manifest = json.loads((copy / "manifest.json").read_text())
    data = (copy / "tables.pt").read_bytes()
    manifest["files"]["tables.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    line = cli_refused(capsys, "embed", "--artifact", str(copy), "--events", str(events), "--out",
                       str(tmp_path / "v.parquet"))  # fmt: skip
    assert f"{copy / 'tables.pt'}: not a file of tensors; refused to load it" in line, line
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--k", "0"], "--k: must be at least 1, got 0"),
        (["--k", "-3"], "--k: must be at least 1, got -3"),
        (["--index", "faiss", "--nprobe", "0"], "--nprobe: must be at least 1, got 0"),
        (["--nprobe", "-5"], "--nprobe: must be at least 1, got -5"),
        (["--column", "user_id"], "column 'user_id': does not hold vectors (vector columns: ['user', 'task_watch'"),
        (["--out", "{tmp}/topk.csv"], "--out: {tmp}/topk.csv: the result is parquet; name the file *.parquet"),
        (["--out", "{tmp}"], "--out: {tmp} is a directory; name the file to write"),
    ],
)
def test_retrieve_options_are_checked(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Before: ValueError / TypeError / faiss tracebacks, and parquet written under a .csv name.
    from supermoe_rec import cli

    vectors = tmp_path / "vectors.parquet"
    assert cli.main(["embed", "--artifact", str(artifact), "--events", str(events), "--out", str(vectors)]) == 0
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = ["retrieve", "--artifact", str(artifact), "--vectors", str(vectors), "--out", str(tmp_path / "t.parquet")]
    line = cli_refused(capsys, *base, *args)
    assert message.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "t.parquet").exists() and not (tmp_path / "topk.csv").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
        (["--out", "{tmp}/v.csv"], "--out: {tmp}/v.csv: the result is parquet; name the file *.parquet"),
        (["--out", "{tmp}"], "--out: {tmp} is a directory; name the file to write"),
    ],
)
def test_embed_options_are_checked(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # Before: --batch-size 0 was accepted, v.csv held parquet, and a directory --out gave a traceback.
    base = ["embed", "--artifact", str(artifact), "--events", str(events), "--out", str(tmp_path / "v.parquet")]
    line = cli_refused(capsys, *base, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert message.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "v.parquet").exists() and not (tmp_path / "v.csv").exists()


def test_an_early_stopping_metric_of_an_unknown_task_leaves_no_run_dir(out: Path) -> None:
    # Before: refused only at the first validation, after the run dir, config.yaml and plan.txt were written.
    line = refused(out, "--train.name=esm", "--train.early_stopping_metric=nosuch.auc")
    assert "train.early_stopping_metric: 'nosuch.auc' is not a valid metric" in line and "'watch'" in line, line
    assert not (out / "esm").exists()


def _shop_csv(path: Path, edit: dict[str, str]) -> Path:
    """bad_timestamp_table's shop rows, valid, with some columns replaced (column -> value for every row)."""
    import pandas as pd

    frame = pd.read_csv(bad_timestamp_table(path.parent)).drop(index=2)  # the row with the bad timestamp
    for column, value in edit.items():
        frame[column] = value
    frame.to_csv(path, index=False)
    return path


def test_a_task_without_train_labels_is_refused(out: Path, tmp_path: Path) -> None:
    # Before: a task whose train labels are all missing trained nothing and still reported a test AUC of 0.50.
    table = _shop_csv(tmp_path / "train.csv", {"dwell_seconds": ""})
    line = refused(out, f"--config={BYO}", *table_overrides(table), "--train.name=nolabels")
    assert f"{table}: task 'dwell' has no labelled row in the train split" in line, line
    assert "--data.tasks=[click,purchase]" in line
    assert not (out / "nolabels").exists()


def test_metrics_undefined_on_a_split_are_null_in_valid_json(out: Path, tmp_path: Path) -> None:
    # Before: a test split of one class wrote NaN into metrics.json, which strict JSON readers refuse.
    train = _shop_csv(tmp_path / "train.csv", {})
    test = _shop_csv(tmp_path / "test.csv", {"clicked": "0"})  # one class: AUC is not defined
    table = [f"--data.schema={SCHEMA}", f"--data.table={train}", f"--data.test_table={test}",
             "--data.valid_table=null"]  # fmt: skip
    proc = run_cli("train", *TINY, f"--config={BYO}", *table, f"--train.out_dir={tmp_path}", "--train.name=nan")
    assert proc.returncode == 0, proc.stderr[-4000:]

    def no_constants(name: str) -> object:
        raise AssertionError(f"metrics.json holds {name}, which is not JSON")

    metrics = json.loads((tmp_path / "nan" / "metrics.json").read_text(), parse_constant=no_constants)
    assert metrics["test"]["tasks"]["click"]["auc"] is None
    assert "one class" in metrics["undefined_metrics"]["test.tasks.click.auc"]


# ---------------------------------------------------------------------------------------- interrupts, kills


def test_ctrl_c_says_what_was_saved_and_exits_130(tmp_path: Path) -> None:
    # Before: a KeyboardInterrupt traceback, exit 1, and no word of the checkpoint or how to resume.
    import signal
    import subprocess
    import sys
    import time

    args = [a for a in TINY if not a.startswith("--train.max_steps")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "supermoe_rec.cli", "train", *args, "--train.epochs=1000", "--train.checkpoint_every=1",
         f"--train.out_dir={tmp_path}", "--train.name=run"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    latest = tmp_path / "run" / "checkpoints" / "LATEST"
    deadline = time.monotonic() + 240
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert latest.is_file(), proc.communicate()[1][-4000:] if proc.poll() is not None else "no checkpoint in 240 s"
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-4000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-4000:]
    (line,) = error_lines(stderr)
    assert line.startswith(f"supermoe-rec: interrupted: the last checkpoint, {tmp_path / 'run' / 'checkpoints'}/")
    assert line.endswith("continue with the same command and --train.resume=true"), line
    assert not (tmp_path / "run" / "LOCK").exists()


def test_sigkill_during_a_checkpoint_save_keeps_the_previous_one_loadable(tmp_path: Path) -> None:
    # The test hook SIGKILLs the process inside the save of step 2: after its files, before its COMPLETE.
    from supermoe_rec.training.checkpoint import KILL_IN_SAVE_ENV

    run = [*TINY, f"--train.out_dir={tmp_path}", "--train.name=run", "--train.checkpoint_every=1"]
    proc = run_cli("train", *run, "--train.max_steps=3", env={KILL_IN_SAVE_ENV: "2"})
    assert proc.returncode == -9, proc.stderr[-4000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "LATEST").read_text().strip() == "ckpt-000001-step1"
    partial = checkpoints / "ckpt-000002-step2"
    assert (partial / ".metadata").is_file() and not (partial / "COMPLETE").exists()  # killed mid-save indeed
    proc = run_cli("train", *run, "--train.max_steps=3", "--train.resume=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from step 1 " in proc.stderr, proc.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 3


# ------------------------------------------------------------------------------------------------ messages


def test_export_of_a_run_without_checkpoint_gives_export_advice(out: Path, tmp_path: Path) -> None:
    # Before: "run without train.resume to start from scratch", advice for train.
    run = tmp_path / "run"
    shutil.copytree(pristine(out), run)
    shutil.rmtree(run / "checkpoints")
    proc = run_cli("export", "--run", str(run), "--out", str(tmp_path / "u.parquet"))
    assert proc.returncode == 3, proc.stderr[-4000:]
    (line,) = error_lines(proc.stderr)
    assert "no checkpoint to load the weights from" in line and "train it first" in line, line
    assert "train.resume" not in line


def test_export_onto_another_runs_artifact_needs_overwrite(out: Path, artifact: Path, tmp_path: Path) -> None:
    # Before: export --artifact deleted the other run's artifact at once and wrote its own (rc 0).
    other_run = tmp_path / "other"
    shutil.copytree(pristine(out), other_run)
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target)
    before = snapshot(target)
    proc = run_cli("export", "--run", str(other_run), "--artifact", str(target))
    assert proc.returncode == 2, proc.stderr[-4000:]
    (line,) = error_lines(proc.stderr)
    assert f"--artifact: {target} holds the artifact of another run ({pristine(out).resolve()})" in line, line
    assert "--overwrite" in line
    assert snapshot(target) == before
    proc = run_cli("export", "--run", str(other_run), "--artifact", str(target), "--overwrite")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((target / "manifest.json").read_text())["source"]["run"] == str(other_run.resolve())


def test_embed_names_the_events_column_and_row_of_an_unknown_item(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "column 'history': id 99999 is outside table 'item'": no such column in the file, and no row.
    import pandas as pd

    frame = pd.read_parquet(events)
    frame.loc[frame.index[5], "item"] = 99999
    bad = tmp_path / "events.parquet"
    frame.to_parquet(bad)
    line = cli_refused(capsys, "embed", "--artifact", str(artifact), "--events", str(bad), "--out",
                       str(tmp_path / "v.parquet"))  # fmt: skip
    assert f"{bad}: row 5, column 'item': id 99999 is outside table 'item'" in line, line


def test_data_summary_out_onto_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Before: FileExistsError traceback (after the whole data load).
    file = tmp_path / "summary"
    file.write_text("mine")
    line = cli_refused(capsys, "data", "summary", "--config", str(CONFIG), "--out", str(file))
    assert line == f"supermoe-rec: error: --out: {file} is a file; name a directory"
    assert file.read_text() == "mine"


# The public Amazon sequences lie next to the repository (CI sets SUPERMOE_REQUIRE_SHARED_DATA=1: absent, it fails).
AMAZON = (
    Path(os.environ.get("SUPERMOE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "amazon"
)


@pytest.mark.skipif(
    not (AMAZON / "Beauty.txt").is_file() and os.environ.get("SUPERMOE_REQUIRE_SHARED_DATA") != "1",
    reason=f"the public Amazon sequences are not at {AMAZON} (set SUPERMOE_SHARED_DATA to their folder)",
)
def test_the_amazon_config_trains(tmp_path: Path) -> None:
    # Before: there was no Amazon config; the ml100k one with --data.source=amazon_beauty ended in a traceback.
    proc = run_cli(
        "train", "--config=configs/amazon_beauty.yaml", f"--data.sequences_dir={AMAZON}", "--train.max_steps=2",
        f"--train.out_dir={tmp_path}", "--train.tensorboard=false", "--train.num_threads=1",
        "--train.eval_batch_size=16384",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "amazon-beauty-supermoe" / "metrics.json").read_text())
    assert metrics["test"]["next_item"]["targets"] == 22_363  # one test target per user


def test_embed_reads_csv_lists_in_every_form_training_reads(
    artifact: Path, events: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # One list parser for training and serving (supermoe_rec/data/lists.py): the same users in a parquet with
    # list cells and a CSV with "[1 2]", "[]", "1 2" and JSON text give the same vectors.
    import numpy as np
    import pandas as pd

    from supermoe_rec import cli

    frame = pd.read_parquet(events).drop_duplicates("user_id").head(4).reset_index(drop=True)
    histories = [[1, 2], [], [3, 4, 5], [6]]
    frame["history"] = histories
    parquet = tmp_path / "users.parquet"
    frame.to_parquet(parquet)
    as_text = frame.copy()
    as_text["history"] = ["[1 2]", "[]", "3 4 5", "[6]"]
    csv = tmp_path / "users.csv"
    as_text.to_csv(csv, index=False)
    for source, out in ((parquet, tmp_path / "a.parquet"), (csv, tmp_path / "b.parquet")):
        assert cli.main(["embed", "--artifact", str(artifact), "--events", str(source), "--out", str(out)]) == 0, (
            capsys.readouterr().err
        )
    a, b = pd.read_parquet(tmp_path / "a.parquet"), pd.read_parquet(tmp_path / "b.parquet")
    assert [list(s) for s in b["seen_items"]] == histories
    np.testing.assert_allclose(np.stack(a["user"].to_numpy()), np.stack(b["user"].to_numpy()), atol=1e-6)
