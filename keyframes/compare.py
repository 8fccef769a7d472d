"""Compare runs already in the tracking store: one row per run, best first.

    uv run python -m keyframes.compare                        # the newest sweep
    uv run python -m keyframes.compare --parent RUN_ID        # one sweep
    uv run python -m keyframes.compare --experiment smoke     # every job run of an experiment
    uv run python -m keyframes.compare --out outputs/compare  # also the grids, plots and CSV

Prints one row per run, best first by --metric, with the values of the settings that differ
between them (as each run used them, from its logged params).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from keyframes.errors import KeyframesError, TrackingError, first_line
from keyframes.tracking.results import (
    JobResult,
    describe,
    format_table,
    job_from_manifest,
    parse_overrides,
    settings_used,
    table,
)
from keyframes.tracking.sync import RUN_STATUS

DEFAULT_STORE = "sqlite:///outputs/mlflow.db"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return compare(args)
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parse_args(argv: list[str] | None):
    description, usage = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(
        prog="python -m keyframes.compare",
        description=description,
        epilog="examples:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_STORE),
        help="MLflow store: sqlite:///file.db or http://host:port "
        f"(default: $MLFLOW_TRACKING_URI or {DEFAULT_STORE})",
    )
    parser.add_argument("--experiment", help="experiment name (default: all experiments)")
    parser.add_argument("--parent", help="a sweep's parent run id: compare its jobs")
    parser.add_argument(
        "--metric", default="clip_score_mean", help="sort key (default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, help="write summary.csv, grids/ and plots/ here")
    return parser.parse_args(argv)


def compare(args) -> int:
    from keyframes.tracking.store import download_artifacts, find_runs

    if args.out:
        check_out_folder(args.out)
    try:
        label, runs = find_runs(args.tracking_uri, args.experiment, args.parent)
    except KeyframesError:
        raise
    except Exception as e:  # noqa: BLE001 - an unknown scheme, a server that does not answer
        raise TrackingError(
            f"cannot read the MLflow store {args.tracking_uri}: {first_line(e)}"
        ) from None
    if not runs:
        print(f"{label}: no runs")
        return 0
    metrics = sorted({m for run in runs for m in run.metrics})
    if args.metric not in metrics:
        raise KeyframesError(
            f"--metric {args.metric}: no run of {label} has it; the metrics there are: "
            + ", ".join(metrics)
        )
    jobs = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            name = run.tags.get("keyframes.job_num", run.name)
            if args.out:
                # the grids need the pictures: fetch each run's manifest and keyframes
                local = Path(tmp) / run.run_id
                download_artifacts(args.tracking_uri, run.run_id, "manifest.json", local)
                download_artifacts(args.tracking_uri, run.run_id, "keyframes", local)
                job = job_from_manifest(local / "manifest.json", name=name)
                job.run_id, job.metrics = run.run_id, run.metrics
            else:
                overrides = json.loads(run.tags.get("keyframes.overrides", "[]"))
                job = JobResult(name, parse_overrides(overrides), run.metrics, run.run_id)
            job.status = RUN_STATUS.get(run.status, run.status.lower())  # as a manifest says it
            jobs.append(job)
        keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
        for job, run in zip(jobs, runs, strict=True):  # the values used, not only those typed
            job.overrides = settings_used(run.params, keys, job.overrides)
        print(f"{label}: {len(jobs)} runs, best first by {args.metric}\n")
        header, rows = table(jobs, args.metric)
        print(format_table(header, rows))
        report_best(jobs, args.metric)
        if args.out:
            from keyframes.tracking.report import build_report

            report = build_report(jobs, args.out, args.metric)
            print(f"\nwrote {len(report.files)} files under {args.out}")
    return 0


def check_out_folder(out: Path) -> None:
    """--out must be a folder this command can write, checked before any work is shown."""
    if out.exists() and not out.is_dir():
        raise KeyframesError(f"--out {out}: not a folder (it is a file)")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise KeyframesError(f"--out {out}: {existing} is not writable")


def report_best(jobs: list[JobResult], metric: str) -> None:
    from keyframes.tracking.results import best_and_fastest, varying_keys

    best, fastest = best_and_fastest(jobs, metric)
    keys = varying_keys(jobs)
    if best:
        print(f"\nbest by {metric}: {describe(best, keys)} (run {best.run_id})")
    if fastest:
        print(
            f"fastest within 1 point of the best: {describe(fastest, keys)} (run {fastest.run_id})"
        )


if __name__ == "__main__":
    sys.exit(main())
