"""One self-contained HTML page to review keyframes: scenes as rows, and as columns the takes
of a run or the jobs of a sweep. Each cell: a thumbnail (inline, so the page needs no server,
no network and no other file), the scores and the seed; a click shows the full image. The
best cell of a scene for each score is starred; rows and columns sort by a score.

The full images are the PNGs beside the page (relative paths), or, where the page is shown
by MLflow's artifact viewer (a sandboxed frame with no address of its own), the same files
among the MLflow run's artifacts: each cell knows its run (a sweep's jobs) or leaves it to
the page's, which the tracking layer fills in when it logs the page (`with_run_id`)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from keyframes.outputs.atomic import atomic_write
from keyframes.outputs.records import ImageRecord

REVIEW_PAGE = "review.html"
TEMPLATE = Path(__file__).resolve().parent.parent / "data" / "review_page.html"  # CSS and JS
RUN_ID_MARK = "__keyframes_run_id__"  # the page's own MLflow run, once it is logged
THUMBNAIL_WIDTH = 240  # pixels; about 8 KB each as JPEG, so 800 cells stay a few MB
# the scores a cell shows, as (key, label): what the ImageRecord calls them
SCORES = (("clip_score", "CLIP"), ("aesthetic_score", "aesthetic"), ("character", "character"))


@dataclass(frozen=True)
class ReviewCell:
    file: str | None  # the full image, relative to the page; None: no image
    artifact: str | None  # its path among its MLflow run's artifacts
    run_id: str | None  # that MLflow run; None: the page's own
    thumbnail: str | None  # a data: URI
    seed: int | None
    scores: dict[str, float] = field(default_factory=dict)
    note: str | None = None  # why there is no picture


@dataclass(frozen=True)
class ReviewRow:
    scene_id: str
    description: str
    cells: list[ReviewCell | None]  # one per column; None: not made in that column


def thumbnail_uri(path: Path) -> str | None:
    """A small JPEG of the image as a data: URI; None where the file cannot be read."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            height = max(1, round(image.height * THUMBNAIL_WIDTH / image.width))
            small = image.resize((THUMBNAIL_WIDTH, height), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def record_cell(
    record: ImageRecord, run_dir: Path, page_dir: Path, run_id: str | None = None
) -> ReviewCell:
    """A cell for one image record of the run in run_dir, for a page in page_dir."""
    path = run_dir / record.file
    thumbnail = thumbnail_uri(path) if record.ok else None
    scores = {"clip_score": record.clip_score, "aesthetic_score": record.aesthetic_score}
    similar = [v["others"] for v in (record.character_similarity or {}).values() if "others" in v]
    scores["character"] = round(sum(similar) / len(similar), 4) if similar else None
    note = None if thumbnail else (record.error or "the file cannot be read")
    return ReviewCell(
        file=os.path.relpath(path, page_dir) if thumbnail else None,
        artifact=record.file,
        run_id=run_id,
        thumbnail=thumbnail,
        seed=record.seed,
        scores={k: v for k, v in scores.items() if v is not None},
        note=note,
    )


def run_rows(run_dir: Path, images: list[ImageRecord]) -> tuple[list[str], list[ReviewRow]]:
    """(column titles, rows) of a run: its scenes in order (portraits first), its takes."""
    takes = max((r.take for r in images), default=1)
    scenes: dict[str, list[ImageRecord]] = {}
    for record in sorted(images, key=lambda r: (r.scene_index, r.index)):
        scenes.setdefault(record.scene_id, []).append(record)
    rows = []
    for scene_id, records in scenes.items():
        by_take = {r.take: record_cell(r, run_dir, run_dir) for r in records}
        rows.append(
            ReviewRow(
                scene_id, records[0].description, [by_take.get(t) for t in range(1, takes + 1)]
            )
        )
    return [f"take {t}" for t in range(1, takes + 1)], rows


def write_review(
    path: Path, title: str, subtitle: str, columns: list[str], rows: list[ReviewRow]
) -> Path:
    """The page at path (written whole or not at all)."""
    page = review_html(title, subtitle, columns, rows)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return path


def with_run_id(page: str, run_id: str) -> str:
    """The page as MLflow keeps it: its own cells' full images are that run's artifacts."""
    return page.replace(RUN_ID_MARK, run_id)


def review_html(title: str, subtitle: str, columns: list[str], rows: list[ReviewRow]) -> str:
    data = {
        "title": title,
        "subtitle": subtitle,
        "run_id": RUN_ID_MARK,
        "columns": columns,
        "scores": [list(score) for score in SCORES],
        "rows": [
            {
                "scene": row.scene_id,
                "description": row.description,
                "cells": [asdict(cell) if cell else None for cell in row.cells],
            }
            for row in rows
        ],
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    values = {"title": html.escape(title), "data": payload}  # one pass: neither is read again
    return re.sub(r"\{(title|data)\}", lambda m: values[m[1]], TEMPLATE.read_text("utf-8"))
