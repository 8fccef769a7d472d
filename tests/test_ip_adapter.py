"""IP-Adapter on the tiny model: tiny random image encoder and adapter weights in the layout
`load_ip_adapter` reads, references from scenes and characters, and a real effect."""

import json

import numpy as np
import pytest
from PIL import Image

from keyframes.conditioning.ip_adapter import ImagePrompt, assign_references, load_adapter
from keyframes.config.schema import IPAdapterConfig
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator, batches
from keyframes.pipeline import replicas
from keyframes.shotlist.jobs import plan_jobs
from keyframes.shotlist.load import load_shotlist
from tests.helpers import assert_same_picture, euler_tiny_pipe


def save_tiny_ip_adapter(folder, unet):
    """folder/models/image_encoder (a tiny CLIP vision model) + folder/models/ip.safetensors."""
    return replicas.save_tiny_ip_adapter(folder, unet, "models", "ip.safetensors")


def tiny_adapter(folder, **overrides):
    return IPAdapterConfig(
        name="ip_adapter",
        ip_adapter_path=str(folder),
        ip_adapter_subfolder="models",
        ip_adapter_weight="ip.safetensors",
        **{"ip_adapter_scale": 0.6, **overrides},
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(folder / "red.png")
    Image.new("RGB", (64, 64), (20, 60, 220)).save(folder / "mara.png")
    shots = {
        "title": "t",
        "characters": {
            "Mara": {"description": "a keeper in a yellow coat", "reference": "mara.png"}
        },
        "scenes": [
            {"id": "cliff", "description": "a lighthouse"},
            {"id": "lamp", "description": "Mara trims the lamp", "characters": ["Mara"]},
            {"id": "boat", "description": "a boat", "reference": "red.png"},
        ],
    }
    (folder / "shots.json").write_text(json.dumps(shots))
    pipe = euler_tiny_pipe()
    save_tiny_ip_adapter(folder, pipe.unet)
    return pipe, folder, load_shotlist(str(folder / "shots.json"))


def test_references_come_from_the_scene_then_its_characters_then_the_run(setup):
    _, folder, shotlist = setup
    jobs = plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1)
    with_refs = assign_references(jobs, shotlist, None)
    assert [j.reference and j.reference.rsplit("/", 1)[-1] for j in with_refs] == [
        None,
        "mara.png",
        "red.png",
    ]
    with_image = assign_references(jobs, shotlist, str(folder / "red.png"))
    assert with_image[0].reference == str(folder / "red.png")
    # one pipeline call per reference image
    assert [[j.scene_id for j in b] for b in batches(with_refs, 4, ImagePrompt().split_key)] == [
        ["cliff"],
        ["lamp"],
        ["boat"],
    ]


def test_adapter_loads_and_the_reference_image_changes_the_picture(setup):
    pipe, folder, shotlist = setup
    jobs = assign_references(
        plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1), shotlist, None
    )
    job = jobs[2]  # the boat, with red.png
    settings = GenerationSettings(3, 5.0, 64, 64, 1)

    def image(adapter_on=True, ref=None):
        target = job if ref is None else job.__class__(**{**job.__dict__, "reference": ref})
        made = KeyframeGenerator(pipe, settings, hooks=[ImagePrompt()] if adapter_on else []).run(
            [target]
        )
        return np.asarray(next(made)[0].image, dtype=np.int16)

    plain = image(adapter_on=False)
    load_adapter(pipe, tiny_adapter(folder, ip_adapter_scale=1.0))
    try:
        red, blue = image(), image(ref=str(folder / "mara.png"))
        pipe.set_ip_adapter_scale(0.0)
        off = image()
    finally:
        pipe.unload_ip_adapter()
    assert np.abs(red - plain).mean() > 0.5 and np.abs(red - blue).mean() > 0.5
    assert_same_picture(off, plain, "scale 0")  # the adapter adds nothing (another code path)
    assert (image(adapter_on=False) == plain).all()  # unloaded: the plain model again


def test_a_missing_adapter_stops_the_run_before_anything_is_made(refused_cli, tmp_path):
    result = refused_cli(
        "experiment=smoke",
        "consistency=ip_adapter",
        f"consistency.ip_adapter_path={tmp_path / 'nowhere'}",
    )
    assert result.returncode == 2, result.output
    assert "has no sdxl_models/ip-adapter_sdxl.safetensors" in result.stderr
    assert 'uv run hf download h94/IP-Adapter --include "sdxl_models/*"' in result.stderr
    assert not result.run_dir.exists()


def test_controlnet_scenes_also_follow_the_reference_image(setup):
    from keyframes.conditioning.controlnet import Control, load_controlnet
    from tests.helpers import square, tiny_control

    pipe, folder, shotlist = setup
    jobs = assign_references(
        plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1), shotlist, None
    )
    edges = str(square(folder / "square.png", (16, 16, 47, 47)))
    job = jobs[2].__class__(**{**jobs[2].__dict__, "control": ("canny", edges)})
    settings = GenerationSettings(3, 5.0, 64, 64, 1)
    net = load_controlnet(tiny_control(1.0), pipe.dtype)
    load_adapter(pipe, tiny_adapter(folder, ip_adapter_scale=1.0))
    try:
        # made after the adapter loads: from_pipe carries its image encoder over
        control = Control(pipe, net, tiny_control(1.0), 64, 64)

        def image():
            made = KeyframeGenerator(pipe, settings, hooks=[ImagePrompt(), control]).run([job])
            return np.asarray(next(made)[0].image, dtype=np.int16)

        steered = image()
        pipe.set_ip_adapter_scale(0.0)
        without = image()
    finally:
        pipe.unload_ip_adapter()
    assert np.abs(steered - without).mean() > 0.5  # the reference image still counts


@pytest.mark.parametrize(
    "option, work",
    [({"guidance_interval": (0.0, 0.5)}, (9.0, None)), ({"deepcache": (3, 0)}, (4.0, 8.0))],
    ids=["guidance interval", "deepcache"],
)
def test_fewer_unet_evaluations_keep_the_reference_image_working(setup, option, work):
    """The image tokens are cut with the conditional rows, and the shallow branch reads them
    through the same attention processors: the reference still changes the picture."""
    pipe, folder, shotlist = setup
    jobs = assign_references(
        plan_jobs(shotlist, "{prompt}", "", "", 1, "derived", 1), shotlist, None
    )
    settings = GenerationSettings(6, 5.0, 64, 64, 1, **option)

    def made(ref):
        job = jobs[2].__class__(**{**jobs[2].__dict__, "reference": str(folder / ref)})
        return next(KeyframeGenerator(pipe, settings, hooks=[ImagePrompt()]).run([job]))[0]

    load_adapter(pipe, tiny_adapter(folder, ip_adapter_scale=1.0))
    try:
        red, blue = made("red.png"), made("mara.png")
    finally:
        pipe.unload_ip_adapter()
    for g in (red, blue):
        assert g.error is None and (g.unet_evaluations, g.unet_shallow_evaluations) == work
    gap = np.abs(np.asarray(red.image, np.int16) - np.asarray(blue.image, np.int16))
    assert gap.mean() > 0.5
