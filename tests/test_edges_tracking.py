"""The tracking store at its edges: a store whose creation was cut off, experiments and the
saved view written by several jobs at once, and the reading command (compare) given a store
that is not there."""

import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from keyframes.config.schema import TrackingConfig
from keyframes.errors import TrackingError
from keyframes.tracking import review, store
from keyframes.tracking.store import RunRecord, log_run

# MLflow's creation of a new SQLite store runs about 1,700 statements; a kill at the 800th
# (inside a batch migration of `experiments`) leaves a file no client can open (MLflow 3.17).
CUT_AT = 800


def half_made_store(path: Path) -> None:
    """A store made the way MLflow makes one, killed at statement CUT_AT."""
    code = (
        "import os, signal, sys\n"
        "from sqlalchemy import event\n"
        "from sqlalchemy.engine import Engine\n"
        "count = []\n"
        "@event.listens_for(Engine, 'before_cursor_execute')\n"
        "def tick(*args):\n"
        "    count.append(1)\n"
        f"    if len(count) == {CUT_AT}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "from mlflow.tracking import MlflowClient\n"
        "MlflowClient('sqlite:///' + sys.argv[1]).search_experiments()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL


def record(name: str, keys: list[str] = ()) -> RunRecord:
    return RunRecord(name, name, {}, {}, {0: {"x": 1.0}}, {"images": 1.0}, key=name)


@pytest.mark.slow
def test_a_store_left_half_made_by_an_earlier_kill_is_set_aside_and_made_again(tmp_path, caplog):
    db = tmp_path / "mlflow.db"
    half_made_store(db)
    with pytest.raises(Exception, match="already exists"):  # what every client met before
        MlflowClient(f"sqlite:///{db}").search_experiments()
    run_id, created = log_run(TrackingConfig(tracking_uri=f"sqlite:///{db}"), record("after"))
    assert created
    assert "was left half-made by a stop while it was created (it held no runs)" in caplog.text
    assert any(p.name.startswith("mlflow.db.half-made-") for p in tmp_path.glob("mlflow.db.*"))
    assert MlflowClient(f"sqlite:///{db}").get_run(run_id).info.status == "FINISHED"


def test_a_half_made_store_that_holds_runs_is_left_alone_with_a_message(tmp_path):
    db = tmp_path / "mlflow.db"
    log_run(TrackingConfig(tracking_uri=f"sqlite:///{db}"), record("kept"))
    before = db.read_bytes()
    with pytest.raises(TrackingError) as error:
        store._set_aside_half_made(db, RuntimeError("table _alembic_tmp_x already exists"))
    assert "is half-migrated (table _alembic_tmp_x already exists) and holds 1 runs" in str(
        error.value
    )
    assert "mlflow db upgrade" in str(error.value) and db.read_bytes() == before


def test_a_kill_while_a_new_store_is_made_leaves_only_a_temporary_file(tmp_path, monkeypatch):
    """The store appears under its name only when it is whole; what a kill leaves is deleted
    by the next creation."""
    db = tmp_path / "mlflow.db"
    created = []
    original = store._create_sqlite_store

    def watched(path):
        (tmp_path / ".mlflow.db.tmp").write_bytes(b"SQLite format 3\0 cut off")  # a kill's
        original(path)
        created.append(path)

    monkeypatch.setattr(store, "_create_sqlite_store", watched)
    store._client(f"sqlite:///{db}")
    assert created == [db] and db.is_file() and not (tmp_path / ".mlflow.db.tmp").exists()
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "experiments", "alembic_version"} <= tables
    assert not [t for t in tables if t.startswith("_alembic_tmp")]


def test_an_experiment_made_by_another_process_meanwhile_is_read_back(tmp_path, monkeypatch):
    """Both processes asked for the experiment, found none, and made it: the second one's
    create fails with "already exists" and must use the first one's."""
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = store._client(cfg.tracking_uri)
    other = client.create_experiment("race")  # the other process won
    real, lookups = client.get_experiment_by_name, []

    def lookup(name):  # the first lookup ran before the other process made it
        lookups.append(name)
        return None if len(lookups) == 1 else real(name)

    monkeypatch.setattr(client, "get_experiment_by_name", lookup)
    assert store._experiment_id(client, cfg, "race") == other


def test_the_saved_view_keeps_every_jobs_keys_when_jobs_log_at_once(tmp_path):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = store._client(cfg.tracking_uri)
    experiment = client.create_experiment("view")
    jobs = [[f"keyframes/job{j}_scene{s}" for s in range(3)] for j in range(4)]
    start = threading.Barrier(len(jobs))

    def update(keys):
        own = store._client(cfg.tracking_uri)
        start.wait()
        store._update_view(own, cfg, experiment, keys, "clip_score_mean", 0)

    threads = [threading.Thread(target=update, args=(keys,)) for keys in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    view = client.get_experiment(experiment).tags[review.VIEW_TAG]
    assert sorted(review.view_keys(view)) == sorted(k for keys in jobs for k in keys)


# --- compare, a reading command -----------------------------------------------------------


def compare_here(*args: str, capsys) -> tuple[int, str, str]:
    from keyframes.compare import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_never_makes_a_store_of_a_mistyped_path(tmp_path, capsys):
    missing = tmp_path / "outputs" / "mlfow.db"
    code, out, err = compare_here("--tracking-uri", f"sqlite:///{missing}", capsys=capsys)
    assert code == 2 and out == ""
    assert (
        err.strip()
        == f"error: no MLflow store at {missing} (from sqlite:///{missing}): check the path"
    )
    assert not missing.parent.exists()


def test_compare_says_what_is_wrong_with_an_unusable_tracking_uri(capsys, monkeypatch):
    import socket

    code, _, err = compare_here("--tracking-uri", "foo://bar", capsys=capsys)
    assert code == 2 and err.startswith("error: cannot read the MLflow store foo://bar: ")
    assert "Traceback" not in err and err.count("\n") == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once it is closed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    code, _, err = compare_here("--tracking-uri", f"http://127.0.0.1:{port}", capsys=capsys)
    assert code == 2
    assert err.startswith(f"error: cannot read the MLflow store http://127.0.0.1:{port}: ")
    assert err.count("\n") == 1


def test_compare_checks_its_output_folder_before_printing(tmp_path, capsys):
    a_file = tmp_path / "hostname"
    a_file.write_text("x")
    code, out, err = compare_here(
        "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}", "--out", str(a_file), capsys=capsys
    )
    assert code == 2 and out == ""
    assert err.strip() == f"error: --out {a_file}: not a folder (it is a file)"


def test_sync_to_a_store_that_does_not_answer_is_one_message(tmp_path, capsys, monkeypatch):
    import socket

    from keyframes.outputs.manifest import write_manifest
    from keyframes.outputs.records import Manifest
    from keyframes.sync import main as sync_main
    from tests.helpers import image_record, run_record

    run_dir = tmp_path / "run"
    write_manifest(run_dir, Manifest(run_record(status="finished", run_key="k"), [image_record()]))
    (run_dir / "config.yaml").write_text("steps: 30\ncfg_scale: 7\nseed: 1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    code = sync_main([str(run_dir), "--tracking-uri", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(
        f"error: the MLflow store http://127.0.0.1:{port} could not"
    )
    assert "Traceback" not in err and err.count("\n") == 1
