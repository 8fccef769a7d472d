"""Compare jobs: which settings varied, the summary table, the best and the fastest good job.

Pure functions over JobResults, which come either from a sweep directory on disk or from the
tracking store (keyframes.compare); nothing here knows where.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyframes.outputs.files import keyframe_file
from keyframes.outputs.manifest import load_manifest
from keyframes.outputs.records import ImageRecord

TABLE_METRICS = (
    "clip_score_mean",
    "aesthetic_score_mean",
    "style_consistency",
    "character_consistency",  # the same people across scenes (scoring/consistency.py)
    "seconds_per_image_mean",
    "unet_evaluations_per_image_mean",  # the work a guidance interval or DeepCache saves
    "tflops_per_image_mean",  # the same, DeepCache's shallow steps included
    "vram_peak_gb_max",
)
HIGHER_IS_BETTER = (
    "clip_score",
    "aesthetic_score",
    "character_",
)  # metric name prefixes, sorted descending
GOOD_ENOUGH_POINTS = 1.0  # "fastest good job": within this many points of the best (ranked metric)


@dataclass
class JobResult:
    name: str  # job number in a sweep, or the run name
    overrides: dict[str, str]  # key -> value from the job's command line
    metrics: dict[str, float]
    run_id: str | None = None
    scenes: list[str] = field(default_factory=list)  # scene ids in shotlist order
    keyframes: dict[str, Path] = field(default_factory=dict)  # scene id -> first take's PNG
    scores: dict[str, float] = field(default_factory=dict)  # scene id -> that PNG's CLIP score
    aesthetics: dict[str, float] = field(default_factory=dict)  # scene id -> its aesthetic score
    records: dict[str, ImageRecord] = field(default_factory=dict)  # scene id -> first take's
    run_dir: Path | None = None  # where its files are, when read from disk
    status: str | None = None  # its run's (finished, failed, interrupted, running); why not


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['steps=20', '+foo=1', 'hydra.x=y'] -> {'steps': '20', 'foo': '1'}.

    Not Hydra's OverridesParser (which keyframes.run uses to find the keys): this reads
    recorded override lists, which may hold flags such as -m, and keeps each value as the
    text it was typed (the table shows it), where the parser would reinterpret quotes, lists
    and sweeps, or refuse the list."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith("hydra."):
            out[key] = value
    return out


def settings_used(params: dict[str, str], keys: list[str], typed: dict[str, str]) -> dict[str, str]:
    """The value each key had in a run, from its logged params (a group such as `style` by its
    option name): what ran, also where the command line did not set it. Numbers read as
    typed (3.0 -> 3); a key the params lack keeps the typed value."""
    out = {}
    for key in keys:
        value = params.get(key, params.get(f"{key}.name", typed.get(key)))
        number = as_number(value)
        out[key] = f"{number:g}" if number is not None else value
    return {k: v for k, v in out.items() if v is not None}


def job_from_manifest(manifest_path: Path, name: str | None = None) -> JobResult:
    """A job as its run directory records it (name: the directory's, e.g. the job number)."""
    manifest = load_manifest(manifest_path)
    run = manifest.run
    job = JobResult(
        name=name or manifest_path.parent.name,
        overrides=parse_overrides(run.overrides),
        metrics=run.summary or {},
        run_id=run.mlflow_run_id,
        run_dir=manifest_path.parent,
        status=run.status,
    )
    for record in manifest.images:
        scene = record.scene_id
        if scene not in job.scenes:  # the first take stands for the scene
            job.scenes.append(scene)
            job.records[scene] = record
            path = keyframe_file(manifest_path.parent, record.file) if record.ok else None
            if path is not None:  # a failed, damaged or outside file shows as "no image"
                job.keyframes[scene] = path
            if record.clip_score is not None:
                job.scores[scene] = record.clip_score
            if record.aesthetic_score is not None:
                job.aesthetics[scene] = record.aesthetic_score
    return job


def varying_keys(jobs: list[JobResult]) -> list[str]:
    """Override keys whose value is not the same in every job, in first-seen order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def sort_values(values) -> list[str]:
    """Numbers in numeric order, then everything else alphabetically."""

    def key(v: str):
        number = as_number(v)
        return (0, number, "") if number is not None else (1, 0.0, str(v))

    return sorted(set(values), key=key)


def as_number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def grid_axes(jobs: list[JobResult], keys: list[str]) -> tuple[str | None, str | None, list[str]]:
    """(column key, row key, folded keys): the two keys with the most values span the grid,
    each combination of the others gets grids of its own."""
    ranked = sorted(keys, key=lambda k: -len({job.overrides.get(k) for job in jobs}))
    columns = ranked[0] if ranked else None
    rows = ranked[1] if len(ranked) > 1 else None
    return columns, rows, ranked[2:]


def higher_is_better(metric: str) -> bool:
    return metric.startswith(HIGHER_IS_BETTER)


def ranked(jobs: list[JobResult], metric: str) -> list[JobResult]:
    """Best first by metric; jobs without the metric last."""
    sign = -1 if higher_is_better(metric) else 1
    with_metric = [j for j in jobs if j.metrics.get(metric) is not None]
    without = [j for j in jobs if j.metrics.get(metric) is None]
    return sorted(with_metric, key=lambda j: sign * j.metrics[metric]) + without


def best_and_fastest(
    jobs: list[JobResult],
    metric: str = "clip_score_mean",
    speed: str = "seconds_per_image_mean",
) -> tuple[JobResult | None, JobResult | None]:
    """The best job by metric, and the fastest job within GOOD_ENOUGH_POINTS of it."""
    scored = [j for j in jobs if j.metrics.get(metric) is not None]
    if not scored:
        return None, None
    best = ranked(scored, metric)[0]
    good = [
        j for j in scored if abs(j.metrics[metric] - best.metrics[metric]) <= GOOD_ENOUGH_POINTS
    ]
    good = [j for j in good if j.metrics.get(speed) is not None] or [best]
    fastest = min(good, key=lambda j: j.metrics.get(speed, float("inf")))
    return best, fastest


def describe(job: JobResult, keys: list[str]) -> str:
    """key=value of each key, numbers to 4 significant digits (an Optuna cfg_scale such as
    7.403107579552539 reads 7.403)."""
    return " ".join(f"{k}={_short(job.overrides.get(k, '-'))}" for k in keys) or job.name


def _short(value: str) -> str:
    number = as_number(value)
    return f"{number:.4g}" if number is not None else value


def table(jobs: list[JobResult], metric: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) sorted best first: job, the varying keys, the comparison metrics."""
    keys = varying_keys(jobs)
    metrics = list(TABLE_METRICS) + ([metric] if metric not in TABLE_METRICS else [])
    header = ["job", *keys, *metrics, "run_id", "status"]
    rows = [
        [
            job.name,
            *(job.overrides.get(k, "") for k in keys),
            *(_cell(job.metrics.get(m)) for m in metrics),
            job.run_id or "",
            job.status or "",
        ]
        for job in ranked(jobs, metric)
    ]
    return header, rows


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns: all-number columns to the right, the rest to the left."""
    columns = list(zip(header, *rows, strict=True))
    widths = [max(len(str(x)) for x in column) for column in columns]
    numeric = [all(c == "" or as_number(c) is not None for c in column[1:]) for column in columns]

    def line(cells, align=True):
        out = [
            str(c).rjust(w) if align and right else str(c).ljust(w)
            for c, w, right in zip(cells, widths, numeric, strict=True)
        ]
        return "  ".join(out).rstrip()

    rule = ["-" * w for w in widths]
    return "\n".join([line(header, False), line(rule, False), *map(line, rows)])
