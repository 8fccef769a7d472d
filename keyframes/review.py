"""Open a run's or a sweep's review page in MLflow's UI, from any folder:

    uv run python -m keyframes.review --store sqlite:////abs/outputs/mlflow.db --run RUN_ID

starts `mlflow ui` on this store, bound to 127.0.0.1 (--host to change) on a free port
(--port to choose), waits until it answers (its first start can take a minute), prints the
page of the run's review.html (a sweep's parent run holds the sweep's), and serves until
Ctrl-C, which stops the UI and exits 0. Without --run: the UI's start page.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from keyframes.errors import KeyframesError, first_line

START_TIMEOUT = 300  # seconds for the UI to answer; MLflow 3 has taken 55 s on a first start


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def page_url(base: str, experiment_id: str | None, run_id: str | None) -> str:
    from keyframes.tracking.review import review_page_url

    if run_id is None or experiment_id is None:
        return base + "/"
    return review_page_url(base, experiment_id, run_id)


def wait_until_up(base: str, ui: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ui.poll() is not None:
            raise KeyframesError(f"mlflow ui stopped at its start (exit {ui.returncode})")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.read() == b"OK":
                    return
        except OSError:
            time.sleep(1)
    raise KeyframesError(f"mlflow ui did not answer at {base} within {timeout:.0f} s")


def start_ui(store: str, host: str, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--backend-store-uri", store, "--host", host, "--port", str(port)]
    # its own process group: Ctrl-C here stops it and its workers together
    return subprocess.Popen(command, start_new_session=True)


def stop_ui(ui: subprocess.Popen) -> None:
    if ui.poll() is None:
        os.killpg(ui.pid, signal.SIGTERM)
        try:
            ui.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keyframes.review", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--store", required=True, help="the tracking store, e.g. sqlite:////abs/mlflow.db"
    )
    parser.add_argument("--run", help="the run (or a sweep's parent run) whose review page to open")
    parser.add_argument("--host", default="127.0.0.1", help="where the UI listens (%(default)s)")
    parser.add_argument("--port", type=int, help="default: a free one")
    args = parser.parse_args(argv)
    from keyframes.tracking.store import run_experiment

    try:
        experiment = run_experiment(args.store, args.run) if args.run else None
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    port = args.port or free_port(args.host)
    base = f"http://{args.host}:{port}"
    print(f"starting mlflow ui on {base} (its first start can take a minute)", flush=True)
    ui = start_ui(args.store, args.host, port)
    try:
        wait_until_up(base, ui)
        print(f"open {page_url(base, experiment, args.run)}\n(Ctrl-C stops it)", flush=True)
        ui.wait()
        return 0 if ui.returncode == 0 else 2
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    except KeyframesError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    finally:
        stop_ui(ui)


if __name__ == "__main__":
    sys.exit(main())
