"""What a person sees first in the MLflow UI: run names that differ in their first characters,
a colour per sweep job, the image keys that line one scene up across runs, and the run's
description in Markdown. Pure functions over the run directory's records."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from urllib.parse import quote

from keyframes.outputs.records import ImageRecord, RunInfo
from keyframes.shotlist.jobs import make_unique

# Tableau 10: ten colours people tell apart, for the jobs of a sweep in charts and the table
JOB_COLOURS = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
SWEEP_COLOUR = "#555555"
SHORT_KEYS = {"cfg_scale": "cfg", "batch_size": "batch", "consistency": "look"}
IMAGE_SECTION = "keyframes"  # MLflow's chart view puts keys "keyframes/<scene>" in one section
TABLE_FILE = "keyframes_table.json"
MAX_VALUE = 16  # characters of one value in a run name
VIEW = "keyframes"  # the experiment's saved view in MLflow's "Views" menu, and the link's key
VIEW_TAG = f"mlflow.sharedViewState.{VIEW}"  # where MLflow 3.17's UI keeps saved views
VIEW_COLUMNS = (
    "clip_score_mean",
    "aesthetic_score_mean",
    "seconds_per_image_mean",
    "tflops_per_image_mean",
    "vram_peak_gb_max",
    "style_consistency",
    "character_consistency",
)
MAX_RUNS_IN_CHARTS = 100  # runs an image grid shows side by side (MLflow's default: 10)
MAX_VIEW_CHARS = 20_000  # MLflow's limit on an experiment tag's value
MAX_NOTE_CHARS = 8_000  # and on a run tag's (the description)


def short_value(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 1] + "…"


def job_run_name(values: dict[str, str], job_num: int) -> str:
    """A sweep job by what it changed: 'steps=30 cfg=5 · #3'."""
    parts = [f"{SHORT_KEYS.get(k, k)}={short_value(v)}" for k, v in values.items()]
    return " ".join(parts + [f"· #{job_num}"]) if parts else f"job #{job_num}"


def single_run_name(run: RunInfo, steps: int, cfg_scale: float, seed: int) -> str:
    """A run outside a sweep: 'cinematic 30st cfg5 dpmpp_2m_karras s1234'."""
    return f"{run.style} {steps}st cfg{cfg_scale:g} {run.sampler} s{seed}"


def sweep_run_name(keys: list[str], jobs: int | None = None) -> str:
    """A sweep's parent: 'steps x cfg_scale, 4 jobs'."""
    name = " x ".join(keys) or "one job"
    return f"{name}, {jobs} job{'s' * (jobs != 1)}" if jobs is not None else name


def image_keys(records: list[ImageRecord]) -> dict[int, str]:
    """Each image's key (by its index): one scene (and take) across runs, as the chart view's
    image grid compares runs per key. MLflow allows letters, digits, _ - . space and / in a
    key; ids that clean up to the same key (`a/b`, `a_b`; scene `x` take 2 and scene `x_t2`)
    get -2, -3, ... in shotlist order, so the same shotlist gives the same keys in every run."""
    ordered = sorted(records, key=lambda r: r.index)
    bases = [
        re.sub(r"[^A-Za-z0-9_.\- ]", "_", r.scene_id) + (f"_t{r.take}" if r.take > 1 else "")
        for r in ordered
    ]
    return {
        r.index: f"{IMAGE_SECTION}/{key}"
        for r, key in zip(ordered, make_unique(bases), strict=True)
    }


def _figure(value, unit: str = "", digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def run_description(run: RunInfo, images: list[ImageRecord], config: dict) -> str:
    """The run page's description (Markdown): what made the run, how it went, how to make it
    again, and where its pictures are."""
    summary, ok = run.summary or {}, [r for r in images if r.ok]
    size = f"{ok[0].width}x{ok[0].height}" if ok else "–"
    lines = [f"**{run.title}**: {len(ok)} keyframes, {run.status}", ""]
    if run.error:
        lines += [f"Stopped: {run.error}", ""]
    if run.sweep is not None:  # every value whole: the run's name cuts long ones
        typed = dict(o.lstrip("+~").split("=", 1) for o in run.overrides if "=" in o)
        values = " ".join(f"`{k}={typed[k]}`" for k in run.sweep.swept_keys if k in typed)
        lines += [f"Sweep job #{run.sweep.job_num}: {values}", ""]
    lines += [
        "| model | style | sampler | steps | cfg | size | seed |",
        "|---|---|---|---|---|---|---|",
        f"| {run.model} | {run.style} | {run.sampler} | {config.get('steps')} "
        f"| {config.get('cfg_scale')} | {size} | {config.get('seed')} |",
        "",
        "| CLIP score | aesthetic | s/image | VRAM peak | style consistency "
        "| character consistency | failed |",
        "|---|---|---|---|---|---|---|",
        f"| {_figure(summary.get('clip_score_mean'))} "
        f"| {_figure(summary.get('aesthetic_score_mean'))} "
        f"| {_figure(summary.get('seconds_per_image_mean'), ' s')} "
        f"| {_figure(summary.get('vram_peak_gb_max'), ' GB')} "
        f"| {_figure(summary.get('style_consistency'), '', 1)} "
        f"| {_figure(summary.get('character_consistency'), '', 1)} "
        f"| {summary.get('images_failed', 0)} |",
        "",
        f"Make it again: `{run.command}`",
        "",
        f"Every keyframe with its scores: Artifacts → `review.html` (or `{TABLE_FILE}`). The "
        f"same scene across runs: the chart view (select runs), section `{IMAGE_SECTION}`.",
    ]
    return "\n".join(lines)


def sweep_description(
    title: str,
    keys: list[str],
    objective: str,
    rows: list[dict],
    best: dict | None,
    fastest: dict | None,
    grids: list[str],
    run_id: str,
) -> str:
    """The sweep parent's description: best and fastest job, the grids, the table.
    rows: the summary table as dicts; best/fastest: {'settings', 'run_id'}."""
    lines = [f"**{title}**: sweep over {' x '.join(keys) or 'one job'}, {len(rows)} jobs", ""]
    if best:
        lines.append(f"- best by `{objective}`: **{best['settings']}** (run `{best['run_id']}`)")
    if fastest:
        lines.append(
            f"- fastest within 1 point of the best: **{fastest['settings']}** "
            f"(run `{fastest['run_id']}`)"
        )
    if rows:
        header = list(rows[0])
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows[:20]]
        if len(rows) > 20:
            lines.append(f"\n{len(rows) - 20} more jobs: Artifacts → summary.csv")
    for name in grids[:8]:  # a run tag holds 8000 characters
        url = f"get-artifact?path={quote('grids/' + name)}&run_uuid={run_id}"
        lines += ["", f"![{name}]({url})"]
    if len(grids) > 8:
        lines.append(f"\n{len(grids) - 8} more grids: Artifacts → grids/")
    return "\n".join(lines)


def review_url(ui: str, experiment_id: str, run_id: str | None = None, chart: bool = False) -> str:
    """A page of `mlflow ui`: one run, or the experiment's runs in keyframes' saved view
    (chart: its chart view), opened in the model-training UI; MLflow 3's UI otherwise opens on
    the GenAI overview, whatever the experiment's kind."""
    base = f"{ui.rstrip('/')}/#/experiments/{experiment_id}"
    if run_id:
        return f"{base}/runs/{run_id}?workflowType=machine_learning"
    mode = "&compareRunsMode=CHART" if chart else ""
    return f"{base}/runs?viewStateShareKey={VIEW}&workflowType=machine_learning{mode}"


def review_page_url(ui: str, experiment_id: str, run_id: str) -> str:
    """A run's review page (a sweep's: its parent's) in MLflow's artifact viewer."""
    base = f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/artifacts/review.html?workflowType=machine_learning"


def saved_view(image_keys: list[str], sort_by: str, now_ms: int) -> str:
    """The experiment tag that is keyframes' view in MLflow's UI: the scores as the runs
    table's columns, best first by `sort_by`, and in the chart view one image grid per key,
    first, without each run's parameters listed under its name (the UI's default for image
    grids, which buries the pictures under the whole config). Deflated and base64-coded, as
    the UI stores its own views; image keys are dropped from the end until it fits."""
    keys = list(image_keys)
    while True:
        state = json.dumps(_view_state(keys, sort_by), separators=(",", ":")).encode()
        packed = "deflate;" + base64.b64encode(zlib.compress(state, 9)).decode()
        view = json.dumps({"name": VIEW, "createdAt": now_ms, "state": packed})
        if len(view) <= MAX_VIEW_CHARS or not keys:
            return view
        keys = keys[: len(keys) * 3 // 4]  # the UI adds a grid of its own for any key left out


def view_keys(view: str | None) -> list[str]:
    """The image keys of a saved view written by saved_view (none for anything else)."""
    try:
        packed = json.loads(view)["state"].removeprefix("deflate;")
        state = json.loads(zlib.decompress(base64.b64decode(packed)))
        return [k for chart in state["compareRunCharts"] for k in chart.get("imageKeys", [])]
    except (TypeError, ValueError, KeyError, zlib.error):
        return []


def _view_state(image_keys: list[str], sort_by: str) -> dict:
    def uuid(text: str) -> str:  # stable: the same key keeps its chart as the view grows
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    section, metrics = uuid(IMAGE_SECTION), uuid("Model metrics")
    charts = [
        {
            "uuid": uuid(key),
            "type": "IMAGE",
            "imageKeys": [key],
            "step": 0,
            "showRunParams": False,
            "metricSectionId": section,
            "deleted": False,
            "isGenerated": True,
            "runsCountToCompare": MAX_RUNS_IN_CHARTS,
        }
        for key in image_keys
    ]
    sections = [
        {
            "uuid": uid,
            "name": name,
            "display": True,
            "isReordered": False,
            "deleted": False,
            "isGenerated": True,
        }
        for uid, name in ((section, IMAGE_SECTION), (metrics, "Model metrics"))
    ]
    return {
        "selectedColumns": [f"metrics.`{m}`" for m in VIEW_COLUMNS],
        "orderByKey": f"metrics.`{sort_by}`",
        "orderByAsc": sort_by.startswith("seconds"),
        "compareRunCharts": charts,
        "compareRunSections": sections,
    }


def cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 30] + "\n\n… (cut: too long for MLflow)"
