"""The README's 2x2 smoke sweep, end to end: MLflow parent/child runs, one model load, the
grids, table and plots on the parent, and keyframes.compare over the same store."""

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from keyframes.tracking.report import CELL_WIDTH


def runs_of(sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=sweep.uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids)
    parents = [r for r in runs if r.data.tags.get("keyframes.sweep") == "true"]
    children = sorted(
        (r for r in runs if "mlflow.parentRunId" in r.data.tags),
        key=lambda r: int(r.data.tags["keyframes.job_num"]),
    )
    return client, parents, children


def compare(sweep, capsys, *args) -> subprocess.CompletedProcess:
    """keyframes.compare's main in this process (the `python -m keyframes.compare` command
    itself runs in tests/test_mlflow_ui.py): a start-up of MLflow and matplotlib less."""
    from keyframes.compare import main

    code = main(["--tracking-uri", sweep.uri, *args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_sweep_logs_one_parent_with_four_nested_children(smoke_sweep):
    _, parents, children = runs_of(smoke_sweep)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.experiment_id == parent.info.experiment_id for c in children)
    assert parent.data.tags["keyframes.swept_keys"] == "steps,cfg_scale"
    assert parent.data.tags["keyframes.sweep_dir"] == str(smoke_sweep.sweep_dir.resolve())
    combos = {(c.data.params["steps"], c.data.params["cfg_scale"]) for c in children}
    assert combos == {("2", "1.5"), ("2", "3.0"), ("3", "1.5"), ("3", "3.0")}
    assert parent.data.metrics["jobs"] == 4


def test_sweep_loads_the_model_once(smoke_sweep):
    _, _, children = runs_of(smoke_sweep)
    # what each job did, not how long it took (a busy machine makes any bound on time fail)
    assert [c.data.tags["pipeline_cache"] for c in children] == ["miss", "hit", "hit", "hit"]
    assert all("model_load_seconds" in c.data.metrics for c in children)


def test_sweep_parent_holds_grids_table_plots_and_best_job(smoke_sweep):
    client, [parent], children = runs_of(smoke_sweep)
    run_id = parent.info.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"grids", "plots", "summary.csv", "summary_table.json"} <= top
    grids = {a.path for a in client.list_artifacts(run_id, "grids")}
    assert len(grids) == 7 and "grids/opening.png" in grids
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        "plots/steps.png",
        "plots/cfg_scale.png",
    }
    child_ids = {c.info.run_id for c in children}
    tags = parent.data.tags
    assert tags["best_run_id"] in child_ids and tags["fastest_good_run_id"] in child_ids
    best = next(c for c in children if c.info.run_id == tags["best_run_id"])
    assert best.data.metrics["clip_score_mean"] == max(
        c.data.metrics["clip_score_mean"] for c in children
    )
    best_overrides = json.loads(best.data.tags["keyframes.overrides"])
    assert tags["best_job"] == " ".join(
        o for o in best_overrides if o.startswith(("steps=", "cfg_scale="))
    )


def test_sweep_summary_files_on_disk(smoke_sweep):
    summary = smoke_sweep.sweep_dir / "summary"
    rows = list(csv.reader(open(summary / "summary.csv")))
    assert rows[0][:3] == ["job", "steps", "cfg_scale"] and len(rows) == 5
    clip = [float(r[3]) for r in rows[1:]]
    assert clip == sorted(clip, reverse=True)
    grid = Image.open(summary / "grids" / "opening.png")
    cell_height = round(CELL_WIDTH * 144 / 256)
    assert grid.size == (150 + 2 * (CELL_WIDTH + 6) + 6, 28 + 20 + 2 * (cell_height + 20 + 6) + 6)
    table = json.loads((smoke_sweep.sweep_dir / "sweep.json").read_text())
    assert table["swept_keys"] == ["steps", "cfg_scale"]


def test_compare_prints_the_newest_sweep_sorted_by_clip_score(smoke_sweep, capsys):
    result = compare(smoke_sweep, capsys)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sweep ") and "4 runs, best first by clip_score_mean" in lines[0]
    header = lines[2].split()
    assert header[:4] == ["job", "steps", "cfg_scale", "clip_score_mean"]
    rows = [line.split() for line in lines[4:8]]
    clip = [float(r[3]) for r in rows]
    assert clip == sorted(clip, reverse=True)
    assert {(r[1], r[2]) for r in rows} == {("2", "1.5"), ("2", "3"), ("3", "1.5"), ("3", "3")}
    assert any(line.startswith("best by clip_score_mean: steps=") for line in lines)
    assert any(line.startswith("fastest within 1 point of the best: ") for line in lines)


def test_compare_by_parent_and_metric_and_rewrites_the_pictures(smoke_sweep, tmp_path, capsys):
    _, [parent], _ = runs_of(smoke_sweep)
    out = tmp_path / "again"
    result = compare(
        smoke_sweep,
        capsys,
        "--parent",
        parent.info.run_id,
        "--metric",
        "seconds_per_image_mean",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    column = lines[2].split().index("seconds_per_image_mean")
    assert lines[2].split()[4:6] == ["aesthetic_score_mean", "style_consistency"]  # always shown
    seconds = [float(line.split()[column]) for line in lines[4:8]]
    assert seconds == sorted(seconds)
    assert len(list((out / "grids").glob("*.png"))) == 7
    assert (out / "plots" / "steps.png").is_file() and (out / "summary.csv").is_file()


def test_compare_unknown_experiment_is_a_clear_error(smoke_sweep, capsys):
    result = compare(smoke_sweep, capsys, "--experiment", "nope")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: no experiment named 'nope' in {smoke_sweep.uri} (there are: Default, smoke)"
    )


@pytest.mark.slow
def test_optuna_search_maximises_clip_score_per_second(tmp_path):
    import yaml
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow.db"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keyframes.run",
            "experiment=smoke",
            "search=optuna",
            "-m",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.params.steps='range(2,4)'",
            "hydra.sweeper.params.cfg_scale='interval(1.0,5.0)'",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            f"mlflow.tracking_uri=sqlite:///{store}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 3
    assert [r.data.tags["keyframes.swept_keys"] for r in runs if r not in children] == [
        "steps,cfg_scale"
    ]
    assert all(2 <= int(r.data.params["steps"]) <= 4 for r in children)
    assert all(1.0 <= float(r.data.params["cfg_scale"]) <= 5.0 for r in children)
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    per_second = [r.data.metrics["clip_score_per_second"] for r in children]
    assert best["best_value"] == pytest.approx(max(per_second), rel=1e-3)
    # keyframes' own "best" line agrees with Optuna's, says what it ranked by, reads short;
    # it names the keys that varied (3 trials may all draw the same steps)
    steps, cfg = best["best_params"]["steps"], best["best_params"]["cfg_scale"]
    output = (result.stderr + result.stdout).splitlines()
    line = next(x for x in output if "best by clip_score_per_second: " in x)
    shown = line.split("best by clip_score_per_second: ")[1].split()
    assert f"cfg_scale={cfg:.4g}" in shown
    steps_varied = len({r.data.params["steps"] for r in children}) > 1
    assert (f"steps={steps}" in shown) == steps_varied and len(shown) == 1 + steps_varied
    [parent] = [r for r in runs if r not in children]
    assert parent.data.tags["best_by"] == "clip_score_per_second"


@pytest.fixture
def single_runs(tmp_path):
    """Two plain runs of one experiment: steps from the preset in one, typed in the other."""
    from keyframes.config.schema import TrackingConfig
    from keyframes.tracking.store import RunRecord, log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for overrides, steps, clip in (
        (["experiment=smoke"], "4", 30.0),
        (["experiment=smoke", "steps=2"], "2", 20.0),
    ):
        log_run(
            TrackingConfig(tracking_uri=uri),
            RunRecord(
                experiment="smoke",
                run_name=f"run {steps}",
                params={"steps": steps, "cfg_scale": "5.0", "style.name": "cinematic"},
                tags={"keyframes.overrides": json.dumps(overrides)},
                image_metrics={},
                summary={"clip_score_mean": clip, "seconds_per_image_mean": 0.5},
            ),
        )
    return uri


def test_compare_shows_the_values_each_run_used(single_runs, capsys):
    from keyframes.compare import main

    assert main(["--tracking-uri", single_runs, "--experiment", "smoke"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:3] == ["job", "steps", "clip_score_mean"]
    assert [line.split()[1] for line in lines[4:6]] == ["4", "2"]  # 4: from the preset
    assert "best by clip_score_mean: steps=4 (run " in "\n".join(lines)


def test_compare_unknown_metric_is_exit_2_listing_the_metrics_there_are(single_runs, capsys):
    from keyframes.compare import main

    assert (
        main(["--tracking-uri", single_runs, "--metric", "nonsense", "--experiment", "smoke"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: --metric nonsense: no run of experiment 'smoke' has it")
    assert err.strip().endswith("the metrics there are: clip_score_mean, seconds_per_image_mean")


def test_compare_help_reads_as_sentences(capsys):
    from keyframes.compare import main

    with pytest.raises(SystemExit):
        main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description == "Compare runs already in the tracking store: one row per run, best first."
