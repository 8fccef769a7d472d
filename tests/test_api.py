"""The Python API: keyframes.generate makes what the command makes, from the same configs and
checks, in this process; what the command turns into exit codes comes as exceptions."""

import numpy as np
import pytest
from diffusers import StableDiffusionXLPipeline
from PIL import Image

import keyframes
from keyframes.api import ImagesFailed
from keyframes.errors import ConfigError
from tests.conftest import cli_here

SMOKE = ["experiment=smoke", "scorer=none", "width=64", "height=64"]


def pixels(run_dir, manifest):
    return [np.asarray(Image.open(run_dir / r.file).convert("RGB")) for r in manifest.images]


def test_generate_makes_the_commands_keyframes_and_logs_them(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlflow.db"
    tracking = f"mlflow.tracking_uri=sqlite:///{store}"
    manifest = keyframes.generate("demo", [*SMOKE, tracking], run_dir=tmp_path / "api")
    assert manifest.run.status == "finished" and len(manifest.images) == 7
    assert all(image.ok for image in manifest.images)
    assert "MLflow run" in (tmp_path / "api" / "run.log").read_text()
    again = keyframes.load_manifest(tmp_path / "api" / "manifest.json")
    assert [r.to_json() for r in again.images] == [r.to_json() for r in manifest.images]
    # the command, in this process: the same computation, so the same pixels to the bit
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_here(
        [*SMOKE, tracking, f"hydra.run.dir={tmp_path / 'cli'}"], monkeypatch, capsys
    )
    assert code == 0, err[-2000:]
    by_command = keyframes.load_manifest(tmp_path / "cli" / "manifest.json")
    for a, b in zip(
        pixels(tmp_path / "api", manifest), pixels(tmp_path / "cli", by_command), strict=True
    ):
        assert (a == b).all()
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.data.metrics["images"] for r in runs} == {7}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["steps=0"], "steps=0: must be at least 1"),
        (["+stpes=4"], "the closest known one is steps"),
        (["cfg_scale=abc"], "cfg_scale=abc"),
    ],
    ids=["value", "typo", "type"],
)
def test_bad_input_raises_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        keyframes.generate("demo", [*SMOKE, *overrides], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_failed_images_raise_with_the_manifest_of_the_rest(tmp_path, monkeypatch):
    original = StableDiffusionXLPipeline.__call__

    def call(self, *args, **kwargs):
        if any("fishing boat" in p for p in kwargs["prompt"]):
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", call)
    with pytest.raises(ImagesFailed, match="1 of 7 images failed") as failure:
        keyframes.generate(
            "demo",
            [*SMOKE, f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"],
            run_dir=tmp_path / "run",
        )
    [failed] = failure.value.failed
    assert failed.file == "keyframes/003_the-boat_t1.png" and "injected failure" in failed.error
    assert sum(r.ok for r in failure.value.manifest.images) == 6
