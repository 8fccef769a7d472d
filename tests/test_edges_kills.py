"""Kills, stops and rivals at every stage of a run: a SIGKILL in the middle of the store's
creation, a batch, a PNG, the journal, the manifest, the contact sheet or the MLflow upload,
then resume or sync; SIGTERM while MLflow is written; two runs in one folder; a sweep that
stops. Every finished image is kept, no MLflow run is doubled, no store is left broken."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from keyframes.outputs.files import whole_png
from keyframes.outputs.manifest import load_manifest
from keyframes.sync import main as sync_main
from tests.conftest import read_manifest
from tests.helpers import SMALL, killed_run, store_runs

IMAGES = 7  # the demo shotlist, one take each


def finished_on_disk(run_dir: Path) -> dict[Path, int]:
    """The keyframes a killed run leaves on record, whole: (file, mtime) to check they stay."""
    if not (run_dir / "manifest.json").exists():
        return {}
    records = load_manifest(run_dir / "manifest.json").images
    files = [run_dir / r.file for r in records if r.ok and whole_png(run_dir / r.file)]
    return {p: p.stat().st_mtime_ns for p in files}


def assert_complete_and_logged_once(run_dir: Path, store: Path, kept: dict[Path, int]):
    manifest = read_manifest(run_dir)
    assert manifest["run"]["status"] == "finished"
    assert len(manifest["images"]) == IMAGES
    assert all(whole_png(run_dir / r["file"]) for r in manifest["images"])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished work not made again
    [run] = store_runs(store)  # the store opens, and holds the run once
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == IMAGES
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generation", "png", "journal", "manifest", "contact_sheet"])
def test_a_kill_while_making_keyframes_loses_nothing_finished(tmp_path, cli_in_process, stage):
    run_dir, store = killed_run(tmp_path, stage)
    kept = finished_on_disk(run_dir)
    if stage != "contact_sheet":
        assert 0 < len(kept) < IMAGES, stage  # it was killed mid-run, with work to keep
    code, err, _, _ = cli_in_process(*SMALL, run_dir=run_dir, fresh_store=True)
    assert code == 0, err[-2000:]
    assert_complete_and_logged_once(run_dir, store, kept)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["store", "mlflow"])
def test_a_kill_while_logging_to_mlflow_is_finished_by_sync(tmp_path, stage):
    run_dir, store = killed_run(tmp_path, stage)
    kept = finished_on_disk(run_dir)
    assert len(kept) == IMAGES  # the keyframes were all made before the store was touched
    assert sync_main([str(run_dir)]) == 0
    assert sync_main([str(run_dir)]) == 0  # twice is harmless
    run = assert_complete_and_logged_once(run_dir, store, kept)
    client = MlflowClient(f"sqlite:///{store}")
    assert len(client.list_artifacts(run.info.run_id, "keyframes")) == IMAGES


def start(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "keyframes.run", "experiment=smoke", *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
def test_sigterm_while_mlflow_is_written_says_the_run_is_done_and_how_to_log_it(tmp_path):
    """The store is made slow to write (a transaction held open on it), and SIGTERM comes
    while the run waits on it."""
    import sqlite3

    from keyframes.tracking.store import _client

    store = tmp_path / "mlflow.db"
    _client(f"sqlite:///{store}")
    run_dir = tmp_path / "run"
    lock = sqlite3.connect(store)
    lock.execute("BEGIN EXCLUSIVE")
    proc = start(
        tmp_path, *SMALL, f"hydra.run.dir={run_dir}", f"mlflow.tracking_uri=sqlite:///{store}"
    )
    manifest = run_dir / "manifest.json"
    while not (manifest.exists() and '"status": "finished"' in manifest.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(0.5)  # now waiting for the locked store
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lock.rollback()
    assert proc.returncode == 130, err[-2000:]
    assert (
        f"interrupted while logging to MLflow: {IMAGES} finished keyframes are kept in {run_dir} "
        f"(the run is complete). Finish the MLflow run with: "
        f"uv run python -m keyframes.sync {run_dir}"
    ) in err
    assert "before any keyframe" not in err and "Traceback" not in err
    assert sync_main([str(run_dir)]) == 0
    [run] = store_runs(store)
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == IMAGES


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_touches_nothing(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "mlflow.db"
    where = (f"hydra.run.dir={run_dir}", f"mlflow.tracking_uri=sqlite:///{store}")
    first = start(tmp_path, *SMALL, "scorer=none", *where)
    while not (run_dir / "manifest.json").exists():
        assert first.poll() is None, first.stderr.read()[-2000:]
        time.sleep(0.05)
    second = start(tmp_path, *SMALL, "scorer=none", *where)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith(f"error: {run_dir} is in use by another keyframes run (pid {first.pid} on ")
    )
    assert "Traceback" not in err
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert len(read_manifest(run_dir)["images"]) == IMAGES
    [run] = store_runs(store)  # one MLflow run for the folder
    assert run.info.status == "FINISHED"


def test_bad_input_never_removes_a_folder_another_run_holds(tmp_path, refused_cli):
    from keyframes.outputs.folder_lock import hold_folder

    run_dir = tmp_path / "run"
    with hold_folder(run_dir):  # as a run that has not made its first keyframe yet
        result = refused_cli("experiment=smoke", "steps=0")
        assert result.returncode == 2
        assert run_dir.is_dir()


@pytest.mark.slow
def test_a_sweep_with_one_bad_job_starts_none_and_says_which(tmp_path):
    sweep_dir, store = tmp_path / "sweep", tmp_path / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            "experiment=smoke",
            "-m",
            "steps=1,0,2",
            "cfg_scale=5,abc",
            f"hydra.sweep.dir={sweep_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: 4 of 6 jobs of this sweep cannot run; none was started:")
    assert (
        "  job 2 (steps=0 cfg_scale=5): invalid settings:\n      steps=0: must be at least 1"
        in (proc.stderr)
    )
    assert "job 1 (steps=1 cfg_scale=abc): Error merging override cfg_scale=abc" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not sweep_dir.exists() and not store.exists()


@pytest.mark.slow
def test_a_sweep_stopped_midway_ends_its_parent_run_killed_with_what_finished(tmp_path):
    sweep_dir, store = tmp_path / "sweep", tmp_path / "mlflow.db"
    proc = start(
        tmp_path,
        "-m",
        "steps=2,3,4",
        "scorer=none",
        f"hydra.sweep.dir={sweep_dir}",
        f"mlflow.tracking_uri=sqlite:///{store}",
    )
    first = sweep_dir / "0" / "manifest.json"
    while not (first.exists() and json.loads(first.read_text())["run"].get("mlflow")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "the sweep stopped before its last job: its MLflow parent run is marked KILLED" in (
        out + err
    )
    assert "Traceback" not in err
    runs = store_runs(store)
    [parent] = [r for r in runs if r.data.tags.get("keyframes.sweep") == "true"]
    assert parent.info.status == "KILLED"
    assert parent.data.metrics["jobs"] >= 1  # the summary of what finished
    assert (sweep_dir / "summary" / "summary.csv").is_file()


def test_a_stop_while_hydra_composes_the_next_job_waits_for_that_job(
    tmp_path, monkeypatch, capsys, empty_store
):
    """A SIGTERM that landed inside OmegaConf's merge of a sweep's next job came out as an
    unrelated error ("'NoneType' object has no attribute '_invalidate_flags_cache'", exit 1,
    parent run left RUNNING). Hydra's work now finishes, and the stop comes at the job's start.
    """
    import shutil

    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from tests.conftest import cli_here

    compose, composed = ConfigLoaderImpl.load_sweep_config, []

    def compose_under_a_signal(self, master_config, sweep_overrides):
        # Hydra composes each job twice: to check the batch, then to launch it. The signal
        # comes as the second job is composed to launch; the first is finished and logged.
        if composed.count(sweep_overrides) == 1 and "steps=3" in sweep_overrides:
            os.kill(os.getpid(), signal.SIGTERM)  # Python handles it before the next line
        sweep_config = compose(self, master_config, sweep_overrides)
        composed.append(sweep_overrides)
        return sweep_config

    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", compose_under_a_signal)
    monkeypatch.chdir(tmp_path)
    sweep_dir, store = tmp_path / "sweep", tmp_path / "mlflow.db"
    shutil.copyfile(empty_store, store)
    code, out, err = cli_here(
        [
            "experiment=smoke",
            "-m",
            "steps=2,3",
            "scorer=none",
            f"hydra.sweep.dir={sweep_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        monkeypatch,
        capsys,
    )
    assert code == 130, err[-2000:]
    assert len(composed) == 4  # the signal did not cut Hydra's composition short
    assert "NoneType" not in out + err and "Error merging" not in out + err
    assert read_manifest(sweep_dir / "0")["run"]["status"] == "finished"
    assert not (sweep_dir / "1").exists()  # the stopped job left nothing behind
    [parent] = [r for r in store_runs(store) if r.data.tags.get("keyframes.sweep") == "true"]
    assert parent.info.status == "KILLED" and parent.data.metrics["jobs"] == 1
