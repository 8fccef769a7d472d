"""Review in a real browser: `mlflow server` over the store of a real smoke sweep, its REST
API, and the pages a person opens, driven in headless Chromium: the runs table, a run's image
table, the chart view's image grids."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keyframes.tracking.review import review_url
from tests.browser import Browser
from tests.helpers import mlflow_server
from tests.loud_skips import NO_BROWSER


@pytest.fixture(scope="module")
def server(smoke_sweep, tmp_path_factory):
    with mlflow_server(smoke_sweep.uri, tmp_path_factory.mktemp("server")) as base:
        yield base


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
        assert {
            "clip_score_mean",
            "aesthetic_score_mean",
            "seconds_per_image_mean",
            "model_load_seconds",
        } <= metrics
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


@pytest.fixture
def browser():  # a fresh profile each: what one test unfolds stays unfolded in a profile
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(NO_BROWSER)
    driver = Browser(chromium)
    yield driver
    driver.close()


def shot(browser, name: str, tmp_path: Path) -> Path:
    """A screenshot as a test artifact; KEYFRAMES_SCREENSHOTS=DIR keeps a copy (the README's
    picture comes from there)."""
    path = browser.screenshot(tmp_path / name)
    if keep := os.environ.get("KEYFRAMES_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / name)
    pixels = np.asarray(Image.open(path).convert("L"))
    assert pixels.std() > 10  # a rendered page, not a blank one
    return path


CLOSE_ASSISTANT = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def open_review(browser, url: str) -> str:
    """The page a run's log links to, as a person sees it; its text."""
    browser.open(url)
    browser.wait_for("document.body.innerText.includes('matching runs')")
    browser.js(f"document.querySelector({json.dumps(CLOSE_ASSISTANT)})?.click()")
    return browser.js("document.body.innerText")


def test_the_link_opens_the_runs_table_with_the_scores_and_names_that_differ(
    server, browser, smoke_sweep, tmp_path
):
    experiment_id, parent, children = sweep_runs(server)
    page = (smoke_sweep.sweep_dir / "summary" / "review.html").resolve().as_uri()
    assert f"review: {page}" in smoke_sweep.output  # the sweep's printed link: its review page
    assert f"--run {parent['info']['run_id']}" in smoke_sweep.output  # and its parent in MLflow
    open_review(browser, review_url(server, experiment_id))
    names = [c["info"]["run_name"] for c in children]
    header = "Array.from(document.querySelectorAll('[role=columnheader]')).map(h => h.innerText)"
    columns = browser.wait_for(f"(h => h.includes('clip_score_mean') && h)({header})")
    assert {"clip_score_mean", "aesthetic_score_mean", "seconds_per_image_mean"} <= set(columns)
    text = browser.wait_for(
        f"(t => {json.dumps(names)}.every(n => t.includes(n)) && t)(document.body.innerText)"
    )  # every job in view, not folded away
    assert "Detect Issues" not in text and "Sort: clip_score_mean" in text  # not GenAI's page
    assert parent["info"]["run_name"] == "steps x cfg_scale, 4 jobs"
    assert len({name[:16] for name in names}) == 4  # told apart in what the column shows
    shot(browser, "runs_table.png", tmp_path)


def test_a_run_page_shows_the_image_table_with_thumbnails(browser, server, tmp_path):
    experiment_id, _, children = sweep_runs(server)
    run_id = children[0]["info"]["run_id"]
    page = review_url(server, experiment_id, run_id).replace(
        "?", "/artifacts/keyframes_table.json?"
    )
    browser.open(page)
    browser.js(f"document.querySelector({json.dumps(CLOSE_ASSISTANT)})?.click()")
    loaded = "Array.from(document.querySelectorAll('img[src*=table_images]'))"
    browser.wait_for(  # the first page of rows, each with its picture drawn
        f"(n => n >= 3 && n)({loaded}.filter(i => i.complete && i.naturalWidth > 0).length)"
    )
    text = browser.js("document.body.innerText")
    assert "clip_score" in text and "aesthetic_score" in text and "opening" in text
    shot(browser, "image_table.png", tmp_path)


def test_the_chart_view_shows_each_scene_once_per_run_of_the_sweep(browser, server, tmp_path):
    experiment_id, _, children = sweep_runs(server)
    text = open_review(browser, review_url(server, experiment_id, chart=True))
    images = (  # the scene's key as MLflow names its file: images/keyframes~opening+step+0+...
        "Array.from(document.images).filter(i => "
        "decodeURIComponent(i.src).includes('images/keyframes~opening+'))"
    )
    runs = browser.wait_for(
        f"(l => l.length === 4 && l)({images}.filter(i => i.complete && i.naturalWidth > 0)"
        ".map(i => new URL(i.src).searchParams.get('run_uuid')))"
    )
    assert sorted(runs) == sorted(c["info"]["run_id"] for c in children)
    text = browser.js("document.body.innerText")
    assert text.index("keyframes/opening") < text.index("Model metrics")  # pictures first
    assert "allow_external_paths" not in text  # no wall of parameters above each picture
    shot(browser, "chart_view.png", tmp_path)
    browser.click('[data-component-id="fullscreen_button_chartcard"]')  # the first: opening
    in_dialog = "Array.from(document.querySelectorAll('[role=dialog] img'))"
    browser.wait_for(f"{in_dialog}.filter(i => i.complete && i.naturalWidth > 0).length === 4")
    shot(browser, "scene_across_runs.png", tmp_path)  # one scene, every job side by side


def test_compare_reads_the_same_sweep_from_a_tracking_server(server, smoke_sweep, tmp_path, capsys):
    from keyframes.compare import main

    assert main(["--tracking-uri", smoke_sweep.uri]) == 0  # the local store, in this process
    local = capsys.readouterr().out
    remote = subprocess.run(  # the command itself, against the server
        [
            sys.executable,
            "-m",
            "keyframes.compare",
            "--tracking-uri",
            server,
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert remote.returncode == 0, remote.stderr
    table = remote.stdout.split("\n\nwrote")[0]
    assert table == local.rstrip("\n")
    assert len(list((tmp_path / "out" / "grids").glob("*.png"))) == 7


# The review pages (keyframes/outputs/review_page.py): from disk and in MLflow's artifact viewer.

LOADED = (
    "Array.from(document.querySelectorAll('td img'))"
    ".filter(i => i.complete && i.naturalWidth > 0).length"
)
ROW_ORDER = "Array.from(document.querySelectorAll('tr[data-scene]')).map(r => r.dataset.scene)"
FULL = "(f => f.complete && f.naturalWidth > 0 && [f.src, f.naturalWidth])(document.getElementById('full'))"


def in_view(rect: dict, width: float, height: float) -> bool:
    return (
        rect["left"] >= 0
        and rect["top"] >= 0
        and rect["right"] <= width
        and rect["bottom"] <= height
    )


def test_the_sweep_review_page_from_disk_shows_every_job_sorts_and_opens_full_size(
    browser, smoke_sweep, tmp_path
):
    page = smoke_sweep.sweep_dir / "summary" / "review.html"
    browser.open(page.as_uri())
    browser.wait_for(f"{LOADED} === 28")  # 7 scenes x 4 jobs, every picture drawn
    rows = browser.js(
        "Array.from(document.querySelectorAll('tr[data-scene]')).map(r => "
        "[r.dataset.scene, r.querySelectorAll('img').length, r.innerText.includes('CLIP')])"
    )
    assert len(rows) == 7 and all(n == 4 and scored for _, n, scored in rows)
    headers = browser.js(
        "Array.from(document.querySelectorAll('th.column b')).map(b => b.innerText)"
    )
    assert headers[0] == "steps=2 cfg_scale=1.5" and len(headers) == 4
    shot(browser, "review_page.png", tmp_path)  # the README's picture
    # rows by CLIP: the scenes by their mean CLIP score over the jobs, best first
    jobs = [
        json.loads((smoke_sweep.sweep_dir / str(n) / "manifest.json").read_text()) for n in range(4)
    ]
    mean = {}
    for job in jobs:
        for record in job["images"]:
            mean.setdefault(record["scene_id"], []).append(record["clip_score"])
    expected = sorted(mean, key=lambda scene: -sum(mean[scene]) / 4)
    assert browser.js(ROW_ORDER) == list(mean) != expected  # shotlist order, until sorted
    browser.js(
        "const s = document.getElementById('rowsort'); s.value = 'clip_score';"
        "s.dispatchEvent(new Event('change'))"
    )
    assert browser.js(ROW_ORDER) == expected
    # a click shows the full image, from the job's folder beside the page
    browser.js("document.querySelector('td img').click()")
    src, width = browser.wait_for(FULL)
    assert src.startswith("file://") and src.endswith(".png") and width == 256


def test_the_sweep_review_page_opens_as_an_mlflow_artifact(browser, server, tmp_path):
    from keyframes.tracking.review import review_page_url

    experiment_id, parent, children = sweep_runs(server)
    browser.open(review_page_url(server, experiment_id, parent["info"]["run_id"]))
    deadline = time.monotonic() + 60
    while browser.frame_js("blob:", LOADED) != 28:
        assert time.monotonic() < deadline, "the page's pictures did not load in MLflow"
        time.sleep(0.5)
    browser.frame_js("blob:", "document.querySelector('td img').click()")
    deadline = time.monotonic() + 30
    while not (full := browser.frame_js("blob:", FULL)):
        assert time.monotonic() < deadline, "the full image did not load"
        time.sleep(0.5)
    src, width = full
    assert "/get-artifact?path=keyframes%2F001_opening_t1.png&run_uuid=" in src and width == 256
    assert src.rsplit("=", 1)[1] in {c["info"]["run_id"] for c in children}  # its job's run
    shot(browser, "review_page_in_mlflow.png", tmp_path)


def test_the_single_run_link_lands_on_a_keyframe_in_view(server, tmp_path):
    """A job's printed page in MLflow at 1600x1000 in a fresh profile (the Assistant panel
    as a first visit opens it): after it settles, a whole keyframe is in view."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip(NO_BROWSER)
    from keyframes.tracking.review import review_page_url

    browser = Browser(chromium, width=1600, height=1000)
    try:
        experiment_id, _, children = sweep_runs(server)
        browser.open(review_page_url(server, experiment_id, children[0]["info"]["run_id"]))
        deadline = time.monotonic() + 60
        while browser.frame_js("blob:", LOADED) != 7:
            assert time.monotonic() < deadline, "the run's pictures did not load"
            time.sleep(0.5)
        time.sleep(2)  # settled: panels opened, fonts in
        frame = browser.js(
            "JSON.stringify(document.querySelector('iframe').getBoundingClientRect())"
        )
        frame = json.loads(frame)
        window = browser.js("[innerWidth, innerHeight]")
        inside = json.loads(
            browser.frame_js(
                "blob:",
                "JSON.stringify([document.querySelector('td img').getBoundingClientRect(), "
                "innerWidth, innerHeight])",
            )
        )
        image, width, height = inside
        assert in_view(image, width, height)  # whole inside the frame's view
        assert in_view(frame, *window) or (
            frame["left"] + image["right"] <= window[0]
            and frame["top"] + image["bottom"] <= window[1]
        )
        shot(browser, "single_run_link.png", tmp_path)
    finally:
        browser.close()


def test_a_run_overview_lists_the_run_means_before_the_last_image_values(browser, server):
    experiment_id, _, children = sweep_runs(server)
    browser.open(review_url(server, experiment_id, children[0]["info"]["run_id"]))
    text = browser.wait_for(
        "(t => t.includes('clip_score_mean') && t.includes('seconds_per_image_mean') && t)"
        "(document.body.innerText)"
    )
    metrics = text[text.index("Metrics (") :].splitlines()
    assert metrics.index("clip_score_mean") < metrics.index("clip_score")
