"""The review pages: what a run's and a sweep's page hold, the copy MLflow keeps, the printed
hint, and the PNG's provenance. What a browser shows of them: tests/test_mlflow_ui.py."""

import base64
import io
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from keyframes.outputs.png import read_png_metadata
from keyframes.outputs.review_page import RUN_ID_MARK, THUMBNAIL_WIDTH, record_cell
from tests.conftest import read_manifest, run_keyframes
from tests.helpers import SMALL, image_record, mlflow_runs


def page_data(path: Path) -> dict:
    """The JSON the page renders from."""
    text = path.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
    return json.loads(found[1])


def thumbnail(uri: str) -> Image.Image:
    assert uri.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_a_run_writes_its_review_page_and_mlflow_keeps_it_with_its_run_id(cli_in_process, tmp_path):
    code, err, run_dir, store = cli_in_process(*SMALL)
    assert code == 0, err[-2000:]
    manifest = read_manifest(run_dir)
    data = page_data(run_dir / "review.html")
    assert data["columns"] == ["take 1"]
    assert [row["scene"] for row in data["rows"]] == [r["scene_id"] for r in manifest["images"]]
    for row, record in zip(data["rows"], manifest["images"], strict=True):
        [cell] = row["cells"]
        assert cell["file"] == record["file"] and cell["seed"] == record["seed"]
        assert cell["scores"]["clip_score"] == record["clip_score"]
        assert thumbnail(cell["thumbnail"]).size == (THUMBNAIL_WIDTH, THUMBNAIL_WIDTH)  # 64x64
    assert data["run_id"] == RUN_ID_MARK  # on disk: the run it belongs to is not known yet
    # MLflow's copy knows its run, so its pictures open from that run's artifacts
    client, [run] = mlflow_runs(store)
    logged = Path(client.download_artifacts(run.info.run_id, "review.html", str(tmp_path)))
    assert page_data(logged)["run_id"] == run.info.run_id
    # the hint: the page on disk, and the UI started from any folder on the absolute store
    log = (run_dir / "run.log").read_text()
    assert f"review: {(run_dir / 'review.html').resolve().as_uri()}" in log
    review = f"keyframes.review --store sqlite:///{store.resolve()} --run {run.info.run_id}"
    assert review in log


def test_a_damaged_keyframe_is_a_cell_that_says_so(tmp_path):
    (tmp_path / "keyframes").mkdir()
    good = tmp_path / "keyframes" / "a.png"
    Image.new("RGB", (64, 36), (10, 200, 30)).save(good)
    cut = tmp_path / "keyframes" / "b.png"
    cut.write_bytes(good.read_bytes()[:40])  # a truncated PNG
    ok = record_cell(image_record(file="keyframes/a.png"), tmp_path, tmp_path / "summary")
    assert ok.file == "../keyframes/a.png" and thumbnail(ok.thumbnail).size == (240, 135)
    broken = record_cell(image_record(file="keyframes/b.png"), tmp_path, tmp_path)
    assert broken.thumbnail is None and broken.file is None
    assert broken.note == "the file cannot be read"


def test_the_png_provenance_claims_no_status(smoke_run):
    records = read_manifest(smoke_run.run_dir)["images"]
    provenance = json.loads(read_png_metadata(smoke_run.run_dir / records[0]["file"])["keyframes"])
    assert "status" not in provenance["run"] and provenance["run"]["title"]


def test_a_sweep_writes_one_review_page_of_every_job(smoke_sweep):
    data = page_data(smoke_sweep.sweep_dir / "summary" / "review.html")
    assert data["columns"] == [
        "steps=2 cfg_scale=1.5",
        "steps=2 cfg_scale=3",
        "steps=3 cfg_scale=1.5",
        "steps=3 cfg_scale=3",
    ]
    jobs = [read_manifest(smoke_sweep.sweep_dir / str(n)) for n in range(4)]
    for row in data["rows"]:
        for job, cell in zip(jobs, row["cells"], strict=True):
            record = next(r for r in job["images"] if r["scene_id"] == row["scene"])
            assert cell["file"] == f"../{job['run']['sweep']['job_num']}/{record['file']}"
            assert cell["run_id"] == job["run"]["mlflow"]["run_id"]  # its job's MLflow run
            assert cell["scores"]["clip_score"] == record["clip_score"]


@pytest.mark.slow
def test_the_printed_review_command_works_from_another_folder(smoke_sweep, tmp_path):
    """The sweep's printed `keyframes.review` line, run from an unrelated folder: the UI
    answers on 127.0.0.1, the page it prints is the parent's review page, Ctrl-C stops it."""
    line = next(x for x in smoke_sweep.output.splitlines() if "keyframes.review --store" in x)
    arguments = line.split("keyframes.review ", 1)[1].split("  (")[0].split()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyframes.review", *arguments],
        cwd=elsewhere,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        opened = None
        while opened is None and time.monotonic() < deadline:
            text = proc.stdout.readline()
            assert text or proc.poll() is None, "keyframes.review ended early"
            if text.startswith("open "):
                opened = text.split()[1]
        assert opened.startswith("http://127.0.0.1:") and "/artifacts/review.html" in opened
        base = opened.split("/#/")[0]
        parent = arguments[arguments.index("--run") + 1]
        page = urllib.request.urlopen(f"{base}/get-artifact?path=review.html&run_uuid={parent}")
        assert b"sweep over steps x cfg_scale: 4 jobs" in page.read()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "stopped" in out


@pytest.mark.slow
def test_a_twelve_job_sweep_review_page_holds_every_job(tmp_path):
    """Past MLflow's 10 runs per chart: the sweep's page has a column for each of 12 jobs,
    every picture drawn in a browser."""
    import shutil

    from tests.browser import Browser
    from tests.loud_skips import NO_BROWSER

    sweep_dir = tmp_path / "sweep"
    twelve = ["-m", "steps=2,3,4", "cfg_scale=1.5,3,4.5,6", f"hydra.sweep.dir={sweep_dir}"]
    proc = run_keyframes(tmp_path, ["experiment=smoke", *SMALL, *twelve])
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = sweep_dir / "summary" / "review.html"
    assert f"review: {page.resolve().as_uri()}" in proc.stdout + proc.stderr
    assert len(page_data(page)["columns"]) == 12
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(NO_BROWSER)
    browser = Browser(chromium, width=1600, height=1000)
    try:
        browser.open(page.as_uri())
        loaded = (
            "Array.from(document.querySelectorAll('td img'))"
            ".filter(i => i.complete && i.naturalWidth > 0).length"
        )
        assert browser.wait_for(f"({loaded}) === 84 && 84") == 84  # 7 scenes x 12 jobs
        columns = browser.js("document.querySelectorAll('th.column').length")
        assert columns == 12
    finally:
        browser.close()


def test_a_sweep_job_description_holds_its_values_whole():
    """Run names cut long values (16 characters); the description keeps them all."""
    from keyframes.tracking.review import job_run_name, run_description
    from tests.helpers import run_record

    long = "a/very/long/path/to/a/style/file.yaml"
    run = run_record(
        overrides=["steps=30", f"style.file={long}", "+seed=1"],
        sweep={"sweep_dir": "s", "job_num": 3, "swept_keys": ["style.file", "seed"]},
    )
    assert long not in job_run_name({"style.file": long}, 3)
    text = run_description(run, [image_record()], {"steps": 30})
    assert f"Sweep job #3: `style.file={long}` `seed=1`" in text
