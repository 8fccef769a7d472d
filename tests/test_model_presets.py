"""Distilled models (turbo, lightning): their settings win with a warning; UNet replacement
and scheduler overrides work on the tiny model."""

import pytest
import torch
from safetensors.torch import save_file

from keyframes.config.plan import fit_to_model
from keyframes.config.schema import SamplerConfig
from keyframes.config.validate import validate
from keyframes.errors import ModelUnavailableError
from keyframes.pipeline.load import apply_sampler, load_pipeline, resolve_placement
from tests.helpers import settings, tiny_model_config

CPU = resolve_placement("cpu", "float32")


def test_turbo_gets_its_steps_guidance_and_size_with_a_warning_each():
    cfg = settings("model=sdxl_turbo", "steps=30", "cfg_scale=7")
    cfg, notes = fit_to_model(cfg)
    assert (cfg.steps, cfg.cfg_scale, cfg.quality.base_size) == (4, 0.0, 512)
    assert notes[:3] == [
        "steps=30 does not fit sdxl_turbo (1-4): using 4",
        "cfg_scale=7 does not fit sdxl_turbo (distilled for 0): using 0",
        "quality standard sizes for 1024 px; sdxl_turbo is made for 512: using 512",
    ]
    assert "sdxl_turbo is made for sampler=euler_a" in notes[3]
    assert validate(cfg) == (672, 384)  # 16:9 at 512 px


def test_settings_that_fit_give_no_warning():
    cfg = settings(
        "model=sdxl_turbo", "steps=2", "cfg_scale=0", "sampler=euler_a", "width=512", "height=512"
    )
    cfg, notes = fit_to_model(cfg)
    assert notes == [] and (cfg.steps, cfg.cfg_scale) == (2, 0.0)
    assert fit_to_model(settings())[1] == []  # SDXL base: nothing to fit


def test_lightning_is_four_steps_trailing_with_its_own_unet():
    cfg = settings("model=sdxl_lightning", "sampler=euler")
    assert fit_to_model(cfg)[1] == [
        "steps=30 does not fit sdxl_lightning (4-4): using 4",
        "cfg_scale=7 does not fit sdxl_lightning (distilled for 0): using 0",
    ]
    assert cfg.model.unet.endswith("sdxl_lightning_4step_unet.safetensors")
    assert cfg.model.timestep_spacing == "trailing"


def test_unet_weights_replace_the_models_and_the_scheduler_override_survives_samplers(tmp_path):
    base = load_pipeline(tiny_model_config(), CPU)
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in base.unet.state_dict().items()}
    save_file(state, tmp_path / "unet.safetensors")
    model = tiny_model_config(unet=str(tmp_path / "unet.safetensors"), timestep_spacing="trailing")
    pipe = load_pipeline(model, CPU)
    assert torch.equal(pipe.unet.conv_in.weight, state["conv_in.weight"])
    euler = SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
    apply_sampler(pipe, euler, pipe.scheduler.config)
    assert pipe.scheduler.config.timestep_spacing == "trailing"


def test_unusable_unet_weights_say_what_to_give(tmp_path):
    save_file({"nope": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(
        ModelUnavailableError, match="model.unet=.*other.safetensors: could not be loaded"
    ):
        load_pipeline(tiny_model_config(unet=str(tmp_path / "other.safetensors")), CPU)
