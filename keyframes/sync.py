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
from keyframes.errors import KeyframesError
from keyframes.tracking.sync import read_run_dir, sync_run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyframes.sync", description="Log a finished run directory to MLflow."
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tracking-uri", help="default: the one the run was configured with")
    args = parser.parse_args(argv)
    try:
        _, config = read_run_dir(args.run_dir)
        tracking = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TrackingConfig), config["mlflow"])
        )
        if args.tracking_uri:
            tracking.tracking_uri = args.tracking_uri
        run_id, created = sync_run_dir(args.run_dir, tracking)
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    what = "logged" if created else "already logged, nothing to do:"
    print(f"{what} MLflow run {run_id} ({tracking.tracking_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
