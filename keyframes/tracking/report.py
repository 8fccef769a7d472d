"""Pictures of a comparison: X/Y grids of keyframes per scene, metric plots, the CSV table."""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from keyframes.outputs.atomic import atomic_write
from keyframes.outputs.contact_sheet import fit_text, load_font
from keyframes.outputs.review_page import REVIEW_PAGE, ReviewRow, record_cell, write_review
from keyframes.shotlist.jobs import safe_name, unique_safe_names
from keyframes.tracking.results import (
    JobResult,
    as_number,
    best_and_fastest,
    describe,
    format_table,
    grid_axes,
    sort_values,
    table,
    varying_keys,
)

CELL_WIDTH = 320
PLOT_METRICS = (
    ("clip_score_mean", "CLIP score (mean)"),
    ("aesthetic_score_mean", "aesthetic score (mean)"),
    ("character_consistency", "character consistency"),
    ("seconds_per_image_mean", "seconds per image"),
    ("tflops_per_image_mean", "TFLOP per image (counted)"),
)


@dataclass
class Report:
    header: list[str]
    rows: list[list[str]]
    text: str  # the aligned table
    best: JobResult | None
    fastest: JobResult | None
    keys: list[str]  # the keys that varied
    files: list[Path] = field(default_factory=list)


def build_report(jobs: list[JobResult], out_dir: Path, metric: str = "clip_score_mean") -> Report:
    """Write summary.csv, grids/*.png and plots/*.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, rows = table(jobs, metric)
    best, fastest = best_and_fastest(jobs, metric)
    keys = varying_keys(jobs)
    report = Report(header, rows, format_table(header, rows), best, fastest, keys)
    report.files.append(write_csv(header, rows, out_dir / "summary.csv"))
    report.files += write_grids(jobs, keys, out_dir / "grids")
    report.files += write_plots(jobs, keys, out_dir / "plots")
    if any(job.records for job in jobs):  # jobs read from their folders (not from MLflow)
        report.files.append(write_sweep_review(jobs, keys, out_dir / REVIEW_PAGE, metric))
    return report


def write_sweep_review(jobs: list[JobResult], keys: list[str], path: Path, metric: str) -> Path:
    """The sweep's review page: scenes as rows, each job a column headed by all its swept
    values; each picture from its job's folder (and, in MLflow, its job's run)."""
    scenes = list(dict.fromkeys(scene for job in jobs for scene in job.scenes))
    rows = []
    for scene in scenes:
        cells = [
            record_cell(job.records[scene], job.run_dir, path.parent, job.run_id)
            if scene in job.records and job.run_dir is not None
            else None
            for job in jobs
        ]
        first = next((job.records[scene] for job in jobs if scene in job.records), None)
        rows.append(ReviewRow(scene, first.description if first else "", cells))
    columns = [describe(job, keys) if keys else job.name for job in jobs]
    title = f"sweep over {' x '.join(keys) or 'one job'}: {len(jobs)} jobs"
    return write_review(path, title, f"ranked by {metric} in summary.csv", columns, rows)


def write_csv(header: list[str], rows: list[list[str]], path: Path) -> Path:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])

    atomic_write(path, write)
    return path


def write_grids(jobs: list[JobResult], keys: list[str], out_dir: Path) -> list[Path]:
    """One X/Y grid per scene (and per combination of the keys beyond the two axes)."""
    col_key, row_key, fold_keys = grid_axes(jobs, keys)
    scenes = list(dict.fromkeys(s for job in jobs for s in job.scenes))
    file_names = unique_safe_names(scenes)  # `a/b` and `a-b` must not share a grid
    folds = [sort_values(job.overrides.get(k, "") for job in jobs) for k in fold_keys]
    paths = []
    for fold in itertools.product(*folds):
        fixed = dict(zip(fold_keys, fold, strict=True))
        members = [j for j in jobs if all(j.overrides.get(k, "") == v for k, v in fixed.items())]
        if not members:
            continue
        for scene in scenes:
            image = xy_grid(members, scene, col_key, row_key, fixed)
            name = "__".join(
                [file_names[scene], *(safe_name(f"{k}-{v}") for k, v in fixed.items())]
            )
            path = out_dir / f"{name}.png"
            atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
            paths.append(path)
    return paths


def xy_grid(
    jobs: list[JobResult], scene: str, col_key: str | None, row_key: str | None, fixed: dict
) -> Image.Image:
    """Columns: values of col_key; rows: values of row_key; each cell the job's keyframe of
    this scene (first take) with its CLIP and aesthetic scores."""
    cols = sort_values(j.overrides.get(col_key, "") for j in jobs) if col_key else [""]
    rows = sort_values(j.overrides.get(row_key, "") for j in jobs) if row_key else [""]
    sample = next((j.keyframes[scene] for j in jobs if scene in j.keyframes), None)
    aspect = 9 / 16
    if sample is not None:
        with Image.open(sample) as im:
            aspect = im.height / im.width
    cw, ch = CELL_WIDTH, round(CELL_WIDTH * aspect)
    pad, caption, head, side = 6, 20, 28, 150 if row_key else 0
    title = f"{scene}" + "".join(f" · {k}={v}" for k, v in fixed.items())
    width = side + len(cols) * (cw + pad) + pad
    height = head + caption + len(rows) * (ch + caption + pad) + pad
    grid = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    small, big = load_font(14), load_font(16)
    draw.text((pad, 5), fit_text(draw, title, big, width - 2 * pad), fill=(240, 240, 240), font=big)
    for c, col in enumerate(cols):
        x = side + pad + c * (cw + pad)
        label = f"{col_key}={col}" if col_key else ""
        draw.text(
            (x + 2, head + 2), fit_text(draw, label, small, cw), fill=(220, 220, 120), font=small
        )
    for r, row in enumerate(rows):
        y = head + caption + r * (ch + caption + pad)
        if row_key:
            label = fit_text(draw, f"{row_key}={row}", small, side - 2 * pad)
            draw.text((pad, y + ch // 2 - 8), label, fill=(220, 220, 120), font=small)
        for c, col in enumerate(cols):
            x = side + pad + c * (cw + pad)
            job = _cell_job(jobs, col_key, col, row_key, row)
            path = job.keyframes.get(scene) if job else None
            if path is None:
                draw.rectangle((x, y, x + cw - 1, y + ch - 1), outline=(90, 90, 90))
                draw.text((x + 8, y + 8), "no image", fill=(160, 160, 160), font=small)
                continue
            with Image.open(path) as im:
                grid.paste(im.convert("RGB").resize((cw, ch), Image.Resampling.LANCZOS), (x, y))
            score, aesthetic = job.scores.get(scene), job.aesthetics.get(scene)
            text = describe(job, [k for k in (col_key, row_key) if k]) if col_key else job.name
            text += f" · CLIP {score:.1f}" if score is not None else ""
            text += f" · aes {aesthetic:.2f}" if aesthetic is not None else ""
            draw.text(
                (x + 2, y + ch + 2),
                fit_text(draw, text, small, cw),
                fill=(220, 220, 220),
                font=small,
            )
    return grid


def _cell_job(jobs, col_key, col, row_key, row) -> JobResult | None:
    for job in jobs:
        if (col_key is None or job.overrides.get(col_key, "") == col) and (
            row_key is None or job.overrides.get(row_key, "") == row
        ):
            return job
    return None


def write_plots(jobs: list[JobResult], keys: list[str], out_dir: Path) -> list[Path]:
    """For each varying key: the PLOT_METRICS against it, one line per combination of the
    other varying keys. Numbers on a numeric axis; anything else (speed=sdpa,deepcache,
    guidance_interval=[0,1],[0,0.5]) as categories in sorted order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    file_names = unique_safe_names(keys)
    for key in keys:
        values = {job.overrides.get(key, "") for job in jobs}
        numeric = all(as_number(v) is not None for v in values)
        order = sorted(values, key=as_number if numeric else str)

        def x_of(value, numeric=numeric, order=order):
            return as_number(value) if numeric else order.index(value)

        others = [k for k in keys if k != key]
        fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(5 * len(PLOT_METRICS), 3.6))
        for ax, (metric, label) in zip(axes, PLOT_METRICS, strict=True):
            groups: dict[str, list[tuple[float, float]]] = {}
            for job in jobs:
                if job.metrics.get(metric) is not None:
                    point = (x_of(job.overrides.get(key, "")), job.metrics[metric])
                    groups.setdefault(describe(job, others) if others else "all", []).append(point)
            for name, points in sorted(groups.items()):
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=name)
            ax.set_xticks([x_of(v) for v in order], None if numeric else order)
            ax.set_xlabel(key)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        drawn = [ax for ax in axes if ax.lines]  # a metric no job has draws nothing
        if others and drawn:
            drawn[-1].legend(fontsize=7, loc="best")
        fig.suptitle(f"{' / '.join(label for _, label in PLOT_METRICS)} against {key}")
        fig.tight_layout()
        path = out_dir / f"{file_names[key]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp, f=fig: f.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        paths.append(path)
    return paths
