"""Log a run directory to MLflow. Every run ends with this; on its own it logs a run whose
tracking store was unreachable at the time:

    uv run python -m keyframes.sync outputs/runs/2026-11-25_10-31-07 [--tracking-uri URI]

The run directory is the source of truth: the MLflow run is rebuilt from manifest.json and
config.yaml alone. Syncing twice does not create a second run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from keyframes.config.schema import TrackingConfig
from keyframes.errors import KeyframesError, first_line
from keyframes.tracking.sync import read_run_dir, sync_run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyframes.sync", description="Log a finished run directory to MLflow."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tracking-uri", help="default: the one the run was configured with")
    args = parser.parse_args(argv)
    uri = args.tracking_uri
    try:
        _, config = read_run_dir(args.run_dir)
        mlflow = dict(config.get("mlflow") or {})  # a config.yaml of an earlier version: none
        uri = mlflow["tracking_uri"] = args.tracking_uri or mlflow.get("tracking_uri")
        if not uri:
            raise KeyframesError(f"{args.run_dir}/config.yaml names no store: give --tracking-uri")
        tracking = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TrackingConfig), mlflow)
        )
        run_id, created = sync_run_dir(args.run_dir, tracking)
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the store's own errors: unreachable, refused, ...
        print(
            f"error: the MLflow store {uri} could not be written ({first_line(e)}); "
            f"{args.run_dir} is unchanged, try again later",
            file=sys.stderr,
        )
        return 2
    what = "logged" if created else "already logged, nothing to do:"
    print(f"{what} MLflow run {run_id} ({uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
