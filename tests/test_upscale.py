"""Hires fix on the tiny model: size, determinism, a real redraw, and the recorded recipe."""

import numpy as np
import pytest
from PIL import Image

from keyframes.conditioning.hires import Hires
from keyframes.config.schema import HiresConfig
from keyframes.config.validate import upscaled_size
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.outputs.png import a1111_parameters, read_png_metadata
from tests.conftest import read_manifest
from tests.helpers import check_settings, demo_jobs, euler_tiny_pipe, image_record, settings


@pytest.fixture(scope="module")
def setup():
    pipe = euler_tiny_pipe()
    jobs = demo_jobs(2)
    return pipe, jobs


def make(pipe, jobs, hires=None):
    settings = GenerationSettings(4, 5.0, 64, 48, 2)
    out = [
        g
        for batch in KeyframeGenerator(pipe, settings, hooks=[hires] if hires else []).run(jobs)
        for g in batch
    ]
    assert all(g.error is None for g in out)
    return [g.image for g in out]


def test_hires_doubles_the_size_and_redraws_detail_deterministically(setup):
    pipe, jobs = setup
    hires = Hires(pipe, HiresConfig(name="hires", factor=2.0, strength=0.5))
    assert hires.pipe.unet is pipe.unet and hires.pipe.vae is pipe.vae  # from_pipe: shared
    base = make(pipe, jobs)
    first, again = make(pipe, jobs, hires), make(pipe, jobs, hires)
    assert [im.size for im in first] == [(128, 96)] * 2
    for a, b, small in zip(first, again, base, strict=True):
        a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
        assert (a == b).all()  # the same seeds, the same pixels
        resized = np.asarray(small.resize((128, 96), Image.Resampling.BICUBIC), dtype=np.int16)
        assert np.abs(a - resized).mean() > 2  # not just a resize: the img2img pass redrew it


def test_hires_settings_are_checked_and_the_final_size_is_limited():
    assert upscaled_size(1344, 768, 1.5) == (2016, 1152)
    for overrides, message in [
        (["upscale.factor=1"], "upscale.factor=1.0: must be above 1"),
        (["upscale.strength=0"], "upscale.strength=0.0: must be in (0, 1]"),
        (["width=4096", "height=4096", "upscale.factor=2"], "size 8192x8192 (67.1 MP)"),
    ]:
        with pytest.raises(ConfigError) as info:
            check_settings(settings("upscale=hires", *overrides))
        assert any(message in p for p in info.value.problems), info.value.problems


def test_hires_is_written_the_way_image_browsers_read_it():
    record = {
        "prompt": "a boat",
        "negative_prompt": "",
        "steps": 30,
        "sampler_label": "Euler",
        "cfg_scale": 5.0,
        "seed": 1,
        "width": 1344,
        "height": 768,
        "model": "sdxl_base",
        "style": "none",
        "upscale": {
            "name": "hires",
            "factor": 1.5,
            "strength": 0.35,
            "steps": 30,
            "width": 2016,
            "height": 1152,
        },
    }
    text = a1111_parameters(image_record(**record))
    assert "Size: 1344x768" in text
    assert "Hires upscale: 1.5, Hires steps: 30, Denoising strength: 0.35" in text


def test_smoke_run_with_the_tiny_refiner_records_it_everywhere(cli_in_process):
    code, err, run_dir, _ = cli_in_process("upscale=tiny_refiner", "upscale.high_noise_frac=0.6")
    assert code == 0, err[-2000:]
    manifest = read_manifest(run_dir)
    record = manifest["images"][0]
    assert record["upscale"] == {
        "name": "refiner",
        "model": settings("upscale=tiny_refiner").upscale.path,  # the folder it loaded
        "high_noise_frac": 0.6,
        "width": 256,
        "height": 144,
    }
    assert manifest["run"]["model_family"] == "sdxl"
    with Image.open(run_dir / record["file"]) as image:
        assert image.size == (256, 144)
    text = read_png_metadata(run_dir / record["file"])["parameters"]
    tiny = settings("upscale=tiny_refiner").upscale.path
    assert f"Refiner: {tiny}, Refiner switch at: 0.6" in text
    log = (run_dir / "run.log").read_text()
    assert f"refiner {tiny} loaded" in log and "stable-diffusion-xl-refiner" not in log


def test_smoke_run_with_hires_says_nothing_seven_times(cli_in_process):
    """diffusers warns at every VAE cast of an img2img pass, of an empty module list."""
    code, err, run_dir, _ = cli_in_process("upscale=hires", "scorer=none", "width=64", "height=64")
    assert code == 0, err[-2000:]
    log = (run_dir / "run.log").read_text()
    assert "should be kept in float32" not in err + log
    assert {r["status"] for r in read_manifest(run_dir)["images"]} == {"ok"}


def test_hires_that_would_redraw_no_step_is_refused():
    with pytest.raises(ConfigError) as info:
        check_settings(settings("upscale=hires", "steps=2", "upscale.strength=0.35"))
    assert info.value.problems == [
        "upscale=hires: strength 0.35 of 2 steps redraws no step at all; raise upscale.steps "
        "(or upscale.strength)"
    ]
    check_settings(settings("upscale=hires", "steps=2", "upscale.steps=3"))  # 1 step: fine


def test_each_upscale_option_takes_only_its_own_settings(refused_cli):
    """One schema per option (HiresConfig, RefinerConfig): a hires setting given to the
    refiner is refused by name, a typo gets the closest key of any option."""
    other = refused_cli("experiment=smoke", "upscale=refiner", "upscale.factor=2")
    assert other.returncode == 2, other.stderr
    assert (
        "upscale.factor: upscale=refiner has no such setting (upscale=hires has it; "
        "upscale=refiner has: high_noise_frac, id, name, path, variant)"
    ) in other.stderr
    assert not other.run_dir.exists()
    default = refused_cli("experiment=smoke", "upscale.strength=0.5")  # the default: none
    assert "upscale=none has no such setting (upscale=hires has it" in default.stderr
    typo = refused_cli("experiment=smoke", "upscale=hires", "upscale.factr=2")
    assert typo.returncode == 2 and "the closest known one is upscale.factor" in typo.stderr


def test_a_sweep_over_upscale_options_is_checked_job_by_job():
    """Which option a setting meets is known per job: the sweep's check names the job."""
    from keyframes.config.compose import sweep_jobs
    from keyframes.config.overrides import check_override_keys
    from keyframes.config.schema import CONF_DIR, Config
    from keyframes.errors import ConfigError
    from keyframes.generation.recipe import check_sweep

    overrides = ["experiment=smoke", "upscale=hires,refiner", "upscale.factor=2"]
    check_override_keys(overrides, Config, CONF_DIR)  # no one option to hold it to
    with pytest.raises(ConfigError) as refused:
        check_sweep(sweep_jobs(overrides), ["upscale"])
    assert str(refused.value).startswith("1 of 2 jobs of this sweep cannot run")
    assert "job 1 (upscale=refiner): " in str(refused.value) and "factor" in str(refused.value)
