"""Models beyond SDXL base on tiny random-weight pipelines: SD 1.5 (the pipeline class
follows the model) and the SDXL refiner as an ensemble of experts."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from keyframes.conditioning.hires import Hires
from keyframes.conditioning.refiner import Refiner, load_refiner
from keyframes.config.schema import HiresConfig, ModelConfig, RefinerConfig
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.outputs.png import a1111_parameters
from keyframes.pipeline.load import load_pipeline, resolve_family, resolve_placement
from keyframes.pipeline.long_prompts import chunk_count, encode, text_inputs
from keyframes.pipeline.tiny import TEXT_WIDTH_2
from tests.helpers import (
    LONG,
    check_settings,
    demo_jobs,
    euler_tiny_pipe,
    image_record,
    settings,
    tiny_model_config,
    tiny_path,
)

CPU = resolve_placement("cpu", "float32")


@pytest.fixture(scope="module")
def sd15():
    return load_pipeline(tiny_model_config(family="sd15"), CPU)


def pixels(pipe, jobs, settings=None, **parts):
    settings = settings or GenerationSettings(3, 5.0, 64, 48, 2)
    hooks = [hook for hook in parts.values() if hook is not None]
    made = [g for b in KeyframeGenerator(pipe, settings, hooks=hooks).run(jobs) for g in b]
    assert all(g.error is None for g in made), [g.error for g in made]
    return [np.asarray(g.image, dtype=np.int16) for g in made]


def test_sd15_runs_through_its_own_pipeline_class_reproducibly(sd15):
    assert type(sd15).__name__ == "StableDiffusionPipeline"
    assert not hasattr(sd15, "text_encoder_2")
    jobs = demo_jobs(2)
    first, again = pixels(sd15, jobs), pixels(sd15, jobs)
    assert [a.shape for a in first] == [(48, 64, 3)] * 2
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert np.abs(first[0] - first[1]).mean() > 1  # two scenes, two pictures


def test_sd15_long_prompts_are_chunked_from_its_one_encoders_last_layer(sd15):
    count = chunk_count(sd15, LONG)
    embeds, pooled = encode(sd15, [LONG], count)
    assert count > 2 and embeds.shape == (1, 77 * count, 32) and pooled is None
    own, _ = sd15.encode_prompt(LONG, "cpu", 1, do_classifier_free_guidance=False)
    assert torch.allclose(embeds[:, :77], own, atol=1e-6)  # what SD 1.5 makes of the cut prompt
    inputs = text_inputs(sd15, [LONG], [""], "chunk")
    assert set(inputs) == {"prompt_embeds", "negative_prompt_embeds"}  # no pooled for SD 1.5


def test_sd15_hires_uses_the_sd15_img2img_pipeline(sd15):
    hires = Hires(sd15, HiresConfig(name="hires", factor=2.0, strength=0.5))
    assert type(hires.pipe).__name__ == "StableDiffusionImg2ImgPipeline"
    assert [a.shape for a in pixels(sd15, demo_jobs(1), hires=hires)] == [(96, 128, 3)]


def test_family_is_read_from_a_folder_or_a_checkpoints_tensor_names(sd15, tmp_path):
    sd15.save_pretrained(tmp_path / "sd15")
    local = ModelConfig(name="local", path=str(tmp_path / "sd15"))
    assert resolve_family(local) == "sd15"
    loaded = load_pipeline(local, CPU)  # the real loading code, on the saved tiny model
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert torch.equal(loaded.unet.conv_in.weight, sd15.unet.conv_in.weight)
    for keys, family in [
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight"], "sd15"),
        (["conditioner.embedders.0.transformer.x", "conditioner.embedders.1.model.x"], "sdxl"),
    ]:
        path = tmp_path / f"{family}.safetensors"
        save_file({key: torch.zeros(1) for key in keys}, path)
        assert resolve_family(ModelConfig(name="local", path=str(path))) == family
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.x": torch.zeros(1)}, refiner)
    with pytest.raises(ConfigError, match="an SDXL refiner checkpoint"):
        resolve_family(ModelConfig(name="local", path=str(refiner)))
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.x": torch.zeros(1)}, sd2)
    with pytest.raises(ConfigError, match="an SD 2.x checkpoint"):
        resolve_family(ModelConfig(name="local", path=str(sd2)))
    (tmp_path / "img2img").mkdir()
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline"}
    (tmp_path / "img2img" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="use it as upscale=refiner"):
        resolve_family(ModelConfig(name="local", path=str(tmp_path / "img2img")))


def test_sdxl_only_parts_are_refused_for_sd15_before_loading():
    for overrides, message in [
        (["upscale=refiner"], "upscale=refiner: the SDXL refiner finishes SDXL latents"),
        (["consistency=ip_adapter"], "consistency=ip_adapter loads SDXL IP-Adapters"),
        (["controlnet=canny_sdxl"], "controlnet=canny_sdxl is a sdxl ControlNet"),
    ]:
        cfg = settings("model=sd15", *overrides)
        with pytest.raises(ConfigError) as info:
            check_settings(cfg, controlled=True)
        assert any(message in p for p in info.value.problems), info.value.problems
    check_settings(settings("model=sd15", "controlnet=canny_sd15"), controlled=True)
    check_settings(settings("upscale=refiner"), controlled=False)


@pytest.fixture(scope="module")
def base():
    return euler_tiny_pipe()


def test_refiner_finishes_the_base_latents_and_shares_its_encoder_and_vae(base):
    config = RefinerConfig(name="refiner", path=tiny_path("sdxl-refiner"), high_noise_frac=0.5)
    pipe = load_refiner(base, config)
    assert pipe.text_encoder_2 is base.text_encoder_2 and pipe.vae is base.vae
    assert pipe.text_encoder is None and pipe.config.requires_aesthetics_score
    refiner = Refiner(pipe, config, "chunk")
    jobs = demo_jobs(2)
    plain = pixels(base, jobs)
    refined, again = pixels(base, jobs, refiner=refiner), pixels(base, jobs, refiner=refiner)
    assert all((a == b).all() for a, b in zip(refined, again, strict=True))
    assert all(np.abs(a - b).mean() > 1 for a, b in zip(refined, plain, strict=True))
    # the refiner reads long prompts in full too (encoder 2 only, with pooled)
    inputs = text_inputs(pipe, [LONG], [""], "chunk")
    assert inputs["prompt_embeds"].shape[-1] == TEXT_WIDTH_2 and "pooled_prompt_embeds" in inputs
    long_job = [jobs[0].__class__(**{**jobs[0].__dict__, "prompt": LONG})]
    assert pixels(base, long_job, refiner=refiner)[0].shape == (48, 64, 3)


def test_refiner_loads_from_a_folder_with_the_base_encoder_and_vae(base, tmp_path):
    load_refiner(
        base, RefinerConfig(name="refiner", path=tiny_path("sdxl-refiner"))
    ).save_pretrained(tmp_path)
    folder = RefinerConfig(name="refiner", path=str(tmp_path))
    pipe = load_refiner(base, folder)
    assert type(pipe).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert pipe.text_encoder_2 is base.text_encoder_2 and pipe.vae is base.vae


def test_refiner_settings_are_checked_and_recorded_as_image_browsers_read_them():
    with pytest.raises(ConfigError) as info:
        check_settings(settings("upscale=refiner", "upscale.high_noise_frac=1"))
    assert "upscale.high_noise_frac=1.0: must be between 0 and 1" in info.value.problems
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
            "name": "refiner",
            "high_noise_frac": 0.8,
            "model": "stabilityai/stable-diffusion-xl-refiner-1.0",
        },
    }
    text = a1111_parameters(image_record(**record))
    assert "Refiner: stabilityai/stable-diffusion-xl-refiner-1.0, Refiner switch at: 0.8" in text
