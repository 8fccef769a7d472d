"""More than one process: a run sharded with `accelerate launch`, resumed from the parts of a
stopped one, parallel sweep jobs, and the cluster launcher configs."""

import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import keyframes.outputs.processes as processes
from keyframes.outputs.png import read_png_metadata
from keyframes.outputs.processes import claim_gpu
from tests.conftest import read_manifest
from tests.helpers import CONF, DEMO_FILES, assert_same_picture, load_pixels, mlflow_runs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The smoke run over two CPU processes. `--multi_gpu` is accelerate's torchrun launcher;
    `--cpu` would start one process only (accelerate 1.x starts several CPU processes only through mpirun, `--mpirun_hostfile`). Each
    process gets the thread count a single process has: on a CPU the number of threads
    changes the rounding of float sums, and with it a pixel level here and there."""
    import torch

    tmp = tmp_path_factory.mktemp("accelerate")
    run_dir, store = tmp / "run", tmp / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            str(torch.get_num_threads()),
            "-m",
            "keyframes.run",
            "experiment=smoke",
            f"hydra.run.dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        # 2 processes x the single process's threads on 2 cores: idle OpenMP threads yield
        # instead of spinning (the same arithmetic; only the waiting changes)
        cwd=tmp,
        env={**ENV, "OMP_WAIT_POLICY": "PASSIVE"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, store


def test_two_processes_make_the_single_process_images_in_one_run(two_processes, smoke_run):
    run_dir, store = two_processes
    for name in DEMO_FILES:  # seeds per image: the same pictures as one process (another run)
        assert_same_picture(
            load_pixels(run_dir / "keyframes" / name),
            load_pixels(smoke_run.run_dir / "keyframes" / name),
            name,
        )
    manifest = read_manifest(run_dir)
    assert [r["file"] for r in manifest["images"]] == [f"keyframes/{n}" for n in DEMO_FILES]
    assert all(r["status"] == "ok" and r["clip_score"] is not None for r in manifest["images"])
    assert manifest["run"]["processes"] == 2 and manifest["run"]["status"] == "finished"
    assert (
        manifest["run"]["summary"]["images"] == 7
        and "style_consistency" in manifest["run"]["summary"]
    )
    assert not list(run_dir.glob("manifest.process-*"))  # merged, then removed
    assert (run_dir / "contact_sheet.png").is_file()
    client, runs = mlflow_runs(store)
    assert len(runs) == 1  # only the main process logs, after gathering every part
    [run] = runs
    assert run.data.metrics["images"] == 7
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "keyframes")}
    assert logged == {f"keyframes/{name}" for name in DEMO_FILES}


def test_a_stopped_multi_process_run_resumes_from_its_parts(
    two_processes, cli_in_process, tmp_path
):
    """As after a process failed: no manifest.json, each process's part with what it made."""
    source, _ = two_processes
    run_dir = tmp_path / "stopped"
    shutil.copytree(source, run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    (run_dir / "manifest.json").unlink()
    kept = {0: manifest["images"][0:2], 1: manifest["images"][4:6]}
    for index, images in kept.items():
        part = {**manifest, "run": {**manifest["run"], "status": "interrupted"}, "images": images}
        (run_dir / f"manifest.process-{index}.json").write_text(json.dumps(part))
    lost = [r["file"] for r in manifest["images"][2:4] + manifest["images"][6:]]
    for file in lost:
        (run_dir / file).unlink()
    code, err, _, _ = cli_in_process(run_dir=run_dir)
    assert code == 0, err[-2000:]
    assert "4 of 7 images already done" in (run_dir / "run.log").read_text()
    resumed = read_manifest(run_dir)
    assert [r["status"] for r in resumed["images"]] == ["ok"] * 7
    assert not list(run_dir.glob("manifest.process-*"))
    for file in lost:  # made again, the same pictures (another process)
        assert_same_picture(load_pixels(run_dir / file), load_pixels(source / file), file)


@pytest.mark.slow
def test_parallel_sweep_over_consistency_methods_nests_and_compares_both_jobs(tmp_path):
    """Two sweep jobs at once through the local parallel launcher (CPU here), both under one
    parent run; and the sweep table issue 6 asks for: style_consistency per method."""
    sweep_dir, store = tmp_path / "sweep", tmp_path / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            "-m",
            "experiment=smoke",
            "hydra/launcher=local_gpus",
            "consistency=none,style_aligned",
            "steps=2",
            "width=128",
            "height=72",
            "batch_size=2",
            f"hydra.sweep.dir={sweep_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JoblibLauncher" in (sweep_dir / "multirun.yaml").read_text()
    parent = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    _, runs = mlflow_runs(store)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.params["consistency.name"] for r in children) == ["none", "style_aligned"]
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 3
    # two job processes at once, not one after the other
    assert len({read_manifest(sweep_dir / job)["run"]["pid"] for job in ("0", "1")}) == 2

    rows = list(csv.DictReader(open(sweep_dir / "summary" / "summary.csv")))
    assert {r["consistency"] for r in rows} == {"none", "style_aligned"}
    assert all(0 < float(r["style_consistency"]) <= 100 for r in rows)
    assert "style_consistency" in proc.stdout + proc.stderr  # the printed table
    aligned = next(r for r in rows if r["consistency"] == "style_aligned")["job"]
    manifest = read_manifest(sweep_dir / aligned)
    records = manifest["images"]
    assert {r["consistency_reference"] for r in records} == {records[0]["file"]}
    assert manifest["run"]["summary"]["style_consistency"] > 0
    text = read_png_metadata(sweep_dir / aligned / records[3]["file"])["parameters"]
    assert f"Consistency: style_aligned ({records[0]['file']})" in text


def test_launcher_configs_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        local = compose("config", ["hydra/launcher=local_gpus"], return_hydra_config=True)
        slurm = compose(
            "config",
            [
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.timeout_min=120",
            ],
            return_hydra_config=True,
        )
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")
    assert local.hydra.launcher.n_jobs == 2 and local.hydra.launcher.prefer == "processes"
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("gpu", 120, 1)


def test_each_sweep_job_process_claims_a_gpu_no_other_holds(tmp_path, monkeypatch):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(processes, "_claimed", None)
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".gpu-0.lock", "w") as other:  # another job process holds GPU 0
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert claim_gpu(tmp_path) == 1 and chosen == [1]
    assert claim_gpu(tmp_path) == 1 and chosen == [1]  # kept for the process's lifetime
    processes._claimed[1].close()
