"""Review in a real browser: `mlflow server` over the store of a real smoke sweep, its REST
API, and the parent run's page rendered by headless Chromium."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1000", "--virtual-time-budget=20000",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smoke_sweep, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w")
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", smoke_sweep.uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.time() < deadline, open(log.name).read()[-2000:]
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def call(base, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(request, timeout=30).read()


def sweep_runs(base):
    experiments = json.loads(call(base, "/api/2.0/mlflow/experiments/search", {"max_results": 100}))
    smoke = next(e for e in experiments["experiments"] if e["name"] == "smoke")
    runs = json.loads(
        call(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [smoke["experiment_id"]]})
    )["runs"]

    def tags(run):
        return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

    [parent] = [r for r in runs if tags(r).get("keyframes.sweep") == "true"]
    children = [r for r in runs if tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    return smoke["experiment_id"], parent, children


def test_server_serves_parent_children_metrics_and_images(server):
    _, parent, children = sweep_runs(server)
    assert len(children) == 4
    for child in children:
        metrics = {m["key"] for m in child["data"]["metrics"]}
        assert {"clip_score_mean", "seconds_per_image_mean", "model_load_seconds"} <= metrics
    parent_id = parent["info"]["run_id"]
    listing = json.loads(
        call(server, f"/ajax-api/2.0/mlflow/artifacts/list?run_uuid={parent_id}&path=grids")
    )
    assert len(listing["files"]) == 7
    grid = call(server, f"/get-artifact?path=grids/opening.png&run_uuid={parent_id}")
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    child_id = children[0]["info"]["run_id"]
    keyframe = call(server, f"/get-artifact?path=keyframes/001_opening_t1.png&run_uuid={child_id}")
    assert keyframe[:8] == b"\x89PNG\r\n\x1a\n"


def test_parent_run_page_renders_in_chromium(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(
            "Chromium is not installed (.ci/run installs Debian's chromium package where it can)"
        )
    experiment_id, parent, children = sweep_runs(server)
    url = f"{server}/#/experiments/{experiment_id}/runs/{parent['info']['run_id']}"
    flags = [chromium, *CHROMIUM_FLAGS]
    dom = subprocess.run(
        [*flags, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    assert parent["info"]["run_name"] in dom
    assert "Child runs" in dom
    for child in children:
        assert child["info"]["run_name"] in dom
    screenshot = tmp_path / "parent_run.png"
    subprocess.run(
        [*flags, f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={screenshot}", url],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    pixels = np.asarray(Image.open(screenshot).convert("L"))
    assert pixels.shape == (1000, 1400) and pixels.std() > 10  # a rendered page, not a blank one


def test_compare_reads_the_same_sweep_from_a_tracking_server(server, smoke_sweep, tmp_path):
    def compare(uri, *extra):
        return subprocess.run(
            [sys.executable, "-m", "keyframes.compare", "--tracking-uri", uri, *extra],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    local, remote = compare(smoke_sweep.uri), compare(server, "--out", str(tmp_path / "out"))
    assert remote.returncode == 0, remote.stderr
    table = remote.stdout.split("\n\nwrote")[0]
    assert table == local.stdout.rstrip("\n")
    assert len(list((tmp_path / "out" / "grids").glob("*.png"))) == 7
