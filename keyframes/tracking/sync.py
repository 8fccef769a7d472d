"""The MLflow run of a run directory, rebuilt from manifest.json and config.yaml alone (the
run directory is the source of truth). Syncing twice does not create a second run."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from keyframes.config.plan import flatten
from keyframes.config.schema import TrackingConfig
from keyframes.errors import KeyframesError, first_line
from keyframes.outputs.atomic import is_temporary
from keyframes.outputs.files import inside, keyframe_file, regular_file
from keyframes.outputs.manifest import load_manifest, write_manifest
from keyframes.outputs.records import ImageRecord, Manifest, RunInfo, derive_run_key
from keyframes.outputs.review_page import REVIEW_PAGE
from keyframes.tracking import review
from keyframes.tracking.results import parse_overrides, settings_used
from keyframes.tracking.store import RunRecord

log = logging.getLogger("keyframes")
PER_IMAGE = (
    "clip_score",
    "clip_score_prompt",
    "aesthetic_score",
    "unet_evaluations",
    "unet_shallow_evaluations",
    "tflops",
    "seconds",
    "vram_peak_gb",
    "rss_peak_gb",
)
STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
RUN_STATUS = {mlflow: ours for ours, mlflow in STATUS.items()}  # MLflow's status -> the manifest's


def read_run_dir(run_dir: Path) -> tuple[Manifest, dict[str, Any]]:
    """(manifest, resolved config) of a run directory."""
    manifest_path, config_path = run_dir / "manifest.json", run_dir / "config.yaml"
    for path in (manifest_path, config_path):
        if not path.is_file():
            raise KeyframesError(
                f"{run_dir} is not a keyframes run directory: {path.name} is missing"
            )
    try:
        manifest = load_manifest(manifest_path)  # with its journal: a killed run loses nothing
    except ValueError as e:
        raise KeyframesError(f"{manifest_path} is unreadable: {first_line(e)}") from None
    config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    return manifest, config


def record_from_run_dir(run_dir: Path, manifest: Manifest, config: dict[str, Any]) -> RunRecord:
    """The MLflow run of a run directory, from its manifest and resolved config."""
    run, images = manifest.run, manifest.images
    ok = [r for r in images if r.ok and keyframe_file(run_dir, r.file)]
    keys = review.image_keys(images)  # over every image, so a failed one moves no other key
    return RunRecord(
        experiment=run.experiment,
        run_name=run_name(run, config),
        description=review.run_description(run, images, config),
        colour=review.JOB_COLOURS[run.sweep.job_num % len(review.JOB_COLOURS)]
        if run.sweep
        else None,
        keyed_images=[(keys[r.index], r.index, run_dir / r.file) for r in ok],
        table=image_table(run_dir, ok),
        view_sort=config.get("objective", "clip_score_mean"),
        # unset (null) settings left out: the UI lists every param beside each run's name,
        # in image grids too; config.yaml keeps them all
        params={k: v for k, v in flatten(config).items() if v != "null"},
        tags=run_tags(run_dir, run, images),
        image_metrics={
            r.index: {k: getattr(r, k) for k in PER_IMAGE if getattr(r, k) is not None}
            for r in images
            if r.ok
        },
        summary=run.summary or {},
        artifacts=artifact_files(run_dir, ok),
        start_ms=_ms(run.started_at),
        end_ms=_ms(run.finished_at or run.started_at),
        parent_run_id=run.sweep.parent_run_id if run.sweep else None,
        status=STATUS.get(run.status, "FINISHED"),
        key=run.run_key,
        content=hashlib.sha256(
            json.dumps([r.to_json() for r in images], sort_keys=True).encode()
        ).hexdigest()[:20],
        replaces=run.replaces_run_key,
    )


def artifact_files(run_dir: Path, made: list[ImageRecord]) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of what MLflow keeps: the whole keyframes on record, the
    contact sheets, manifest, config, logs (run.log as far as it got) and Hydra's record.
    Only regular files inside the run folder; never a temporary file a kill left behind."""
    candidates = [run_dir / r.file for r in made]
    candidates += sorted(run_dir.glob("contact_sheet*.png")) + [run_dir / REVIEW_PAGE]
    candidates += [run_dir / "manifest.json", run_dir / "config.yaml"]
    candidates += sorted(run_dir.glob("*.log")) + sorted(run_dir.glob(".hydra/*"))
    files = []
    for path in candidates:
        name = path.relative_to(run_dir).as_posix()
        if is_temporary(path) or not regular_file(path) or inside(run_dir, name) is None:
            continue
        folder = path.parent.relative_to(run_dir).as_posix().replace(".hydra", "hydra")
        files.append((path, None if folder == "." else folder))
    return files


def run_name(run: RunInfo, config: dict[str, Any]) -> str:
    """A sweep job by the values its sweep varies; any other run by its main settings."""
    if not run.sweep:
        return review.single_run_name(run, config["steps"], config["cfg_scale"], config["seed"])
    keys = run.sweep.swept_keys
    values = settings_used(flatten(config), keys, parse_overrides(run.overrides))
    return review.job_run_name(values, run.sweep.job_num)


def image_table(run_dir: Path, images: list[ImageRecord]) -> dict[str, list] | None:
    """One row per keyframe: a thumbnail (the PNG's path; the store makes it small), what it
    shows and how it scored."""
    if not images:
        return None
    columns: dict[str, list] = {
        "image": [run_dir / r.file for r in images],
        "scene": [r.scene_id for r in images],
        "take": [r.take for r in images],
        "seed": [r.seed for r in images],
        "clip_score": [r.clip_score for r in images],
        "aesthetic_score": [r.aesthetic_score for r in images],
        "seconds": [r.seconds for r in images],
        "file": [r.file for r in images],
    }
    return {k: v for k, v in columns.items() if any(x is not None for x in v)}


def run_tags(run_dir: Path, run: RunInfo, images: list[ImageRecord]) -> dict[str, str]:
    """What made the run and how it went, as MLflow tags (searchable, shown on the run page)."""
    tags = {
        "keyframes.model": run.model,
        "keyframes.model_source": run.model_source,
        "keyframes.style": run.style,
        "keyframes.sampler": run.sampler,
        "keyframes.quality": run.quality,
        "keyframes.device": run.device,
        "keyframes.dtype": run.dtype,
        "keyframes.shotlist": run.shotlist,
        "keyframes.run_dir": str(run_dir.resolve()),
        "keyframes.config_hash": run.config_hash,
        "keyframes.overrides": json.dumps(run.overrides),
        **{f"version.{name}": v for name, v in run.versions.items()},
    }
    if run.error:  # why it stopped early: a full disk, SLURM's time limit or scancel
        tags["keyframes.stopped"] = run.error
    if run.pipeline_cache:
        tags["pipeline_cache"] = run.pipeline_cache
    if run.memory:
        tags["keyframes.memory_mode"] = run.memory.mode
    if run.loras:
        tags["keyframes.loras"] = ", ".join(
            f"{r['name']}:{r['scale']:g}" + (f" ({r['sha256']})" if r["sha256"] else "")
            for r in run.loras
        )
    if run.embeddings:
        tags["keyframes.embeddings"] = ", ".join(
            f"{r['token']} ({r['sha256']})" for r in run.embeddings
        )
    if run.speed:
        tags["keyframes.speed"] = run.speed.preset
    if run.git_commit:
        tags["mlflow.source.git.commit"] = run.git_commit
    failed = [r.file for r in images if not r.ok]
    if failed:
        tags["failed_images"] = ", ".join(failed)[:5000]
    if run.fallbacks:
        tags["fallbacks"] = json.dumps(run.fallbacks)[:5000]
    if run.sweep:
        tags["keyframes.sweep_dir"] = run.sweep.sweep_dir
        tags["keyframes.job_num"] = str(run.sweep.job_num)
    return tags


def fill_older_run(run: RunInfo, config: dict[str, Any], run_dir: Path) -> None:
    """What a manifest of an earlier version lacks and sync needs, derived from what it has
    (and then written back with the MLflow run id): its experiment, from the config or the
    title, and its run key, from the run's settings, start and folder, so that every later
    sync finds the run it logged instead of adding another."""
    if not run.experiment:
        run.experiment = (config.get("mlflow") or {}).get("experiment_name") or run.title
    if not run.run_key:
        run.run_key = derive_run_key(run.config_hash, run.shotlist_sha256, run.started_at, run_dir)


def _ms(iso: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def sync_run_dir(run_dir: Path, tracking: TrackingConfig) -> tuple[str, bool]:
    """(MLflow run id, True if it was logged now / False if it was already there). Notes the
    run id in the manifest."""
    from keyframes.tracking.store import log_run

    manifest, config = read_run_dir(run_dir)
    fill_older_run(manifest.run, config, run_dir)
    record = record_from_run_dir(run_dir, manifest, config)
    run_id, created = log_run(tracking, record)
    manifest.run.mlflow = {
        "tracking_uri": tracking.tracking_uri,
        "experiment": record.experiment,
        "run_id": run_id,
    }
    write_manifest(run_dir, manifest)
    return run_id, created


def load_tracking() -> None:
    """Import what logging a run uses (MLflow, its SQL store, the HTTP client): seconds of
    imports that a caller may want to finish before a stop is let in."""
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.tracking  # noqa: F401
    import requests  # noqa: F401
    import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401 - loaded by create_engine


def track_run(run_dir: Path, tracking: TrackingConfig, experiment: str, in_sweep: bool) -> None:
    """Mirror the run directory into MLflow. A store that cannot be reached costs a warning,
    not the run: the images and manifest are on disk, and keyframes.sync logs them later."""
    try:
        run_id, _ = sync_run_dir(run_dir, tracking)
    except Exception as e:  # noqa: BLE001 - any store failure; the run's files are safe
        log.warning(
            "MLflow store %s could not be written (%s). The keyframes and manifest are safe in "
            "%s; log them later with: uv run python -m keyframes.sync %s",
            tracking.tracking_uri,
            first_line(e),
            run_dir,
            run_dir,
        )
        return
    log.info("MLflow run %s in experiment %r (%s)", run_id, experiment, tracking.tracking_uri)
    if not in_sweep:
        log_review(tracking, run_id, run_dir / REVIEW_PAGE)


def log_review(tracking: TrackingConfig, run_id: str, page: Path) -> None:
    """How to look at a run or a sweep (run_id: its parent): its review page on disk, and
    the same page in MLflow's UI, started from any folder for a local store."""
    from keyframes.tracking.store import absolute_uri, run_experiment

    log.info("review: %s", page.resolve().as_uri())
    uri = tracking.tracking_uri
    if uri.startswith("sqlite:"):
        log.info(
            "in MLflow: uv run python -m keyframes.review --store %s --run %s  (starts the UI "
            "on a free 127.0.0.1 port and prints the page; its first start can take a minute)",
            absolute_uri(uri),
            run_id,
        )
        return
    try:
        experiment = run_experiment(uri, run_id)
    except Exception:  # noqa: BLE001 - a link is a courtesy; the run is logged
        return
    log.info("in MLflow: %s", review.review_page_url(uri, experiment, run_id))
