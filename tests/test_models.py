import numpy as np
import pytest
import torch

from keyframes.config.schema import ModelConfig, SamplerConfig
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, generate
from keyframes.pipeline.load import apply_sampler, check_source, load_pipeline, resolve_placement
from keyframes.pipeline.tiny import clip_tokenizers
from keyframes.shotlist.jobs import plan_jobs
from keyframes.shotlist.load import load_shotlist
from tests.helpers import (
    FLOAT_NOISE,
    assert_same_picture,
    default_speed,
    pixel_gap,
    tiny_model_config,
)

SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
SMALL = GenerationSettings(steps=3, cfg_scale=5.0, width=128, height=72, batch_size=1)


def demo_jobs(n=3, takes=1):
    jobs = plan_jobs(load_shotlist("demo"), "{prompt}", "", "blurry", 1, "derived", takes)
    return jobs[:n]


def pixels(pipe, jobs, settings=SMALL):
    images = [g.image for batch in generate(pipe, jobs, settings) for g in batch]
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_tokenizer_is_the_real_clip_bpe():
    for tokenizer in clip_tokenizers():
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.model_max_length == 77


def test_tiny_model_has_the_sdxl_wiring(tiny_pipe):
    from diffusers import StableDiffusionXLPipeline

    assert type(tiny_pipe) is StableDiffusionXLPipeline
    unet, vae = tiny_pipe.unet.config, tiny_pipe.vae.config
    assert unet.addition_embed_type == "text_time"
    assert tiny_pipe.vae_scale_factor == 8 == 2 ** (len(vae.block_out_channels) - 1)
    width = tiny_pipe.text_encoder.config.hidden_size + tiny_pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == width
    assert tiny_pipe.tokenizer_2.pad_token == "!"


def test_same_seed_gives_the_same_pixels(tiny_pipe):
    first, second = pixels(tiny_pipe, demo_jobs(2)), pixels(tiny_pipe, demo_jobs(2))
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    assert not (first[0] == first[1]).all()  # different scenes, different seeds


def test_batching_does_not_change_the_images(tiny_pipe):
    jobs = demo_jobs(3, takes=1)
    single = pixels(tiny_pipe, jobs)
    batched = pixels(tiny_pipe, jobs, GenerationSettings(**{**SMALL.__dict__, "batch_size": 2}))
    for a, b in zip(single, batched, strict=True):
        assert_same_picture(a, b, "batch of 2")  # float reductions differ in order, not content


def test_the_float_noise_tolerance_still_catches_real_bugs(tiny_pipe):
    """Pictures from different computations are compared within FLOAT_NOISE (at most 2 levels,
    on at most 0.2% of values). Here is how far from it real bugs land on the same image: on
    this tiny model a wrong seed differs in ~99% of values, one step fewer in ~95%, and
    cfg 5 -> 5.05 (1%) in ~10%, while a batch of 2 or a reloaded model differ in ~0.03%."""
    from dataclasses import replace

    job = demo_jobs(1)[0]
    made = pixels(tiny_pipe, [job])[0]
    bugs = {
        "wrong seed": pixels(tiny_pipe, [replace(job, seed=job.seed + 1)])[0],
        "one step fewer": pixels(tiny_pipe, [job], replace(SMALL, steps=SMALL.steps - 1))[0],
        "cfg 1% off": pixels(tiny_pipe, [job], replace(SMALL, cfg_scale=5.05))[0],
    }
    for bug, image in bugs.items():
        gap = pixel_gap(made, image)
        assert not gap.within(FLOAT_NOISE), bug
        assert gap.share > 10 * FLOAT_NOISE.share and gap.mean > 10 * FLOAT_NOISE.mean, (bug, gap)


def test_generation_reports_timing_and_no_vram_on_cpu(tiny_pipe):
    batch = next(
        generate(tiny_pipe, demo_jobs(2), GenerationSettings(**{**SMALL.__dict__, "batch_size": 2}))
    )
    assert len(batch) == 2
    assert all(g.seconds > 0 and g.vram_peak_gb is None and g.rss_peak_gb > 0.1 for g in batch)
    assert batch[0].image.size == (128, 72)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_swaps_in_and_generates(tiny_pipe, name):
    cls, options = SAMPLERS[name]
    # a fresh pipeline: the shared one keeps its sampler
    pipe = load_pipeline(tiny_model_config(), resolve_placement("cpu", "auto"))
    apply_sampler(pipe, SamplerConfig(name=name, label=name, scheduler=cls, options=options))
    assert type(pipe.scheduler).__name__ == cls
    for key, value in options.items():
        assert pipe.scheduler.config[key] == value
    # the model's own noise schedule survives the swap
    assert pipe.scheduler.config.beta_end == 0.012
    image = pixels(pipe, demo_jobs(1))[0]
    assert image.shape == (72, 128, 3) and image.std() > 1


def test_unknown_scheduler_class_is_refused(tiny_pipe):
    with pytest.raises(ConfigError, match="not a diffusers scheduler"):
        apply_sampler(
            tiny_pipe, SamplerConfig(name="x", label="x", scheduler="StableDiffusionXLPipeline")
        )


def test_saved_tiny_model_loads_from_model_path_with_the_same_images(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "tiny-sdxl")
    assert list((tmp_path / "tiny-sdxl" / "unet").glob("*.safetensors"))
    loaded = load_pipeline(
        ModelConfig(name="local", path=str(tmp_path / "tiny-sdxl"), variant="fp16"),
        resolve_placement("cpu", "auto"),
    )
    apply_sampler(
        loaded, SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
    )
    for a, b in zip(pixels(tiny_pipe, demo_jobs(2)), pixels(loaded, demo_jobs(2)), strict=True):
        assert_same_picture(a, b, "reloaded")  # another copy of the weights: other kernels


def test_pickle_checkpoints_are_refused_before_loading(tmp_path):
    for suffix in (".ckpt", ".bin", ".pt"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"not loaded")
        with pytest.raises(ConfigError, match=f"is a pickle \\({suffix}\\), which can run code"):
            check_source(ModelConfig(name="local", path=str(path)))


def test_missing_local_path_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="no such file or folder"):
        check_source(ModelConfig(name="local", path=str(tmp_path / "absent")))


def test_cuda_request_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="device=cuda: no CUDA device"):
        resolve_placement("cuda", "auto")


def test_auto_placement_uses_float32_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    placement = resolve_placement("auto", "auto")
    assert (placement.device, placement.dtype) == ("cpu", torch.float32)


def test_cached_pipeline_is_reused_until_the_model_changes():
    from keyframes.pipeline.load import cached_pipeline, release_pipeline

    placement = resolve_placement("cpu", "auto")
    first, hit = cached_pipeline(tiny_model_config(), placement, "none", default_speed())
    again, hit_again = cached_pipeline(tiny_model_config(), placement, "none", default_speed())
    assert (hit, hit_again) == (False, True) and again.pipe is first.pipe
    other, hit_other = cached_pipeline(
        tiny_model_config(name="tiny2"), placement, "none", default_speed()
    )
    assert hit_other is False and other.pipe is not first.pipe
    release_pipeline()


def test_sampler_swaps_on_a_reused_pipeline_do_not_leak_options():
    """euler after dpmpp_2m_karras must be plain euler, as in a fresh process."""
    from keyframes.pipeline.load import cached_pipeline, release_pipeline

    euler = SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
    karras = SamplerConfig(
        name="k",
        label="k",
        scheduler="DPMSolverMultistepScheduler",
        options={"use_karras_sigmas": True},
    )
    placement = resolve_placement("cpu", "auto")
    release_pipeline()
    loaded, _ = cached_pipeline(tiny_model_config(), placement, "none", default_speed())
    apply_sampler(loaded.pipe, euler, loaded.scheduler_config)
    fresh = pixels(loaded.pipe, demo_jobs(1))[0]
    apply_sampler(loaded.pipe, karras, loaded.scheduler_config)
    apply_sampler(loaded.pipe, euler, loaded.scheduler_config)
    assert loaded.pipe.scheduler.config.use_karras_sigmas is False
    assert (pixels(loaded.pipe, demo_jobs(1))[0] == fresh).all()
    release_pipeline()
