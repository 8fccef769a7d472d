"""Sweeps through hydra/launcher=slurm on a real single-node SLURM cluster on this machine
(scripts/slurm_local.sh: munged, MariaDB + slurmdbd, slurmctld, slurmd), logging to an MLflow
tracking server, as the launcher's config recommends for clusters. Where no cluster can be
started (no root, no apt), these tests skip, and the end of the run says so in red."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, read_manifest
from tests.helpers import SMALL, mlflow_server
from tests.loud_skips import NO_SLURM

SCRIPT = ROOT / "scripts" / "slurm_local.sh"
ON_THE_CPU = (  # the launcher's GPU defaults, for a CPU node
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
)


@pytest.fixture(scope="session")
def slurm() -> dict:
    """The environment that reaches the local cluster (SLURM_CONF), starting it if needed."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.skip(f"{NO_SLURM}: {proc.stderr.strip()[-500:]}")
    conf = proc.stdout.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    return {**os.environ, "SLURM_CONF": conf, "HF_HUB_OFFLINE": "1"}


def api(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def sacct_states(env: dict, job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("|") for line in out.splitlines() if line)


@pytest.mark.slow
def test_a_sweep_runs_as_slurm_jobs_and_logs_to_a_tracking_server(slurm, tmp_path):
    sweep_dir = tmp_path / "sweep"
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as base:
        proc = sweep(slurm, tmp_path, *SMALL, "steps=2,3", store=base)
        assert proc.returncode == 0, proc.stdout[-3000:]
        # every job ran as a task of a SLURM job array: submitit's folder of each, sacct's
        # record, the job's run folder and manifest, made by another process
        folders = (sweep_dir / ".submitit").iterdir()
        submitted = sorted(p.name for p in folders if p.is_dir() and "_" in p.name)
        assert len(submitted) == 2, submitted
        states = sacct_states(slurm, submitted)
        assert set(states.values()) == {"COMPLETED"}, states
        for job in ("0", "1"):
            manifest = read_manifest(sweep_dir / job)
            assert manifest["run"]["status"] == "finished" and len(manifest["images"]) == 7
            assert manifest["run"]["pid"] != os.getpid()
        # the parent run, made in the submitting process, with the summary; the jobs under it
        found = api(base, "/api/2.0/mlflow/experiments/search", {"max_results": 100})
        ids = [e["experiment_id"] for e in found["experiments"]]
        runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": ids})["runs"]

        def tags(run):
            return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

        [parent] = [r for r in runs if tags(r).get("keyframes.sweep") == "true"]
        parent_id = parent["info"]["run_id"]
        children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent_id]
        assert parent["info"]["status"] == "FINISHED" and len(children) == 2
        assert {m["key"]: m["value"] for m in parent["data"]["metrics"]}["jobs"] == 2
        listed = urllib.request.urlopen(
            f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_uuid={parent_id}"
        )
        files = {f["path"] for f in json.loads(listed.read()).get("files", [])}
        assert {"review.html", "summary.csv"} <= files
    summary = (sweep_dir / "summary" / "summary.csv").read_text()
    assert len(summary.splitlines()) == 3  # the header and both jobs
    assert Path(sweep_dir / "summary" / "review.html").is_file()


def sweep(
    env: dict,
    folder: Path,
    *overrides: str,
    wait: bool = True,
    partition: str = "main",
    store: str | None = None,
):
    """The smoke sweep with these overrides through hydra/launcher=slurm on the CPU, into
    folder/sweep, logged to `store` (default: SQLite in folder)."""
    store = store or f"sqlite:///{folder / 'mlflow.db'}"
    command = [
        sys.executable,
        "-m",
        "keyframes.run",
        "-m",
        "experiment=smoke",
        *ON_THE_CPU,
        f"hydra.launcher.partition={partition}",
        *overrides,
        f"hydra.sweep.dir={folder / 'sweep'}",
        f"mlflow.tracking_uri={store}",
    ]
    options = dict(cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        return subprocess.run(command, timeout=900, **options)
    return subprocess.Popen(command, **options)


@pytest.mark.slow
def test_a_cancelled_job_is_made_again_by_the_same_command_and_finished_ones_are_kept(
    slurm, tmp_path
):
    """scancel of one array task while it runs: the sweep stops with the finished job kept
    and says how to go on; the same command again makes only the cancelled job."""
    import time

    slow = ("width=512", "height=512", "steps=2,60")  # job 1: about 20 s on 2 cores
    proc = sweep(slurm, tmp_path, *slow, wait=False)
    deadline = time.monotonic() + 300
    while True:
        queue = subprocess.run(
            ["squeue", "-h", "-o", "%i %T"], env=slurm, capture_output=True, text=True
        ).stdout.split()
        running = [queue[i] for i in range(0, len(queue), 2) if queue[i + 1] == "RUNNING"]
        task = next((t for t in running if t.endswith("_1")), None)
        if task and (tmp_path / "sweep" / "1" / "manifest.json").exists():
            break
        assert time.monotonic() < deadline and proc.poll() is None, "job 1 never ran"
        time.sleep(0.5)
    subprocess.run(["scancel", task], env=slurm, check=True)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode != 0
    assert sacct_states(slurm, [task])[task].startswith("CANCELLED")
    sweep_dir = (tmp_path / "sweep").resolve()
    assert f"the same command with hydra.sweep.dir={sweep_dir} makes only what is missing" in output
    finished = read_manifest(sweep_dir / "0")
    assert finished["run"]["status"] == "finished"
    kept = {r["file"]: (sweep_dir / "0" / r["file"]).stat().st_mtime_ns for r in finished["images"]}
    assert read_manifest(sweep_dir / "1")["run"]["status"] != "finished"
    again = sweep(slurm, tmp_path, *slow)
    assert again.returncode == 0, again.stdout[-3000:]
    assert {f: (sweep_dir / "0" / f).stat().st_mtime_ns for f in kept} == kept  # not remade
    assert read_manifest(sweep_dir / "1")["run"]["status"] == "finished"
    assert len(read_manifest(sweep_dir / "1")["images"]) == 7


@pytest.mark.slow
def test_a_job_on_a_node_without_the_model_stops_with_the_preflight_message(slurm, tmp_path):
    """The submitting machine has the model (a replica of its hub repo), the job's node does
    not (its HF_HOME is empty): the job stops at its pre-flight with exit 2 and the message
    in its log; the sweep's summary lists it as failed beside the job that ran."""
    import csv

    replicas = tmp_path / "hf"
    subprocess.run(
        [sys.executable, "-m", "keyframes.replicas", str(replicas), "--no-scorer"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = sweep(
        {**slurm, "HF_HOME": str(replicas)},
        tmp_path,
        *SMALL,
        "scorer=tiny",
        "model=tiny,sdxl_base",
        'hydra.launcher.setup=["export HF_HOME=/nonexistent/no-model-cache"]',
    )
    assert result.returncode != 0
    sweep_dir = tmp_path / "sweep"
    [log] = (sweep_dir / ".submitit").glob("*_1/*_1_0_log.err")
    text = log.read_text()
    assert (
        "error: model sdxl_base (stabilityai/stable-diffusion-xl-base-1.0) is not available" in text
    )
    assert "Looked in the Hugging Face cache /nonexistent/no-model-cache/hub" in text
    assert "Exited with exit code 2" in text and "Traceback" not in text
    assert not (sweep_dir / "1").exists()  # refused before anything was written
    rows = {r["job"]: r for r in csv.DictReader(open(sweep_dir / "summary" / "summary.csv"))}
    assert rows["0"]["status"] == "finished" and rows["0"]["model"] == "tiny"
    assert rows["1"]["status"].startswith("failed") and rows["1"]["model"] == "sdxl_base"


@pytest.mark.slow
def test_a_job_at_its_time_limit_ends_killed_in_mlflow_and_says_why(slurm, tmp_path):
    """A job too long for the `short` partition's 2 minutes: SLURM's warning signal (SIGUSR2
    at signal_delay_s=0 before the limit: SLURM may send it up to 60 s early, so the run has
    begun by then) or SIGTERM at the limit stops it cleanly; its finished keyframes are kept,
    its manifest and its MLflow run (KILLED) say it reached the time limit."""
    from mlflow.tracking import MlflowClient

    result = sweep(
        slurm,
        tmp_path,
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=0",
        "width=512",
        "height=512",
        "steps=500",  # about 3 minutes of images on 2 cores: more than the limit allows
        partition="short",
    )
    assert result.returncode != 0
    job = tmp_path / "sweep" / "0"
    manifest = read_manifest(job)
    assert manifest["run"]["status"] == "interrupted"
    assert "reached its time limit (hydra.launcher.timeout_min)" in manifest["run"]["error"]
    assert all((job / r["file"]).is_file() for r in manifest["images"] if r["status"] == "ok")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(manifest["run"]["mlflow"]["run_id"])
    assert run.info.status == "KILLED"
    assert "time limit" in run.data.tags["keyframes.stopped"]
    assert "Stopped: SLURM job" in run.data.tags["mlflow.note.content"]
