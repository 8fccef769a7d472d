"""The only module that talks to MLflow. It mirrors a finished run directory; it never feeds
anything back into generation."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from keyframes.config.schema import TrackingConfig
from keyframes.errors import TrackingError, first_line
from keyframes.outputs.atomic import is_temporary, temp_path
from keyframes.outputs.review_page import REVIEW_PAGE, with_run_id
from keyframes.tracking import review
from keyframes.tracking.review import TABLE_FILE

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"  # what nests a run under another in the MLflow UI
NOTE_TAG = "mlflow.note.content"  # the run page's description, rendered as Markdown
COLOUR_TAG = "mlflow.runColor"  # the run's colour in the runs table and charts
KIND_TAG = "mlflow.experimentKind"  # model development: the UI's runs, not GenAI traces
KIND = "custom_model_development"
THUMBNAIL = 384  # px, longest side, of the keyed images (MLflow adds a 256 px webp)
TABLE_THUMBNAIL = 256
SWEEP_TAG = "keyframes.sweep"  # marks a sweep's parent run
KEY_TAG = "keyframes.run_key"  # one MLflow run per run directory
CONTENT_TAG = "keyframes.images_sha256"  # what its images' records were when it was logged


@dataclass
class RunRecord:
    """Everything one job logs, gathered from the run directory's records."""

    experiment: str
    run_name: str
    params: dict[str, str]
    tags: dict[str, str]
    image_metrics: dict[int, dict[str, float]]  # MLflow step (image index) -> metrics
    summary: dict[str, float]
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)  # (local, artifact dir)
    start_ms: int = 0
    end_ms: int = 0
    parent_run_id: str | None = None  # set for the jobs of a sweep
    status: str = "FINISHED"  # FINISHED | FAILED (some images failed) | KILLED (interrupted)
    key: str = ""  # identifies the run directory's run: logging it again changes nothing
    content: str = ""  # a digest of its image records: a resume that remade one logs anew
    replaces: str | None = None  # remake=true: the key of the run this one replaces
    description: str = ""  # Markdown, on the run page
    colour: str | None = None  # "#rrggbb"; None: MLflow's own
    keyed_images: list[tuple[str, int, Path]] = field(default_factory=list)  # (key, step, PNG)
    table: dict[str, list] | None = None  # column -> values; Path values become thumbnails
    view_sort: str | None = None  # update the experiment's saved view, sorted by this metric


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store URI; None for servers."""
    return (
        Path(uri.removeprefix("sqlite:///")).expanduser() if uri.startswith("sqlite:///") else None
    )


def absolute_uri(uri: str) -> str:
    """A SQLite store's URI with its absolute path (it works from any folder); others as given."""
    db = _sqlite_file(uri)
    return f"sqlite:///{db.resolve()}" if db is not None else uri


def _artifact_location(cfg: TrackingConfig) -> str | None:
    if cfg.artifact_root:
        return Path(cfg.artifact_root).expanduser().resolve().as_uri()
    if db := _sqlite_file(cfg.tracking_uri):
        return (db.resolve().parent / "mlartifacts").as_uri()
    return None  # a tracking server decides


def log_run(cfg: TrackingConfig, record: RunRecord) -> tuple[str, bool]:
    """(run id, created?). A run with the same key, status and image records is left alone; one
    with the same key and another status (an interrupted run that has been resumed, a logging
    attempt that broke off) or other records (a resume that made a damaged keyframe again) is
    replaced. SQLite's "database is locked" is retried a few times."""
    return _retry_when_locked(lambda: _log_run(cfg, record))


def _log_run(cfg: TrackingConfig, record: RunRecord) -> tuple[str, bool]:
    from mlflow.entities import Metric, Param

    client = _client(cfg.tracking_uri)
    experiment_id = _experiment_id(client, cfg, record.experiment)
    if record.key:
        for old in client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{record.key}'"):
            same = old.data.tags.get(CONTENT_TAG, record.content) == record.content
            if old.info.status == record.status and same:
                return old.info.run_id, False
            client.delete_run(old.info.run_id)
    if record.replaces:
        for old in client.search_runs([experiment_id], f"tags.`{KEY_TAG}` = '{record.replaces}'"):
            client.delete_run(old.info.run_id)
    tags = {**record.tags, KEY_TAG: record.key} if record.key else dict(record.tags)
    if record.content:
        tags[CONTENT_TAG] = record.content
    if record.parent_run_id:
        tags[PARENT_TAG] = record.parent_run_id
    if record.description:
        tags[NOTE_TAG] = review.cut(record.description, review.MAX_NOTE_CHARS)
    if record.colour:
        tags[COLOUR_TAG] = record.colour
    run = client.create_run(
        experiment_id, start_time=record.start_ms, tags=tags, run_name=record.run_name
    )
    run_id = run.info.run_id
    now = record.end_ms or int(time.time() * 1000)
    # the run's figures first: the run page lists metrics in the order they were logged
    metrics = [Metric(key, float(value), now, 0) for key, value in record.summary.items()]
    metrics += [
        Metric(key, float(value), now, step)
        for step, values in sorted(record.image_metrics.items())
        for key, value in values.items()
    ]
    # MLflow splits a batch into calls its store accepts, and cuts a param value past its
    # 6000-character limit (with a warning), so one call says it all
    params = [Param(k, str(v)) for k, v in sorted(record.params.items())]
    client.log_batch(run_id, params=params, metrics=metrics)
    _log_artifacts(client, run_id, record.artifacts)
    _log_pictures(client, run_id, record, now)
    if record.keyed_images and record.view_sort:
        keys = [key for key, _, _ in record.keyed_images]
        _update_view(client, cfg, experiment_id, keys, record.view_sort, now)
    # Terminated last: a run that is not FINISHED/FAILED/KILLED was cut off while logging.
    client.set_terminated(run_id, status=record.status, end_time=record.end_ms or None)
    return run_id, True


# Errors of a SQLite store that another process is writing right now: worth a retry. The
# second comes from a new store's set-up racing another process that does not take the lock
# _client takes (an older keyframes, a hand-made client).
BUSY = ("database is locked", "Online migration expected to match one row")


def _retry_when_locked(call, tries: int = 6, first_wait: float = 0.5):
    for attempt in range(tries):
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - SQLAlchemy/MLflow wrap the SQLite error differently
            if not any(text in str(e) for text in BUSY) or attempt == tries - 1:
                raise
            log.warning("tracking store is locked; retrying in %.1f s", first_wait * 2**attempt)
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def _client(uri: str, create: bool = True):
    """A client of the store. A new SQLite store is made whole or not at all (create=False:
    a reading command, which never makes one: a mistyped path is an error, not a new store)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # An unreachable server should cost seconds, not MLflow's default of minutes of retries:
    # the run directory keeps everything, and keyframes.sync logs it later.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)  # store migrations are not news
    db = _sqlite_file(uri)
    if db is None:
        return MlflowClient(tracking_uri=uri)
    if not create and not db.is_file():
        raise TrackingError(f"no MLflow store at {db} (from {uri}): check the path")
    db.parent.mkdir(parents=True, exist_ok=True)
    # A new store's tables are created (migrated) on first use. Two processes doing that at
    # once corrupt each other's migration, so the first use is one process at a time.
    with sqlite_lock(db):
        if not db.exists():
            _create_sqlite_store(db)
        try:  # the first client of a store migrates one of an older MLflow
            client = MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors, as MLflow wraps them
            if "already exists" not in str(e):
                raise
            _set_aside_half_made(db, e)
            _forget_engine(uri)  # its connections were to the file just moved aside
            _create_sqlite_store(db)
            client = MlflowClient(tracking_uri=uri)
        return client


@contextlib.contextmanager
def sqlite_lock(db: Path):
    """One process at a time on a local store's set-up and read-modify-writes."""
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _create_sqlite_store(db: Path) -> None:
    """Make the store's tables under a temporary name, then rename it into place: a kill
    during the migration (seconds, dozens of steps) leaves a leftover to delete, never a
    store that no client can open."""
    from mlflow.tracking import MlflowClient

    tmp = temp_path(db)
    for leftover in (tmp, tmp.with_name(tmp.name + "-journal")):
        leftover.unlink(missing_ok=True)  # an earlier creation, killed (we hold the lock)
    MlflowClient(tracking_uri=f"sqlite:///{tmp}").search_experiments(max_results=1)
    _forget_engine(f"sqlite:///{tmp}")
    os.replace(tmp, db)


def _forget_engine(uri: str) -> None:
    """Close MLflow's cached SQLAlchemy engine of a SQLite file that was renamed or replaced
    (MLflow keeps one per URI for the process's lifetime)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    engine = SqlAlchemyStore._engine_map.pop(uri, None)
    if engine is not None:
        engine.dispose()


def _set_aside_half_made(db: Path, error: Exception) -> None:
    """A store whose creation a kill cut off (by an earlier keyframes, or another tool) fails
    every client with "table ... already exists". Holding no run, it is moved aside (and a new
    one made); holding runs, it is the user's to mend, and the message says so."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as con:
        try:
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
        except sqlite3.Error:
            runs = 0  # not even the runs table was made
    if runs:
        raise TrackingError(
            f"the MLflow store {db} is half-migrated ({first_line(error)}) and holds {runs} "
            "runs; keyframes leaves it as it is. Copy it somewhere safe, then try "
            f"`uv run mlflow db upgrade sqlite:///{db}`, or use another store "
            "(mlflow.tracking_uri=...)"
        )
    aside = db.with_name(f"{db.name}.half-made-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(db, aside)
    log.warning(
        "the MLflow store %s was left half-made by a stop while it was created (it "
        "held no runs); moved to %s and made again",
        db,
        aside,
    )


def _experiment_id(client, cfg: TrackingConfig, name: str) -> str:
    """The experiment's id; made if new, and marked as model development either way. Jobs
    starting together may both find it new: the one that loses the race reads it back."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=_artifact_location(cfg), tags={KIND_TAG: KIND}
            )
        except Exception as e:  # noqa: BLE001 - MlflowException, or the store's IntegrityError
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            log.debug("experiment %r was made by another process (%s)", name, first_line(e))
    if experiment.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(experiment.experiment_id, KIND_TAG, KIND)
    return experiment.experiment_id


def experiment_id(uri: str, name: str) -> str | None:
    experiment = _client(uri, create=False).get_experiment_by_name(name)
    return experiment.experiment_id if experiment else None


def _update_view(
    client, cfg: TrackingConfig, experiment_id: str, keys: list[str], sort_by: str, now: int
) -> None:
    """keyframes' saved view of the experiment, grown by this run's image keys. A
    read-modify-write: on a local store one process at a time (its lock); on a server it is
    read back, and written again if a job logging at the same moment dropped these keys."""
    db = _sqlite_file(cfg.tracking_uri)
    with sqlite_lock(db) if db else contextlib.nullcontext():
        for _ in range(5):
            old = client.get_experiment(experiment_id).tags.get(review.VIEW_TAG)
            known = review.view_keys(old)
            merged = known + [k for k in keys if k not in known]
            view = review.saved_view(merged, sort_by, now)  # drops keys where it is too long
            client.set_experiment_tag(experiment_id, review.VIEW_TAG, view)
            ours = set(keys) & set(review.view_keys(view))
            now_there = client.get_experiment(experiment_id).tags.get(review.VIEW_TAG)
            if ours <= set(review.view_keys(now_there)):
                return
            time.sleep(0.2)


def _log_pictures(client, run_id: str, record: RunRecord, now: int) -> None:
    """Each keyframe as a keyed image (the chart view's image grid lines one key up across
    runs), and the per-image table with a thumbnail per row. Small copies: the full PNGs are
    the artifacts under keyframes/. Each PNG is decoded once (most of the cost)."""
    from PIL import Image

    thumbnails: dict[Path, Image.Image] = {}

    def thumbnail(path: Path, size: int):
        if path not in thumbnails:
            with Image.open(path) as image:
                small = image.convert("RGB")
                small.thumbnail((THUMBNAIL, THUMBNAIL))
                thumbnails[path] = small
        if size == THUMBNAIL:
            return thumbnails[path]
        smaller = thumbnails[path].copy()
        smaller.thumbnail((size, size))
        return smaller

    for key, step, path in record.keyed_images:
        client.log_image(run_id, thumbnail(path, THUMBNAIL), key=key, step=step, timestamp=now)
    if record.table:
        table = {
            column: [thumbnail(v, TABLE_THUMBNAIL) if isinstance(v, Path) else v for v in values]
            for column, values in record.table.items()
        }
        with warnings.catch_warnings():  # pandas' notes on MLflow's own dtype checks
            warnings.simplefilter("ignore", DeprecationWarning)
            client.log_table(run_id, data=table, artifact_file=TABLE_FILE)


def _log_artifacts(client, run_id: str, artifacts: list[tuple[Path, str | None]]) -> None:
    """Files, and the files of folders (not their temporary files: a kill's leftovers)."""
    for local, artifact_dir in artifacts:
        if local.is_dir():
            for path in sorted(local.iterdir()):
                if path.is_file() and not is_temporary(path):
                    _log_artifact(client, run_id, path, artifact_dir)
        elif local.is_file():
            _log_artifact(client, run_id, local, artifact_dir)


def _log_artifact(client, run_id: str, path: Path, artifact_dir: str | None) -> None:
    """One file; a review page as MLflow shows it: its pictures among this run's artifacts."""
    if path.name != REVIEW_PAGE:
        client.log_artifact(run_id, str(path), artifact_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / REVIEW_PAGE
        page.write_text(with_run_id(path.read_text(encoding="utf-8"), run_id), encoding="utf-8")
        client.log_artifact(run_id, str(page), artifact_dir)


def start_parent_run(
    cfg: TrackingConfig, experiment: str, run_name: str, tags: dict[str, str], colour: str
) -> str:
    """The run a sweep's jobs nest under; it stays RUNNING until finish_parent_run."""
    client = _client(cfg.tracking_uri)
    tags = {SWEEP_TAG: "true", COLOUR_TAG: colour, **tags}
    run = client.create_run(_experiment_id(client, cfg, experiment), tags=tags, run_name=run_name)
    return run.info.run_id


def finish_parent_run(
    cfg: TrackingConfig,
    run_id: str,
    tags: dict[str, str],
    metrics: dict[str, float],
    table: dict[str, list] | None,
    artifacts: list[tuple[Path, str | None]],
    status: str = "FINISHED",
    run_name: str | None = None,
    description: str = "",
) -> None:
    from mlflow.entities import Metric, RunTag

    client = _client(cfg.tracking_uri)
    if run_name:
        client.update_run(run_id, name=run_name)
    if description:
        tags = {**tags, NOTE_TAG: review.cut(description, review.MAX_NOTE_CHARS)}
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
    )
    if table:
        client.log_table(run_id, data=table, artifact_file="summary_table.json")
    _log_artifacts(client, run_id, artifacts)
    client.set_terminated(run_id, status=status)


def run_experiment(uri: str, run_id: str) -> str:
    """The experiment id of a run in this store; TrackingError where there is none."""
    client = _client(uri, create=False)
    try:
        return client.get_run(run_id).info.experiment_id
    except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids, by store
        raise TrackingError(f"no run {run_id} in {uri} ({first_line(e)})") from None


@dataclass
class StoredRun:
    run_id: str
    name: str
    experiment: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    status: str = ""  # MLflow's: FINISHED, FAILED, KILLED, RUNNING


def find_runs(uri: str, experiment: str | None = None, parent: str | None = None):
    """(what was selected, runs). parent: that sweep's jobs; experiment alone: every job run in
    it (sweep parents left out); neither: the jobs of the newest sweep in the store."""
    client = _client(uri, create=False)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    if experiment is not None:
        ids = [i for i, name in experiments.items() if name == experiment]
        if not ids:
            known = ", ".join(sorted(experiments.values())) or "none"
            raise TrackingError(f"no experiment named {experiment!r} in {uri} (there are: {known})")
    else:
        ids = list(experiments)
    if parent is None and experiment is None:
        sweeps = client.search_runs(
            ids, f"tags.`{SWEEP_TAG}` = 'true'", order_by=["start_time DESC"], max_results=1
        )
        if not sweeps:
            raise TrackingError(f"no sweep in {uri}; name one with --parent or --experiment")
        parent = sweeps[0].info.run_id
    if parent is not None:
        try:
            parent_run = client.get_run(parent)
        except Exception as e:  # noqa: BLE001 - MlflowException for unknown ids, by store
            raise TrackingError(f"no run {parent} in {uri}") from e
        runs = client.search_runs(
            [parent_run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=50000
        )
        label = f"sweep {parent} ({parent_run.info.run_name})"
    else:
        runs = client.search_runs(ids, max_results=50000)
        runs = [r for r in runs if r.data.tags.get(SWEEP_TAG) != "true"]
        label = f"experiment {experiment!r}"
    return label, [
        StoredRun(
            run_id=r.info.run_id,
            name=r.info.run_name or r.info.run_id[:8],
            experiment=experiments.get(r.info.experiment_id, r.info.experiment_id),
            params=r.data.params,
            metrics=r.data.metrics,
            tags=r.data.tags,
            status=r.info.status,
        )
        for r in sorted(runs, key=lambda r: r.info.start_time or 0)
    ]


def download_artifacts(uri: str, run_id: str, path: str, dst: Path) -> Path:
    from mlflow.artifacts import download_artifacts as download

    dst.mkdir(parents=True, exist_ok=True)
    return Path(download(run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri))
