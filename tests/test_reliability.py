"""When things go wrong: real runs of the tiny model with injected faults (in process, through
the real CLI entry point), killed and interrupted subprocesses, unreachable and locked stores."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from mlflow.tracking import MlflowClient

import keyframes.run as entry
from tests.conftest import read_manifest
from tests.helpers import SMALL, store_runs, tiny_pipe

ORIGINAL_CALL = StableDiffusionXLPipeline.__call__
FAULTS = (*SMALL, "speed.warm_up=false")  # faults are injected into batches, not the warm-up


def test_a_failing_batch_is_recorded_and_the_other_scenes_still_run(cli_in_process, monkeypatch):
    def call(self, *args, **kwargs):
        if any("fishing boat" in p for p in kwargs["prompt"]):
            raise RuntimeError("injected failure")
        return ORIGINAL_CALL(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, store = cli_in_process(*FAULTS)
    assert code == entry.EXIT_IMAGES_FAILED, err[-3000:]
    assert (
        "1 of 7 images failed:\n  keyframes/003_the-boat_t1.png: RuntimeError: injected failure"
        in err
    )
    manifest = read_manifest(run_dir)
    statuses = {r["scene_id"]: r["status"] for r in manifest["images"]}
    assert statuses.pop("the-boat") == "failed" and set(statuses.values()) == {"ok"}
    assert not (run_dir / "keyframes" / "003_the-boat_t1.png").exists()
    assert len(list((run_dir / "keyframes").glob("*.png"))) == 6
    assert (
        manifest["run"]["status"] == "failed" and manifest["run"]["summary"]["images_failed"] == 1
    )
    [run] = store_runs(store)
    assert run.info.status == "FAILED"
    assert run.data.metrics["images_failed"] == 1 and run.data.metrics["images"] == 6
    assert run.data.tags["failed_images"] == "keyframes/003_the-boat_t1.png"


def test_nan_in_the_decoded_image_is_decoded_again_in_float32(cli_in_process):
    vae = tiny_pipe().vae
    decode, calls = vae.decode, []

    def first_call_overflows(latents, *args, **kwargs):
        calls.append(latents.dtype)
        out = decode(latents, *args, **kwargs)
        if len(calls) == 1:  # as an fp16 VAE overflows: the first image comes out NaN
            out[0].fill_(float("nan"))
        return out

    vae.decode = first_call_overflows
    code, err, run_dir, store = cli_in_process(*FAULTS)
    assert code == 0, err
    records = read_manifest(run_dir)["images"]
    assert records[0]["notes"] == ["vae_fp32_redecode"] and records[0]["status"] == "ok"
    assert all(r["notes"] == [] for r in records[1:])
    assert calls[:2] == [torch.float32, torch.float32] and len(calls) == 8  # 7 images + 1 retry
    [run] = store_runs(store)
    assert run.data.metrics["vae_fp32_redecodes"] == 1


def test_nan_latents_fail_that_image_only(cli_in_process, monkeypatch):
    def call(self, *args, **kwargs):
        out = ORIGINAL_CALL(self, *args, **kwargs)
        if any("signal lamp" in p for p in kwargs["prompt"]):
            out.images[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, _ = cli_in_process(*FAULTS)
    assert code == entry.EXIT_IMAGES_FAILED, err[-3000:]
    [bad] = [r for r in read_manifest(run_dir)["images"] if r["status"] != "ok"]
    assert bad["scene_id"] == "signal" and "NaN/Inf" in bad["error"]
    assert bad["notes"] == ["vae_fp32_redecode"]  # it was tried again before giving up


def test_out_of_memory_halves_the_batch_and_records_it(cli_in_process, monkeypatch):
    sizes = []

    def call(self, *args, **kwargs):
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 1:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return ORIGINAL_CALL(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, store = cli_in_process(*FAULTS, "batch_size=4")
    assert code == 0, err
    assert sizes == [4, 2] + [1] * 7
    manifest = read_manifest(run_dir)
    assert [f["detail"] for f in manifest["run"]["fallbacks"]] == [
        "batch size 4 -> 2",
        "batch size 2 -> 1",
    ]
    assert all(r["status"] == "ok" for r in manifest["images"]) and len(manifest["images"]) == 7
    [run] = store_runs(store)
    assert json.loads(run.data.tags["fallbacks"])[0]["action"] == "halve_batch"


def test_out_of_memory_at_batch_one_tries_vae_tiling_then_gives_up(cli_in_process, monkeypatch):
    def call(self, *args, **kwargs):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, _ = cli_in_process(*FAULTS, "batch_size=2")
    assert code == entry.EXIT_IMAGES_FAILED, err[-3000:]
    manifest = read_manifest(run_dir)
    actions = [f["action"] for f in manifest["run"]["fallbacks"]]
    assert actions == ["halve_batch", "vae_tiling"]  # CPU offload needs a GPU: not tried on CPU
    assert {r["status"] for r in manifest["images"]} == {"failed"}
    assert "out of memory at batch size 1" in manifest["images"][0]["error"]
    assert "7 of 7 images failed" in err


# --- kill, interrupt, resume: real subprocesses -------------------------------------------

SLOW = ["experiment=smoke", "takes=2", "width=384", "height=216"]  # 14 images, a few seconds
IMAGES = 14


def start(cwd: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            *SLOW,
            *overrides,
            f"mlflow.tracking_uri=sqlite:///{cwd / 'mlflow.db'}",
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_images(manifest: Path, proc: subprocess.Popen, at_least: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            count = len(json.loads(manifest.read_text())["images"])
        except (OSError, ValueError):
            count = 0
        if count >= at_least:
            return count
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


@pytest.mark.slow
def test_killed_run_resumes_with_every_image_exactly_once(tmp_path):
    proc = start(tmp_path)
    runs = tmp_path / "outputs" / "runs"
    while not list(runs.glob("*/manifest.json")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    [manifest] = list(runs.glob("*/manifest.json"))
    wait_for_images(manifest, proc, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = read_manifest(manifest.parent)
    assert before["run"]["status"] == "running" and 3 <= len(before["images"]) < IMAGES
    kept = {r["file"]: (manifest.parent / r["file"]).stat().st_mtime_ns for r in before["images"]}
    assert not (tmp_path / "mlflow.db").exists() or not store_runs(tmp_path / "mlflow.db")

    time.sleep(1.1)  # a new Hydra run directory gets a new name
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            *SLOW,
            "resume=true",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (
        f"resuming {manifest.parent}: {len(before['images'])} of {IMAGES} images already done"
        in resumed.stdout + resumed.stderr
    )
    assert [p.parent for p in runs.glob("*/manifest.json")] == [
        manifest.parent
    ]  # no second run dir
    after = read_manifest(manifest.parent)
    files = [r["file"] for r in after["images"]]
    assert (
        len(files)
        == IMAGES
        == len(set(files))
        == len(list((manifest.parent / "keyframes").glob("*.png")))
    )
    assert after["run"]["status"] == "finished"
    assert all((manifest.parent / f).stat().st_mtime_ns == t for f, t in kept.items())  # not redone
    [run] = store_runs(tmp_path / "mlflow.db")
    assert run.data.metrics["images"] == IMAGES and run.info.status == "FINISHED"


@pytest.mark.slow
def test_sigterm_keeps_finished_work_marks_killed_and_resume_replaces_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(tmp_path, f"hydra.run.dir={run_dir}")
    wait_for_images(run_dir / "manifest.json", proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"finished keyframes kept in {run_dir}" in err
    manifest = read_manifest(run_dir)
    assert manifest["run"]["status"] == "interrupted"
    assert all((run_dir / r["file"]).is_file() for r in manifest["images"])
    [killed] = store_runs(tmp_path / "mlflow.db")
    assert killed.info.status == "KILLED"
    assert killed.data.metrics["images"] == len(manifest["images"])

    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            *SLOW,
            f"hydra.run.dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    [run] = store_runs(tmp_path / "mlflow.db")  # the KILLED run was replaced, not joined
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == IMAGES
    assert len(read_manifest(run_dir)["images"]) == IMAGES


def test_a_run_stopped_before_its_first_image_is_replaced_in_mlflow_when_resumed(
    cli_in_process, monkeypatch
):
    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C or SIGTERM during the first batch

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", stopped)
    code, err, run_dir, store = cli_in_process(*FAULTS)
    assert code == entry.EXIT_INTERRUPTED, err[-2000:]
    assert read_manifest(run_dir)["images"] == []
    [killed] = store_runs(store)
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", ORIGINAL_CALL)
    code, err, _, _ = cli_in_process(*SMALL, run_dir=run_dir)
    assert code == 0, err[-2000:]
    [run] = store_runs(store)  # the KILLED run was replaced, not joined
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == 7


def test_a_folder_made_with_other_settings_is_refused_unless_remade(cli_in_process):
    small = (*SMALL, "scorer=none")
    code, err, run_dir, store = cli_in_process(*small, "steps=1")
    assert code == 0, err[-2000:]
    pngs = sorted((run_dir / "keyframes").glob("*.png"))
    before = {p: p.read_bytes() for p in pngs}
    code, err, _, _ = cli_in_process(*small, "steps=2", "model.dtype=bfloat16", run_dir=run_dir)
    assert code == 2, err[-2000:]
    assert f"error: {run_dir} holds a run made with other settings:" in err
    assert "  model.dtype: auto then, bfloat16 now\n  steps: 1 then, 2 now\n" in err
    assert "add remake=true" in err
    assert {p: p.read_bytes() for p in pngs} == before  # nothing touched
    assert read_manifest(run_dir)["images"][0]["steps"] == 1

    code, err, _, _ = cli_in_process(*small, "steps=2", "remake=true", run_dir=run_dir)
    assert code == 0, err[-2000:]
    assert all(r["steps"] == 2 for r in read_manifest(run_dir)["images"])
    assert any(p.read_bytes() != data for p, data in before.items())  # made again
    [run] = store_runs(store)  # the old MLflow run was replaced, not kept beside it
    assert run.data.params["steps"] == "2" and run.info.status == "FINISHED"


# --- tracking outages ----------------------------------------------------------------------


def test_unreachable_store_keeps_the_run_and_sync_logs_it_once(run_cli, tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    result = run_cli(
        "experiment=smoke",
        f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"MLflow store http://127.0.0.1:{port} could not be written" in result.output
    assert f"uv run python -m keyframes.sync {result.run_dir}" in result.output
    manifest = read_manifest(result.run_dir)
    assert len(manifest["images"]) == 7 and "mlflow" not in manifest["run"]

    store = tmp_path / "later.db"

    def sync():  # its main in this process (the command itself: the next test)
        from keyframes.sync import main

        code = main([str(result.run_dir), "--tracking-uri", f"sqlite:///{store}"])
        return code, capsys.readouterr()

    (first, first_out), (second, second_out) = sync(), sync()
    assert first == 0 and first_out.out.startswith("logged MLflow run "), first_out.err
    assert second == 0 and second_out.out.startswith("already logged"), second_out.err
    [run] = store_runs(store)
    assert run.data.metrics["images"] == 7
    assert read_manifest(result.run_dir)["run"]["mlflow"]["run_id"] == run.info.run_id
    assert len(MlflowClient(f"sqlite:///{store}").list_artifacts(run.info.run_id, "keyframes")) == 7


def test_sync_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keyframes.sync", str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {tmp_path} is not a keyframes run directory: manifest.json is missing"
    )


@pytest.mark.slow
def test_locked_sqlite_store_is_retried(tmp_path, caplog, monkeypatch):
    from mlflow.store.db import utils as mlflow_db

    from keyframes.config.schema import TrackingConfig
    from keyframes.tracking.store import RunRecord, log_run

    # MLflow makes SQLite wait up to 20 s for a lock (a fixed PRAGMA); 2 s here, so that the
    # wait runs out and keyframes' retry is what gets the run logged, in seconds, not 22
    text = mlflow_db.sql.text
    monkeypatch.setattr(
        mlflow_db.sql,
        "text",
        lambda s, *a: text(s.replace("busy_timeout = 20000", "busy_timeout = 2000"), *a),
    )
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    record = RunRecord("locked", "r", {"a": "1"}, {}, {0: {"x": 1.0}}, {"images": 1.0}, key="k1")
    log_run(cfg, RunRecord("locked", "warm-up", {}, {}, {}, {}, key="k0"))  # tables exist

    lock = sqlite3.connect(tmp_path / "mlflow.db", check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(3.0, lock.rollback)  # longer than the 2 s wait
    release.start()
    run_id, created = log_run(cfg, record)
    release.join()
    assert created
    assert "tracking store is locked; retrying" in caplog.text  # MLflow's own wait ran out
    run = MlflowClient(cfg.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"a": "1"}


def test_a_new_stores_set_up_race_is_retried(monkeypatch, caplog):
    """What a process sees when another one creates the same new SQLite store at that moment."""
    from keyframes.tracking import store as tracking

    calls = []

    def racing():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(
                "Online migration expected to match one row when updating '0584bdc529eb' to "
                "'f5a4f2784254' in 'alembic_version'; 0 found"
            )
        return "run-id"

    monkeypatch.setattr(tracking.time, "sleep", lambda seconds: None)
    assert tracking._retry_when_locked(racing) == "run-id" and len(calls) == 2
    assert "tracking store is locked; retrying" in caplog.text


@pytest.mark.slow
def test_two_runs_creating_one_new_store_at_once_are_both_logged(tmp_path):
    code = (
        "import sys; from keyframes.config.schema import TrackingConfig; "
        "from keyframes.tracking.store import RunRecord, log_run; "
        f"log_run(TrackingConfig(tracking_uri='sqlite:///{tmp_path / 'new.db'}'), "
        "RunRecord('race', sys.argv[1], {}, {}, {0: {'x': 1.0}}, {'images': 1.0}, key=sys.argv[1]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, name], stderr=subprocess.PIPE, text=True)
        for name in ("first", "second")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert sorted(r.info.run_name for r in store_runs(tmp_path / "new.db")) == ["first", "second"]


@pytest.mark.slow
def test_sweep_without_a_reachable_store_still_makes_every_job_and_the_summary(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            "experiment=smoke",
            "-m",
            "steps=2,3",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "sweep runs without a parent run" in output
    assert len(list((tmp_path / "sweep").glob("*/manifest.json"))) == 2
    assert len(list((tmp_path / "sweep" / "summary" / "grids").glob("*.png"))) == 7


def test_stopped_while_planning_exits_130_without_a_traceback(cli_in_process, monkeypatch):
    import keyframes.shotlist.jobs

    def planning(*args, **kwargs):
        raise KeyboardInterrupt  # SIGTERM arrives as this (keyframes.run._interrupt)

    monkeypatch.setattr(keyframes.shotlist.jobs, "plan_jobs", planning)
    code, err, run_dir, store = cli_in_process(fresh_store=True)
    assert code == entry.EXIT_INTERRUPTED
    assert err.strip() == "interrupted before any keyframe was made"
    assert not run_dir.exists() and not store.exists()


def test_first_call_costs_are_kept_out_of_every_images_seconds(cli_in_process, monkeypatch):
    """As a sweep's first job pays for the pipeline's first call: recorded apart, so that
    seconds_per_image_mean and the "fastest" pick compare jobs fairly. The clock is the test's:
    the first call costs 100 "seconds", every later one 1 per batch, whatever the machine."""
    from types import SimpleNamespace

    import keyframes.generation.generator as generator
    import keyframes.generation.warmup as warmup

    clock = SimpleNamespace(now=0.0, calls=0)

    def call(self, *args, **kwargs):
        clock.calls += 1
        clock.now += 100.0 if clock.calls == 1 else 1.0
        return ORIGINAL_CALL(self, *args, **kwargs)

    fake_time = SimpleNamespace(perf_counter=lambda: clock.now)
    monkeypatch.setattr(generator, "time", fake_time)
    monkeypatch.setattr(warmup, "time", fake_time)
    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, _ = cli_in_process(*SMALL, "batch_size=1")
    assert code == 0, err[-2000:]
    run = read_manifest(run_dir)["run"]
    assert run["timings"]["warmup_seconds"] == 100.0 == run["summary"]["warmup_seconds"]
    assert [r["seconds"] for r in read_manifest(run_dir)["images"]] == [1.0] * 7
    assert run["summary"]["seconds_per_image_mean"] == 1.0


def test_a_full_disk_keeps_finished_work_records_it_and_says_how_much_is_needed(
    cli_in_process, monkeypatch
):
    import errno

    from PIL import Image

    original_save, saved = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        if str(fp).endswith(".png.tmp") and len(saved) == 3:  # the 4th keyframe: disk full
            Path(fp).write_bytes(b"half a PNG")
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(fp)
        return original_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    code, err, run_dir, store = cli_in_process(*SMALL)
    assert code == entry.EXIT_DISK_FULL, err[-2000:]
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: disk full: no space left for ")
    assert f"3 finished keyframes kept in {run_dir}; the 4 still to make need about " in line
    assert f"continue with the same command plus hydra.run.dir={run_dir}" in line
    assert "Traceback" not in err and not list(run_dir.rglob("*.tmp"))
    manifest = read_manifest(run_dir)
    assert manifest["run"]["status"] == "failed" and manifest["run"]["error"].startswith(
        "disk full"
    )
    assert [r["status"] for r in manifest["images"]] == ["ok"] * 3
    assert sorted(p.name for p in (run_dir / "keyframes").iterdir()) == [
        Path(r["file"]).name for r in manifest["images"]
    ]
    [run] = store_runs(store)
    assert run.info.status == "FAILED" and run.data.metrics["images"] == 3

    monkeypatch.setattr(Image.Image, "save", original_save)  # space freed: resume finishes it
    code, err, _, _ = cli_in_process(*SMALL, run_dir=run_dir)
    assert code == 0, err[-2000:]
    [run] = store_runs(store)
    assert run.info.status == "FINISHED" and run.data.metrics["images"] == 7


def test_a_disk_full_before_the_run_starts_is_one_line_and_no_files(cli_in_process, monkeypatch):
    import shutil

    monkeypatch.setattr(
        shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0)
    )
    code, err, run_dir, store = cli_in_process(fresh_store=True)
    assert code == entry.EXIT_DISK_FULL
    assert err.startswith("error: disk full: 0.00 MB free at ") and err.count("\n") == 1
    assert not run_dir.exists() and not store.exists()


def test_an_out_of_memory_fallback_is_undone_before_the_next_job(cli_in_process, monkeypatch):
    """As in a sweep: the next job reuses the cached pipeline, in its own memory mode."""
    import keyframes.pipeline.load as models

    calls = []

    def call(self, *args, **kwargs):
        calls.append(len(kwargs["prompt"]))
        if len(calls) <= 2:  # batch 2, then batch 1: out of memory; VAE tiling goes on
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return ORIGINAL_CALL(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, _ = cli_in_process(*FAULTS, "batch_size=2")
    assert code == 0, err[-2000:]
    actions = [f["action"] for f in read_manifest(run_dir)["run"]["fallbacks"]]
    assert actions == ["halve_batch", "vae_tiling"]
    assert models._loaded.pipe.vae.use_tiling is False  # undone for whatever runs next

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", ORIGINAL_CALL)
    code, err, next_dir, _ = cli_in_process(*FAULTS, run_dir=run_dir.parent / "next")
    assert code == 0, err[-2000:]
    run = read_manifest(next_dir)["run"]
    assert run["pipeline_cache"] == "hit" and run["fallbacks"] == []
    assert run["memory"]["mode"] == "none" and models._loaded.pipe.vae.use_tiling is False


def test_an_out_of_memory_fallback_in_the_warm_up_is_recorded_and_undone(
    cli_in_process, monkeypatch
):
    """The warm-up runs on the run's pipeline: a saver it switches on is the run's, in the
    manifest and undone at the end, like one switched on for a batch."""
    import keyframes.pipeline.load as models

    calls = []

    def call(self, *args, **kwargs):
        calls.append(kwargs["num_inference_steps"])
        if len(calls) == 1:  # the warm-up's first try (2 steps)
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return ORIGINAL_CALL(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    code, err, run_dir, _ = cli_in_process(*SMALL, "batch_size=1")
    assert code == 0, err[-2000:]
    assert calls[:2] == [2, 2]  # the warm-up, tried again with VAE tiling on
    [fallback] = read_manifest(run_dir)["run"]["fallbacks"]
    assert fallback["action"] == "vae_tiling" and fallback["detail"].endswith("(warm-up)")
    assert models._loaded.pipe.vae.use_tiling is False
