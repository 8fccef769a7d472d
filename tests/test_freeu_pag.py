"""FreeU and perturbed-attention guidance: each changes the picture, is recorded in the
manifest, the PNG and MLflow, leaves the cached pipeline plain afterwards, and PAG's third
UNet row per step is counted."""

import json

import pytest

from keyframes.outputs.png import read_png_metadata
from tests.conftest import read_manifest
from tests.helpers import pixel_gap, store_runs

SHOTS = [{"id": "a", "description": "a red door in the rain"}]
PNG_SIZE = ("width=64", "height=64")


@pytest.fixture
def shots(tmp_path):
    path = tmp_path / "shots.json"
    path.write_text(json.dumps(SHOTS))
    return path


def picture(run_dir):
    from PIL import Image

    record = read_manifest(run_dir)["images"][0]
    return record, Image.open(run_dir / record["file"]).convert("RGB")


def test_freeu_changes_the_picture_is_recorded_and_switched_off_after(
    cli_in_process, shots, tmp_path
):
    runs = {}
    for name, extra in (("plain", []), ("freeu", ["freeu.enabled=true"]), ("again", [])):
        code, err, run_dir, store = cli_in_process(
            f"shotlist={shots}", *PNG_SIZE, *extra, run_dir=tmp_path / name
        )
        assert code == 0, err[-2000:]
        runs[name] = picture(run_dir)
    (plain_record, plain), (record, freeu), (_, again) = runs.values()
    assert plain_record["freeu"] is None and record["freeu"] == [0.6, 0.4, 1.1, 1.2]
    assert pixel_gap(freeu, plain).mean > 0.5
    assert pixel_gap(again, plain).max_levels == 0  # the cached pipeline: FreeU off again
    parameters = read_png_metadata(tmp_path / "freeu" / record["file"])["parameters"]
    assert "FreeU: s1 0.6 s2 0.4 b1 1.1 b2 1.2" in parameters
    freeu_run = [r for r in store_runs(store) if r.data.params.get("freeu.enabled") == "true"]
    assert len(freeu_run) == 1 and freeu_run[0].data.params["freeu.b1"] == "1.1"


def test_pag_adds_a_third_unet_row_changes_the_picture_and_is_recorded(
    cli_in_process, shots, tmp_path
):
    code, err, plain_dir, _ = cli_in_process(
        f"shotlist={shots}", *PNG_SIZE, run_dir=tmp_path / "plain"
    )
    assert code == 0, err[-2000:]
    code, err, pag_dir, store = cli_in_process(
        f"shotlist={shots}", *PNG_SIZE, "pag.scale=3", run_dir=tmp_path / "pag"
    )
    assert code == 0, err[-2000:]
    (plain_record, plain), (record, pag) = picture(plain_dir), picture(pag_dir)
    steps = record["steps"]
    assert plain_record["unet_evaluations"] == 2 * steps  # unconditional + conditional
    assert record["unet_evaluations"] == 3 * steps  # + the perturbed row
    # the work counted: half as much UNet again; text encoders and decode the same
    assert 1.3 < record["tflops"] / plain_record["tflops"] < 1.5
    assert record["pag"] == {"scale": 3.0, "adaptive_scale": 0.0, "layers": ["mid"]}
    assert pixel_gap(pag, plain).mean > 0.5
    parameters = read_png_metadata(pag_dir / record["file"])["parameters"]
    assert "PAG scale: 3, PAG layers: mid" in parameters
    scales = sorted(run.data.params["pag.scale"] for run in store_runs(store))
    assert scales == ["0.0", "3.0"]


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["controlnet=canny_sdxl"], "pag with controlnet=canny_sdxl"),
        (["consistency=style_aligned"], "pag with consistency=style_aligned"),
        (["guidance_interval=[0,0.5]"], "pag with guidance_interval"),
        (["speed=deepcache"], "pag with DeepCache"),
    ],
    ids=["controlnet", "style_aligned", "guidance_interval", "deepcache"],
)
def test_pag_with_what_it_cannot_run_beside_is_exit_2_before_loading(refused_cli, extra, problem):
    result = refused_cli("experiment=smoke", "pag.scale=3", *extra)
    assert result.returncode == 2 and problem in result.stderr, result.stderr[-2000:]
    assert not result.run_dir.exists()
