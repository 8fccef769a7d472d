"""Around a multirun (`-m`): a parent MLflow run before the first job; the X/Y grids, the
summary table, plots and best-job tags on it after the last. The callback is named in
conf/config.yaml; each job finds its parent in the sweep folder's sweep.json."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from keyframes.config.overrides import override_keys
from keyframes.errors import KeyframesError, first_line
from keyframes.outputs.manifest import read_run
from keyframes.outputs.records import SweepRecord
from keyframes.outputs.review_page import REVIEW_PAGE
from keyframes.tracking import review
from keyframes.tracking.results import JobResult, parse_overrides

log = logging.getLogger("keyframes")

SWEEP_FILE = "sweep.json"  # in a sweep's directory: the parent run its jobs nest under


def sweep_job(sweep_dir: str, job_num: int) -> SweepRecord | None:
    """This job's place in its sweep (None outside a sweep the callback began)."""
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return SweepRecord(
        parent_run_id=info["parent_run_id"],
        experiment=info["experiment"],
        sweep_dir=sweep_dir,
        job_num=job_num,
        swept_keys=info.get("swept_keys", []),  # what the sweep varies: the jobs' run names
    )


class SweepCallback(Callback):
    """Around a multirun (`-m`): a parent MLflow run before the first job; the X/Y grids, the
    summary table, plots and best-job tags on it after the last. Named in conf/config.yaml."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _open_sweep
        try:
            begin_sweep(config)
        except KeyframesError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        _open_sweep = config

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global _open_sweep
        _open_sweep = None
        end_sweep(config)


_open_sweep: DictConfig | None = None  # begun and not ended: what close_stopped_sweep ends


def close_stopped_sweep(status: str) -> None:
    """A sweep that stopped before its last job (a job's error, an interrupt): its parent
    MLflow run gets the summary of the jobs that finished and ends `status` (FAILED or
    KILLED) instead of staying RUNNING."""
    global _open_sweep
    config, _open_sweep = _open_sweep, None
    if config is None:
        return
    sweep_dir = Path(config.hydra.sweep.dir).resolve()
    log.warning(
        "the sweep stopped before its last job: its MLflow parent run is marked %s, with the "
        "jobs that ran. Every finished job is kept in %s; the same command with "
        "hydra.sweep.dir=%s makes only what is missing",
        status,
        sweep_dir,
        sweep_dir,
    )
    try:
        end_sweep(config, stopped=status)
    except Exception as e:  # noqa: BLE001 - the jobs' folders keep everything either way
        log.warning("could not close the sweep's MLflow parent run (%s)", first_line(e))


def begin_sweep(config: DictConfig) -> None:
    from keyframes.shotlist.load import load_shotlist
    from keyframes.tracking.store import start_parent_run

    tracking = OmegaConf.to_object(config.mlflow)
    experiment = tracking.experiment_name or load_shotlist(config.shotlist, True).title
    sweep_dir = Path(config.hydra.sweep.dir)
    keys = override_keys(list(config.hydra.overrides.task))
    keys += [k for k in config.hydra.sweeper.get("params") or {} if k not in keys]  # Optuna
    try:
        parent = start_parent_run(
            tracking,
            experiment,
            run_name=review.sweep_run_name(keys),
            colour=review.SWEEP_COLOUR,
            tags={
                "keyframes.sweep_dir": str(sweep_dir.resolve()),
                "keyframes.swept_keys": ",".join(keys),
                "keyframes.overrides": json.dumps(list(config.hydra.overrides.task)),
            },
        )
    except Exception as e:  # noqa: BLE001 - the sweep runs without its parent run
        parent = None
        log.warning(
            "MLflow store %s unreachable (%s): sweep runs without a parent run",
            tracking.tracking_uri,
            first_line(e),
        )
    sweep_dir.mkdir(parents=True, exist_ok=True)
    info = {"parent_run_id": parent, "experiment": experiment, "swept_keys": keys}
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info("sweep over %s: MLflow parent run %s in %r", keys, parent, experiment)


def end_sweep(config: DictConfig, stopped: str | None = None) -> None:
    """The summary of the jobs that finished, on disk and on the parent run; stopped: the
    sweep ended early, and the parent run is marked so (FAILED or KILLED)."""
    from keyframes.tracking.report import build_report
    from keyframes.tracking.results import job_from_manifest
    from keyframes.tracking.store import finish_parent_run
    from keyframes.tracking.sync import log_review

    sweep_dir = Path(config.hydra.sweep.dir)
    info = json.loads((sweep_dir / SWEEP_FILE).read_text())
    found = sorted(sweep_dir.glob("*/manifest.json"), key=lambda p: _job_order(p.parent.name))
    manifests = [p for p in found if read_run(p)]  # a job killed at its start has none yet
    jobs = [job_from_manifest(path) for path in manifests]
    ran = len(jobs)
    jobs += _jobs_without_a_run(config, {job.name for job in jobs}, stopped)
    jobs.sort(key=lambda job: _job_order(job.name))
    summary_dir = sweep_dir / "summary"
    objective = config.objective  # what the sweeper optimised: the best is ranked by it too
    report = build_report(jobs, summary_dir, objective)
    log.info("sweep summary (%s):\n%s", summary_dir, report.text)
    tags = _best_tags(report, objective)
    parent = info["parent_run_id"]
    if parent is None:
        log.warning("no MLflow parent run; the summary is in %s", summary_dir)
        return
    columns = {
        name: [_number_or_text(row[i]) for row in report.rows]
        for i, name in enumerate(report.header)
    }
    statuses = {run.status if (run := read_run(p)) else None for p in manifests}
    description = _parent_description(info, report, tags, objective, summary_dir / "grids")
    try:
        finish_parent_run(
            OmegaConf.to_object(config.mlflow),
            parent,
            tags={k: v for k, v in tags.items() if v},
            metrics={"jobs": ran},
            table=columns,
            artifacts=[
                (summary_dir / "summary.csv", None),
                (summary_dir / REVIEW_PAGE, None),
                (summary_dir / "grids", "grids"),
                (summary_dir / "plots", "plots"),
            ],
            status=stopped or ("FINISHED" if statuses <= {"finished"} else "FAILED"),
            run_name=review.sweep_run_name(info["swept_keys"], ran),
            description=description,
        )
    except Exception as e:  # noqa: BLE001 - the summary is on disk either way
        log.warning(
            "could not log the sweep summary to MLflow (%s); it is in %s",
            first_line(e),
            summary_dir,
        )
        return
    log.info("compare again: uv run python -m keyframes.compare --parent %s", parent)
    log.info("all jobs side by side, each scene a row:")
    log_review(OmegaConf.to_object(config.mlflow), parent, summary_dir / REVIEW_PAGE)


def _best_tags(report, objective: str) -> dict[str, str]:
    """The parent run's tags naming the best job by the objective and the fastest good one."""
    from keyframes.tracking.results import describe

    tags = {}
    if report.best:
        tags |= {
            "best_job": describe(report.best, report.keys),
            "best_run_id": report.best.run_id,
            "best_by": objective,
        }
        log.info("best by %s: %s", objective, tags["best_job"])
    if report.fastest:
        tags |= {
            "fastest_good_job": describe(report.fastest, report.keys),
            "fastest_good_run_id": report.fastest.run_id,
        }
        log.info("fastest within 1 point of the best: %s", tags["fastest_good_job"])
    return tags


def _parent_description(info: dict, report, tags: dict, objective: str, grids: Path) -> str:
    described = {
        name: {"settings": tags[f"{name}_job"], "run_id": tags[f"{name}_run_id"]}
        for name in ("best", "fastest_good")
        if tags.get(f"{name}_job")
    }
    return review.sweep_description(
        info["experiment"],
        report.keys or info["swept_keys"],
        objective,
        [dict(zip(report.header, row, strict=True)) for row in report.rows],
        described.get("best"),
        described.get("fastest_good"),
        sorted(p.name for p in grids.glob("*.png")),
        info["parent_run_id"],
    )


def _jobs_without_a_run(config: DictConfig, seen: set[str], stopped: str | None) -> list[JobResult]:
    """The jobs of a basic sweep that left no run folder (refused at their start, e.g. a
    node without the model, or never started: the sweep was stopped): rows that say so."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not config.hydra.sweeper._target_.endswith(".BasicSweeper"):
        return []  # a search sweeper (Optuna) picks its jobs as it goes
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    [planned] = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    why = "not started: the sweep was stopped" if stopped == "KILLED" else None
    why = why or "failed: no run (its log says why)"
    return [
        JobResult(str(n), parse_overrides(job), {}, status=why)
        for n, job in enumerate(planned)
        if str(n) not in seen
    ]


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (1 << 30, name)


def _number_or_text(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell
