"""What mirroring a finished run into MLflow costs: the run directory logged into a fresh
SQLite store, a few times, timed. Prints seconds per run and per image; no model is loaded.

    uv run python -m keyframes.run experiment=smoke shotlist=SHOTS.json hydra.run.dir=RUN_DIR
    uv run python scripts/bench_logging.py RUN_DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from keyframes.config.schema import TrackingConfig
from keyframes.tracking.store import log_run
from keyframes.tracking.sync import read_run_dir, record_from_run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    manifest, config = read_run_dir(args.run_dir)
    images = len([r for r in manifest.images if r.ok])
    seconds = []
    for _ in range(args.rounds):
        store = Path(tempfile.mkdtemp())
        tracking = TrackingConfig(tracking_uri=f"sqlite:///{store}/mlflow.db")
        log_run(tracking, record_from_run_dir(args.run_dir, manifest, config))  # store set up
        record = record_from_run_dir(args.run_dir, manifest, config)
        record.key = ""  # a second run, not the one already there
        start = time.perf_counter()
        log_run(tracking, record)
        seconds.append(time.perf_counter() - start)
        shutil.rmtree(store)
    median = statistics.median(seconds)
    print(
        f"{args.run_dir}: {images} images; logging the run {median:.2f} s (median of "
        f"{args.rounds}: {', '.join(f'{s:.2f}' for s in seconds)}), "
        f"{1000 * median / images:.0f} ms/image"
    )


if __name__ == "__main__":
    main()
