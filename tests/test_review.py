"""What the MLflow records hold for review, read back through MLflow's own client from the
store of the README's smoke sweep; and the aesthetic head's loading."""

import json

import pytest
import torch
from safetensors.torch import save_file

from keyframes.errors import ModelUnavailableError
from keyframes.scoring.aesthetic import AestheticHead, load_aesthetic
from keyframes.tracking.review import image_keys, job_run_name
from tests.helpers import image_record


@pytest.fixture(scope="module")
def stored(smoke_sweep):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(smoke_sweep.uri)
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("keyframes.sweep") == "true"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    return client, experiment, parent, children


def test_the_experiment_is_marked_as_model_development(stored):
    _, experiment, _, _ = stored
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_runs_are_named_by_what_the_sweep_varied_and_coloured_apart(stored):
    _, _, parent, children = stored
    assert parent.info.run_name == "steps x cfg_scale, 4 jobs"
    assert [c.info.run_name for c in children] == [
        "steps=2 cfg=1.5 · #0",
        "steps=2 cfg=3 · #1",
        "steps=3 cfg=1.5 · #2",
        "steps=3 cfg=3 · #3",
    ]
    colours = {c.data.tags["mlflow.runColor"] for c in children}
    assert len(colours) == 4 and parent.data.tags["mlflow.runColor"] not in colours


def test_each_keyframe_is_a_keyed_image_at_its_index(stored, smoke_sweep):
    client, _, _, children = stored
    manifest = json.loads((smoke_sweep.sweep_dir / "0" / "manifest.json").read_text())
    files = [
        f.path.removeprefix("images/")
        for f in client.list_artifacts(children[0].info.run_id, "images")
    ]
    found = {}
    for name in files:
        key, _, step, *_ = name.split("+")
        found.setdefault((key, int(step)), set()).add(name.rsplit(".", 1)[1])
    expected = {(f"keyframes~{r['scene_id']}", r["index"]) for r in manifest["images"]}
    assert set(found) == expected and len(expected) == 7
    assert all(kinds == {"png", "webp"} for kinds in found.values())  # thumbnail + MLflow's webp
    assert children[0].data.tags["mlflow.loggedImages"] == "True"


def test_the_run_has_a_table_with_a_thumbnail_and_scores_per_image(stored, tmp_path):
    client, _, _, children = stored
    run_id = children[0].info.run_id
    path = client.download_artifacts(run_id, "keyframes_table.json", str(tmp_path))
    table = json.loads(open(path).read())
    columns, rows = table["columns"], table["data"]
    assert columns[:2] == ["image", "scene"] and {"clip_score", "aesthetic_score", "seed"} <= set(
        columns
    )
    assert len(rows) == 7 and [r[1] for r in rows][0] == "opening"
    thumbnail = rows[0][0]
    assert thumbnail["type"] == "image"
    local = client.download_artifacts(run_id, thumbnail["filepath"], str(tmp_path))
    from PIL import Image

    assert max(Image.open(local).size) <= 256


def test_the_description_says_what_made_the_run_and_how_to_make_it_again(stored):
    _, _, parent, children = stored
    note = children[0].data.tags["mlflow.note.content"]
    metrics = children[0].data.metrics
    assert "Make it again: `uv run python -m keyframes.run experiment=smoke" in note
    assert f"| {metrics['clip_score_mean']:.2f} | {metrics['aesthetic_score_mean']:.2f} |" in note
    summary = parent.data.tags["mlflow.note.content"]
    assert "best by `clip_score_mean`" in summary and "fastest within 1 point" in summary
    assert f"get-artifact?path=grids/opening.png&run_uuid={parent.info.run_id}" in summary


def test_aesthetic_scores_are_logged_per_image_and_run_log_is_mirrored(stored):
    client, _, _, children = stored
    run = children[0]
    history = client.get_metric_history(run.info.run_id, "aesthetic_score")
    assert sorted(m.step for m in history) == list(range(7))
    assert "aesthetic_score_mean" in run.data.metrics
    assert "run.log" in {f.path for f in client.list_artifacts(run.info.run_id)}


def test_an_experiment_made_elsewhere_is_marked_when_keyframes_logs_to_it(tmp_path, empty_store):
    import shutil

    from mlflow.tracking import MlflowClient

    from keyframes.config.schema import TrackingConfig
    from keyframes.tracking.store import RunRecord, log_run

    db = tmp_path / "mlflow.db"
    shutil.copy(empty_store, db)
    client = MlflowClient(f"sqlite:///{db}")
    client.create_experiment("theirs")
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("theirs").tags
    log_run(
        TrackingConfig(tracking_uri=f"sqlite:///{db}"), RunRecord("theirs", "r", {}, {}, {}, {})
    )
    tags = client.get_experiment_by_name("theirs").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_names_and_image_keys_stay_short_and_legal():
    assert (
        job_run_name({"style": "a very long style name indeed"}, 2) == "style=a very long sty… · #2"
    )
    assert job_run_name({"cfg_scale": "7.403107579552539"}, 0) == "cfg=7.403 · #0"
    record = image_record(scene_id="lamp room #2 (night)", take=2)
    assert image_keys([record]) == {0: "keyframes/lamp room _2 _night__t2"}


def test_the_aesthetic_head_loads_the_published_layout_and_refuses_others(tmp_path):
    torch.manual_seed(3)
    head = AestheticHead(768)
    torch.save(head.state_dict(), tmp_path / "head.pth")
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    unit = torch.nn.functional.normalize(torch.randn(2, 768), dim=-1)
    for name in ("head.pth", "head.safetensors"):
        loaded = load_aesthetic(str(tmp_path / name), 768)
        assert torch.equal(loaded(unit), head.eval()(unit))
    with pytest.raises(ModelUnavailableError, match="not the LAION aesthetic head for a 32-wide"):
        load_aesthetic(str(tmp_path / "head.pth"), 32)

    class Payload:  # a pickle that would run code: weights_only refuses it
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"layers.0.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_aesthetic(str(tmp_path / "evil.pth"), 768)


def test_the_experiment_carries_keyframes_saved_view_of_scores_and_pictures(stored):
    import base64
    import zlib

    from keyframes.tracking.review import VIEW_TAG, view_keys

    _, experiment, _, _ = stored
    view = json.loads(experiment.tags[VIEW_TAG])
    assert view["name"] == "keyframes" and view["state"].startswith("deflate;")
    state = json.loads(zlib.decompress(base64.b64decode(view["state"].removeprefix("deflate;"))))
    assert state["selectedColumns"][:2] == [
        "metrics.`clip_score_mean`",
        "metrics.`aesthetic_score_mean`",
    ]
    assert state["orderByKey"] == "metrics.`clip_score_mean`" and state["orderByAsc"] is False
    scenes = ["opening", "lamp-room", "the-boat", "signal", "rescue", "kitchen", "morning-after"]
    assert view_keys(experiment.tags[VIEW_TAG]) == [f"keyframes/{s}" for s in scenes]
    assert not any(chart["showRunParams"] for chart in state["compareRunCharts"])


def test_a_saved_view_too_big_for_mlflow_keeps_the_first_keys():
    from keyframes.tracking.review import MAX_VIEW_CHARS, saved_view, view_keys

    keys = [f"keyframes/scene-{i:05d}-{'x' * 40}" for i in range(3000)]
    view = saved_view(keys, "clip_score_mean", 0)
    kept = view_keys(view)
    assert len(view) <= MAX_VIEW_CHARS and 0 < len(kept) < 3000 and kept == keys[: len(kept)]
