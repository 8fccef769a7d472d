"""Shared fixtures: the tiny model is built once per session; CLI runs go to temp folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import keyframes.run

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester", "tests.loud_skips"]
# A test that starts the real command in a subprocess is slow (5-50 s of interpreter start-up,
# model build and MLflow store creation): `uv run pytest -m "not slow"` leaves these out.
SLOW_FIXTURES = {"run_cli", "smoke_run", "smoke_sweep", "two_processes", "server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    store: Path  # the SQLite file MLflow would use

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_keyframes(
    tmp_path: Path, overrides, run_dir: Path | None = None, env: dict | None = None
) -> CliResult:
    """`python -m keyframes.run` as a user would run it, writing only under tmp_path."""
    run_dir = run_dir or tmp_path / "run"
    store = tmp_path / "store" / "mlflow.db"
    args = [sys.executable, "-m", "keyframes.run", *overrides, f"hydra.run.dir={run_dir}"]
    if not any(o.startswith("mlflow.tracking_uri=") for o in overrides):
        args.append(f"mlflow.tracking_uri=sqlite:///{store}")
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        args, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=600
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, run_dir, store)


@pytest.fixture
def run_cli(tmp_path):
    def run(*overrides: str, run_dir: Path | None = None, env: dict | None = None) -> CliResult:
        return run_keyframes(tmp_path, overrides, run_dir, env)

    return run


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One real smoke run shared by the tests that only read its outputs."""
    result = run_keyframes(tmp_path_factory.mktemp("smoke"), ["experiment=smoke"])
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def tiny_pipe():
    from tests.helpers import euler_tiny_pipe

    return euler_tiny_pipe()


def read_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


@dataclass
class SweepResult:
    sweep_dir: Path
    store: Path
    output: str

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.store}"


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory):
    """The 2x2 smoke sweep of the README, run once for every test that reads it."""
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir, store = tmp / "sweep", tmp / "store" / "mlflow.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            "experiment=smoke",
            "-m",
            "steps=2,3",
            "cfg_scale=1.5,3",
            f"hydra.sweep.dir={sweep_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SweepResult(sweep_dir, store, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """A new MLflow SQLite store with its tables made: creating them takes 1.5 s of every
    in-process run otherwise (the subprocess tests still create theirs)."""
    from keyframes.tracking.store import _client

    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    _client(f"sqlite:///{path}")
    return path


def cli_here(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python -m keyframes.run ARGV` through its real entry point, in this process:
    (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["keyframes.run", *argv])
    code = 0
    try:
        keyframes.run.cli()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def refused_cli(tmp_path, monkeypatch, capsys):
    """For input the command must refuse before anything loads: the real entry point in this
    process (no interpreter start-up), run from tmp_path as run_cli runs it. Returns a
    CliResult. Where the environment matters (HF_HOME, offline), use run_cli: the hub reads
    it once, at import."""

    def run(*overrides: str) -> CliResult:
        run_dir, store = tmp_path / "run", tmp_path / "store" / "mlflow.db"
        monkeypatch.chdir(tmp_path)
        argv = [*overrides, f"hydra.run.dir={run_dir}", f"mlflow.tracking_uri=sqlite:///{store}"]
        code, out, err = cli_here(argv, monkeypatch, capsys)
        return CliResult(code, out, err, run_dir, store)

    return run


@pytest.fixture
def cli_in_process(tmp_path, monkeypatch, capsys, empty_store):
    """The real `python -m keyframes.run` entry point, in this process, so faults can be
    injected into the tiny pipeline. Returns (exit code, stderr, run dir, store). The store
    starts as a copy of an empty one, unless fresh_store=True (no file: a test can then
    see that nothing was written)."""
    import shutil

    from keyframes.pipeline.load import release_pipeline

    release_pipeline(collect=False)  # CPU memory is freed as references go: no slow gc here

    def run(*overrides: str, run_dir=None, fresh_store=False):
        run_dir, store = run_dir or tmp_path / "run", tmp_path / "mlflow.db"
        if not fresh_store and not store.exists():
            shutil.copyfile(empty_store, store)
        argv = [
            "experiment=smoke",
            *overrides,
            f"hydra.run.dir={run_dir}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ]
        code, _, err = cli_here(argv, monkeypatch, capsys)
        return code, err, run_dir, store

    yield run
    release_pipeline(collect=False)  # faults (VAE tiling, wrapped methods) must not leak
