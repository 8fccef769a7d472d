"""The only module that talks to MLflow. It mirrors a finished run directory; it never feeds
anything back into generation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from keyframes.config import TrackingConfig

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
BATCH = 100  # MLflow accepts at most 100 params or tags per log_batch call


@dataclass
class RunRecord:
    """Everything one job logs, gathered from the run directory's records."""

    experiment: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    image_metrics: list[dict[str, float]]  # one dict per image; list index = MLflow step
    summary: dict[str, float]
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)  # (local, artifact dir)
    start_ms: int = 0
    end_ms: int = 0


def tracking_uri(cfg: TrackingConfig) -> str:
    """Make a local SQLite store's folder exist; leave server URIs alone."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return uri


def _artifact_location(cfg: TrackingConfig) -> str | None:
    if cfg.artifact_root:
        return Path(cfg.artifact_root).expanduser().resolve().as_uri()
    if cfg.tracking_uri.startswith("sqlite:///"):
        db = Path(cfg.tracking_uri.removeprefix("sqlite:///")).expanduser().resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def log_run(cfg: TrackingConfig, record: RunRecord) -> str:
    """Create one finished MLflow run from the record; returns its run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # store migrations are not news
    client = MlflowClient(tracking_uri=tracking_uri(cfg))
    experiment = client.get_experiment_by_name(record.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(record.experiment, artifact_location=_artifact_location(cfg))
    )
    run = client.create_run(
        experiment_id, start_time=record.start_ms, tags=record.tags, run_name=record.run_name
    )
    run_id = run.info.run_id
    try:
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(record.params.items())]
        for i in range(0, len(params), BATCH):
            client.log_batch(run_id, params=params[i : i + BATCH])
        now = record.end_ms or int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, step)
            for step, values in enumerate(record.image_metrics)
            for key, value in values.items()
        ]
        metrics += [Metric(key, float(value), now, 0) for key, value in record.summary.items()]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for local, artifact_dir in record.artifacts:
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_dir)
            elif local.exists():
                client.log_artifact(run_id, str(local), artifact_dir)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED", end_time=record.end_ms or None)
    return run_id
