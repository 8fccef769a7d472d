"""ControlNet on the tiny model: canny preprocessing, a tiny ControlNet copied from the tiny
UNet, batching scenes with and without a control, and the checks before anything loads."""

import json

import numpy as np
import pytest
from PIL import Image

from keyframes.conditioning.controlnet import Control, canny, check_controls, load_controlnet
from keyframes.config.schema import ControlNetConfig
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator, batches
from keyframes.shotlist.jobs import plan_jobs
from keyframes.shotlist.load import load_shotlist
from tests.helpers import assert_same_picture, euler_tiny_pipe, square, tiny_control


@pytest.fixture(scope="module")
def shotlist(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control")
    square(folder / "a.png", (16, 16, 47, 47))
    square(folder / "b.png", (4, 30, 60, 40))
    scenes = [
        {
            "id": "cliff",
            "description": "a lighthouse on a cliff",
            "control": {"type": "canny", "image": "a.png"},
        },
        {"id": "sea", "description": "the open sea"},
        {
            "id": "boat",
            "description": "a small boat",
            "control": {"type": "canny", "image": "b.png"},
        },
    ]
    path = folder / "shots.json"
    path.write_text(json.dumps({"title": "t", "scenes": scenes}))
    return load_shotlist(str(path))


@pytest.fixture(scope="module")
def pipe():
    pipe = euler_tiny_pipe()
    return pipe


def control(pipe, scale):
    config = tiny_control(scale)
    return Control(pipe, load_controlnet(config, pipe.unet, pipe.dtype), config, 64, 64)


def test_canny_finds_the_square_outline_only(tmp_path):
    edges = np.asarray(canny(Image.open(square(tmp_path / "s.png", (16, 16, 47, 47))), 100, 200))
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    on = np.argwhere(edges[..., 0] > 0)
    assert on.min() >= 14 and on.max() <= 49  # around the square's border
    assert edges[28:36, 28:36].max() == 0 and edges[:10, :10].max() == 0  # inside, outside


def test_plan_carries_each_scenes_control(shotlist):
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    assert [j.control[0] if j.control else None for j in jobs] == ["canny", None, "canny"]
    assert jobs[0].control[1].endswith("a.png")
    # controlled and plain scenes never share a pipeline call
    assert [[j.scene_id for j in b] for b in batches(jobs, 4, lambda job: bool(job.control))] == [
        ["cliff"],
        ["sea"],
        ["boat"],
    ]


def test_the_control_image_steers_the_picture_and_scale_0_does_not(shotlist, pipe):
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    settings = GenerationSettings(3, 5.0, 64, 64, 2)

    def images(control):
        made = KeyframeGenerator(pipe, settings, hooks=[control] if control else []).run(jobs)
        return {g.job.scene_id: np.asarray(g.image, dtype=np.int16) for b in made for g in b}

    plain, steered = images(None), images(control(pipe, 1.0))
    off = images(control(pipe, 0.0))
    # no control: the base pipeline, the same picture (batched apart, so within float noise)
    assert_same_picture(steered["sea"], plain["sea"], "sea")
    for scene in ("cliff", "boat"):
        assert np.abs(steered[scene] - plain[scene]).mean() > 0.5
        assert_same_picture(off[scene], plain[scene], scene)  # the residuals times 0
    swapped = [j.__class__(**{**j.__dict__, "control": jobs[2].control}) for j in jobs[:1]]
    other = next(KeyframeGenerator(pipe, settings, hooks=[control(pipe, 1.0)]).run(swapped))
    assert np.abs(np.asarray(other[0].image, dtype=np.int16) - steered["cliff"]).mean() > 0.5


def test_control_types_are_checked_before_loading(shotlist):
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    assert check_controls(jobs, ControlNetConfig(name="none")) == [
        "controlnet=none: the control of scenes cliff, boat is ignored"
    ]
    assert check_controls(jobs, tiny_control(0.5)) == []
    with pytest.raises(
        ConfigError, match=r"follows depth controls; scenes cliff \(canny\), boat \(canny\)"
    ):
        check_controls(jobs, ControlNetConfig(name="depth_sdxl", type="depth"))


@pytest.mark.parametrize(
    "option, work",
    [({"guidance_interval": (0.0, 0.5)}, (9.0, None)), ({"deepcache": (3, 0)}, (4.0, 8.0))],
    ids=["guidance interval", "deepcache"],
)
def test_fewer_unet_evaluations_keep_the_control_working(shotlist, pipe, option, work):
    """The residuals are cut to the conditional rows outside the interval, and added to the
    shallow branch's skips under DeepCache: the control still steers, at the same work."""
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    settings = GenerationSettings(6, 5.0, 64, 64, 2, **option)

    def made(control):
        out = KeyframeGenerator(pipe, settings, hooks=[control] if control else []).run(jobs)
        return {g.job.scene_id: g for batch in out for g in batch}

    plain, steered = made(None), made(control(pipe, 1.0))
    for scene in ("cliff", "boat"):
        g = steered[scene]
        assert g.error is None and (g.unet_evaluations, g.unet_shallow_evaluations) == work
        gap = np.abs(np.asarray(g.image, np.int16) - np.asarray(plain[scene].image, np.int16))
        assert gap.mean() > 0.5
