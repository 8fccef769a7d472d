"""Guidance in a limited interval and counted UNet evaluations, on the tiny model: the
counts come from a hook on the UNet's first convolution, independent of the wrapper."""

import numpy as np
import pytest

from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.generation.unet_calls import guided_step
from tests.helpers import demo_jobs, euler_tiny_pipe


def generate(pipe, cfg=5.0, interval=None):
    """(pixels per image, rows the UNet evaluated per call, evaluations per image) for two
    images in one batch, 4 steps."""
    rows = []
    # on the first convolution: the rows the UNet really evaluates, whatever wraps its forward
    hook = pipe.unet.conv_in.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        settings = GenerationSettings(4, cfg, 64, 64, 2, guidance_interval=interval)
        out = [g for b in KeyframeGenerator(pipe, settings).run(demo_jobs(2)) for g in b]
    finally:
        hook.remove()
    assert all(g.error is None for g in out)
    pixels = [np.asarray(g.image, dtype=np.int16) for g in out]
    return pixels, rows, [g.unet_evaluations for g in out]


@pytest.fixture(scope="module")
def made():
    pipe = euler_tiny_pipe()
    cases = {
        "guided": (5.0, None),
        "all": (5.0, (0.0, 1.0)),
        "first half": (5.0, (0.0, 0.5)),
        "nowhere": (5.0, (0.0, 0.0)),
        "cfg 1": (1.0, None),
        "cfg 1, interval": (1.0, (0.0, 0.5)),
    }
    return {name: generate(pipe, cfg, interval) for name, (cfg, interval) in cases.items()}


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_an_interval_covering_every_step_is_todays_guidance_exactly(made):
    assert same(made["all"][0], made["guided"][0])
    assert made["all"][1] == made["guided"][1] == [4] * 4  # 2 images as guided pairs, 4 steps
    assert made["all"][2] == [8.0, 8.0]


def test_steps_outside_the_interval_make_one_conditional_call(made):
    pixels, rows, evaluations = made["first half"]
    assert rows == [4, 4, 2, 2]  # guided pairs for steps 0-1, one conditional row after
    assert evaluations == [6.0, 6.0]
    for other in ("guided", "nowhere"):  # guided early, unguided late: neither of the two
        assert not any(np.array_equal(a, b) for a, b in zip(pixels, made[other][0], strict=True))


def test_no_guided_step_is_the_unguided_pipeline(made):
    """Guidance nowhere is cfg_scale=1, where the pipeline itself runs one row per image."""
    assert made["nowhere"][1] == made["cfg 1"][1] == [2] * 4
    assert same(made["nowhere"][0], made["cfg 1"][0])


def test_without_guidance_an_interval_halves_nothing(made):
    """cfg_scale=1: an even batch is two images, not a guided pair."""
    assert made["cfg 1, interval"][1] == [2] * 4
    assert same(made["cfg 1, interval"][0], made["cfg 1"][0])


def test_the_interval_is_a_share_of_the_schedule():
    assert [guided_step(i, 10, (0.0, 0.5)) for i in range(10)] == [True] * 5 + [False] * 5
    assert [guided_step(i, 4, (0.25, 0.75)) for i in range(4)] == [False, True, True, False]
    assert all(guided_step(i, 7, None) for i in range(7))


def test_the_papers_sdxl_band_is_the_documented_share_of_the_default_samplers_steps():
    """README: guidance_interval=[0.23,0.73] is the paper's SDXL interval, sigma in
    (0.28, 5.42], for DPM++ 2M Karras (the default sampler) at 30 steps: the same steps."""
    from diffusers import DPMSolverMultistepScheduler

    from keyframes.pipeline.architectures import architecture_configs

    scheduler = DPMSolverMultistepScheduler.from_config(
        architecture_configs("sdxl_base")["scheduler"], use_karras_sigmas=True
    )
    scheduler.set_timesteps(30)
    in_band = [0.28 < sigma <= 5.42 for sigma in scheduler.sigmas[:-1].tolist()]
    assert [guided_step(i, 30, (0.23, 0.73)) for i in range(30)] == in_band
    assert sum(in_band) == 15  # 45 UNet evaluations instead of 60
