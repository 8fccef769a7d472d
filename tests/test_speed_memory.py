"""Memory and speed modes on the tiny model (CPU), memory=auto's choice, the full-size
architecture on the meta device, and the benchmark script."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from keyframes.config.schema import ModelConfig, SamplerConfig, SpeedConfig, memory_mode
from keyframes.config.validate import validate
from keyframes.errors import ConfigError
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from keyframes.pipeline.architectures import (
    build_components,
    build_random_pipeline,
    count_parameters,
    packaged_counts,
)
from keyframes.pipeline.flops import count_flops, image_flops, packaged_flops
from keyframes.pipeline.load import apply_sampler, load_pipeline, resolve_placement
from keyframes.pipeline.memory import choose_mode, plan_memory, weights_gb
from keyframes.pipeline.speed import apply_speed, check_speed
from tests.helpers import assert_same_picture, demo_jobs, settings, tiny_model_config

ROOT = Path(__file__).resolve().parent.parent
CPU = resolve_placement("cpu", "float32")
EULER = SamplerConfig(name="euler", label="Euler", scheduler="EulerDiscreteScheduler")
PRESETS = {
    name: SpeedConfig(name=name, **flags)
    for name, flags in {
        "sdpa": {},
        "fast": {"channels_last": True, "fuse_qkv": True},
        "compile": {"compile": True, "channels_last": True, "fuse_qkv": True},
    }.items()
}


def make_images(pipe, jobs, batch_size=1, fixed_batch=False):
    apply_sampler(pipe, EULER)
    settings = GenerationSettings(2, 5.0, 64, 64, batch_size, fixed_batch=fixed_batch)
    out = [g for batch in KeyframeGenerator(pipe, settings).run(jobs) for g in batch]
    assert all(g.error is None for g in out), [g.error for g in out]
    return [np.asarray(g.image, dtype=np.int16) for g in out]


@pytest.fixture(scope="module")
def reference_images():
    return make_images(load_pipeline(tiny_model_config(), CPU), demo_jobs(2))


# --- memory ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "balanced", "auto"])
def test_memory_modes_run_on_cpu_and_keep_small_images_identical(mode, reference_images):
    plan = plan_memory(memory_mode(mode), "cpu", torch.float32, tiny_model_config(), 1, 64, 64)
    assert plan.mode == ("none" if mode == "auto" else mode)
    pipe = load_pipeline(tiny_model_config(), CPU, plan.mode)
    assert pipe.vae.use_tiling == pipe.vae.use_slicing == (plan.mode == "balanced")
    # the useful work, not the tiles' overlap: the same FLOPs in every mode
    assert image_flops(pipe, 512, 512) == image_flops(
        load_pipeline(tiny_model_config(), CPU), 512, 512
    )
    # 64 px is below the VAE's tile size and the batch is 1: slicing and tiling change nothing
    for made, reference in zip(make_images(pipe, demo_jobs(2)), reference_images, strict=True):
        assert (made == reference).all()


def test_a_memory_mode_is_its_settings_not_its_name():
    """conf/memory/ holds what each mode trades; a mode of one's own is settings too."""
    from keyframes.config.schema import MemoryConfig
    from keyframes.pipeline.memory import estimate_gb

    assert memory_mode("balanced") == MemoryConfig("balanced", "none", True, True, False)
    assert memory_mode("low_vram") == MemoryConfig("low_vram", "model", False, True, True)
    slicing_only = MemoryConfig(name="my_mode", vae_slicing=True)
    pipe = load_pipeline(tiny_model_config(), CPU, slicing_only)
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling
    weights = (7.0, 5.0)  # GB: all weights, the largest component
    # batch 2 at 2048x2048: slicing decodes one image at a time, balanced one tile of it
    none, mine, balanced = (
        estimate_gb(mode, 2, 2048, 2048, weights) for mode in ("none", slicing_only, "balanced")
    )
    assert none > mine > balanced


@pytest.mark.parametrize("mode", ["low_vram", "minimal"])
def test_offload_modes_need_cuda_and_say_so(mode):
    with pytest.raises(ConfigError) as info:
        plan_memory(memory_mode(mode), "cpu", torch.float32, tiny_model_config(), 1, 64, 64)
    assert f"memory={mode}" in str(info.value) and "needs device=cuda" in str(info.value)
    assert "memory=auto" in str(info.value)


def test_decode_finds_the_execution_device_under_sequential_offload():
    """memory=minimal (accelerate's sequential offload) leaves the VAE's weights on `meta` and
    hooks each layer. The decode sent the latents to the first weight's device, `meta`, and
    failed on an H200 ("Cannot copy out of meta tensor"). Offload needs CUDA in diffusers, so
    the same hooks are installed here by hand, executing on the CPU."""
    from accelerate import cpu_offload

    from keyframes.generation.generator import decode

    pipe = load_pipeline(tiny_model_config(), CPU)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = decode(pipe, latents)
    cpu_offload(pipe.vae, execution_device=torch.device("cpu"))
    assert next(pipe.vae.parameters()).device.type == "meta"
    assert torch.equal(decode(pipe, latents), plain)  # the same computation, in this process


SDXL_BF16 = weights_gb(ModelConfig(name="sdxl_base", id="x"), torch.bfloat16)


def test_the_refiners_unet_is_counted_from_its_packaged_config():
    import json

    from diffusers import UNet2DConditionModel

    from keyframes.pipeline.architectures import DATA
    from keyframes.pipeline.memory import REFINER_UNET_PARAMETERS

    config = json.loads((DATA / "sdxl_refiner" / "unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    assert sum(p.numel() for p in unet.parameters()) == REFINER_UNET_PARAMETERS
    # aesthetic score conditioning: pooled 1280 + 5 x 256 time ids, as the refiner's pipeline sends
    assert unet.add_embedding.linear_1.in_features == 2560
    total, largest = SDXL_BF16
    with_refiner = weights_gb(ModelConfig(name="sdxl_base", id="x"), torch.bfloat16, True)
    assert with_refiner == (pytest.approx(total + 2 * REFINER_UNET_PARAMETERS / 1e9), largest)


@pytest.mark.parametrize(
    "free_gb, batch, float32_vae, expected",
    [
        (80.0, 4, False, "none"),  # an H100: nothing to save
        (24.0, 1, False, "none"),  # a 24 GB card, one image
        (16.0, 4, False, "balanced"),  # four full-size VAE decodes do not fit; one does
        (12.0, 1, False, "none"),
        (12.0, 1, True, "low_vram"),  # float16: the SDXL VAE decodes in float32
        (12.0, 4, False, "balanced"),  # measured on an H200: 9.7 GB
        (8.0, 1, False, "low_vram"),
        (4.0, 1, False, "minimal"),
    ],
)
def test_auto_picks_the_fastest_mode_that_fits(free_gb, batch, float32_vae, expected):
    plan = choose_mode(free_gb, batch, 1024, 1024, SDXL_BF16, float32_vae)
    assert plan.mode == expected
    assert plan.requested == "auto" and plan.free_vram_gb == free_gb
    assert f"{free_gb:.1f} GB" in plan.reason


def test_weights_estimate_is_the_real_parameter_count():
    total, largest = SDXL_BF16
    assert total == pytest.approx(3_468_837_867 * 2 / 1e9)
    assert largest == pytest.approx(2_567_463_684 * 2 / 1e9)


def test_auto_on_cpu_is_none():
    plan = plan_memory(
        memory_mode("auto"), "cpu", torch.float32, tiny_model_config(), 4, 1024, 1024
    )
    assert (plan.mode, plan.reason) == ("none", "cpu: no GPU memory to save")


# --- speed ----------------------------------------------------------------------------


def test_fast_preset_fuses_qkv_and_uses_channels_last_with_nearly_the_same_pixels(
    reference_images,
):
    pipe = load_pipeline(tiny_model_config(), CPU)
    applied = apply_speed(pipe, PRESETS["fast"], "cpu")
    assert applied == {"attention": "sdpa", "fuse_qkv": True, "channels_last": True}
    conv = pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"FusedAttnProcessor2_0"}
    for made, reference in zip(make_images(pipe, demo_jobs(2)), reference_images, strict=True):
        assert_same_picture(made, reference, "fast")  # same maths, another summation order


def test_sdpa_preset_runs_and_tf32_is_cuda_only(reference_images):
    pipe = load_pipeline(tiny_model_config(), CPU)
    assert apply_speed(pipe, PRESETS["sdpa"], "cpu") == {"attention": "sdpa"}
    for made, reference in zip(make_images(pipe, demo_jobs(2)), reference_images, strict=True):
        assert (made == reference).all()


def test_compile_needs_cuda_and_says_so():
    with pytest.raises(ConfigError) as info:
        check_speed(PRESETS["compile"], "cpu")
    assert "speed=compile compiles the model for a CUDA GPU" in str(info.value)
    assert "speed=fast" in str(info.value)


def test_compile_with_cpu_offload_is_refused_by_validation():
    with pytest.raises(ConfigError) as info:
        validate(settings("speed=compile", "memory=low_vram"))
    assert "speed.compile with memory=low_vram" in str(info.value.problems[0])


def test_fixed_batch_pads_the_last_batch_to_one_shape():
    """Compiled models must see one shape: 3 images at batch 2 run as two batches of 2."""
    pipe = load_pipeline(tiny_model_config(), CPU)
    shapes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape[0]))
    try:
        padded = make_images(pipe, demo_jobs(3), batch_size=2, fixed_batch=True)
    finally:
        hook.remove()
    assert len(padded) == 3
    assert set(shapes) == {4}  # 2 images x 2 (classifier-free guidance), every step
    alone = make_images(pipe, demo_jobs(3)[2:], batch_size=1)[0]
    assert np.abs(padded[2] - alone).max() <= 2  # its own seed, whatever it was batched with


def test_warm_up_runs_once_per_batch_shape():
    from keyframes.generation.warmup import warm_up
    from keyframes.pipeline.load import LoadedPipeline

    pipe = load_pipeline(tiny_model_config(), CPU)
    apply_sampler(pipe, EULER)
    loaded = LoadedPipeline(pipe, pipe.scheduler.config, {}, (), CPU, "none")
    settings = GenerationSettings(30, 5.0, 64, 64, 2, fixed_batch=True)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        assert warm_up(loaded, settings, demo_jobs(1)[0])[0] > 0
        assert calls == [4, 4]  # the batch shape (2 x CFG), only 2 of the 30 steps
        assert warm_up(loaded, settings, demo_jobs(1)[0]) == (0.0, []) and len(calls) == 2
        assert loaded.warmed_up == {(2, 64, 64)}
    finally:
        hook.remove()


# --- devices and dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_is_bfloat16_where_supported(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_placement("auto", "auto").dtype == expected


def test_replacement_vae_is_loaded_from_a_folder(tmp_path):
    from diffusers import AutoencoderKL

    from keyframes.pipeline.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    torch.manual_seed(1)
    other = AutoencoderKL.from_config(pipe.vae.config)
    other.save_pretrained(tmp_path / "vae")
    model = ModelConfig(name="local", path=str(tmp_path / "model"), vae=str(tmp_path / "vae"))
    loaded = load_pipeline(model, CPU)
    assert torch.equal(loaded.vae.decoder.conv_in.weight, other.decoder.conv_in.weight)
    assert not torch.equal(loaded.vae.decoder.conv_in.weight, pipe.vae.decoder.conv_in.weight)
    model.vae = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="model.vae=.*missing: no such file"):
        load_pipeline(model, CPU)  # a path that is not there: said before any loading


# --- the full-size architecture on the meta device -------------------------------------

PUBLISHED = {  # the parameter counts of stabilityai/stable-diffusion-xl-base-1.0
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def test_sdxl_random_has_the_published_parameter_counts_on_meta():
    assert count_parameters("sdxl_base") == PUBLISHED
    assert packaged_counts("sdxl_base")["parameters"] == PUBLISHED


def test_sdxl_random_pipeline_assembles_with_the_real_tokenizer_on_meta():
    pipe = build_random_pipeline("sdxl_base", "meta", torch.bfloat16)
    assert pipe.unet.device.type == "meta" and pipe.unet.dtype == torch.bfloat16
    assert pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 128
    ids = pipe.tokenizer("a lighthouse at dusk", padding="max_length").input_ids
    assert len(ids) == 77 and ids[0] == 49406 and 49407 in ids  # start, end of text
    assert pipe.tokenizer_2.pad_token == "!"


def test_packaged_flops_match_a_fresh_count_and_the_issue_figures():
    unet, vae, text_encoder, text_encoder_2 = build_components("sdxl_base", "meta")
    fresh = count_flops(unet, vae, (text_encoder, text_encoder_2), 1024, 1024)
    assert fresh == packaged_flops("sdxl_base", 1024, 1024)
    assert 6.7e12 < fresh.unet_per_sample_step < 6.9e12  # "about 6.8 TFLOP per sample-step"
    assert 10.4e12 < fresh.vae_decode < 10.6e12  # "about 10.5 TFLOP for the VAE decode"
    assert 410e12 < fresh.per_image(30, 5.0) < 420e12  # "about 416 TFLOP per image"
    assert fresh.per_image(30, 1.0) < fresh.per_image(30, 5.0) / 1.9  # no guidance, no CFG


def test_flops_of_an_sd15_pipeline_are_counted_without_sdxls_added_conditioning():
    from keyframes.pipeline.tiny import build_tiny_sd15

    flops, source = image_flops(build_tiny_sd15(), 64, 64)
    assert source == "counted now on meta (this model)"
    assert flops.unet_per_sample_step > 0 and flops.text_encoders > 0 and flops.vae_decode > 0


def test_flops_spent_follow_the_unet_evaluations_made():
    flops = packaged_flops("sdxl_base", 1024, 1024)
    assert flops.spent(60, 5.0) == flops.per_image(30, 5.0)  # every step guided
    # guidance in the first half only: 15 steps x 1 sample fewer, 101 TFLOP of 416
    saved = flops.per_image(30, 5.0) - flops.spent(45, 5.0)
    assert saved == pytest.approx(15 * flops.unet_per_sample_step) and 100e12 < saved < 102e12
    assert flops.spent(30, 1.0) == flops.per_image(30, 1.0)  # unguided: one prompt encoded


# --- the command line and the benchmark -------------------------------------------------


def test_cli_offload_mode_on_cpu_exits_2_before_loading(refused_cli):
    result = refused_cli("experiment=smoke", "memory=low_vram")
    assert result.returncode == 2, result.output
    assert "memory=low_vram moves weights between CPU and GPU memory" in result.stderr
    assert "Traceback" not in result.output and not result.run_dir.exists()


def test_smoke_run_records_memory_mode_and_speed(smoke_run):
    run = json.loads((smoke_run.run_dir / "manifest.json").read_text())["run"]
    assert run["memory"]["requested"] == "auto" and run["memory"]["mode"] == "none"
    assert run["speed"] == {"preset": "sdpa", "attention": "sdpa"}
    assert "compile_seconds" not in run["timings"]  # nothing compiled, nothing to report


@pytest.mark.slow
def test_bench_on_the_tiny_model_writes_its_json_without_mlflow_or_torchvision(tmp_path):
    out = tmp_path / "bench.json"
    code = (
        "import runpy, sys; sys.modules['mlflow'] = None; sys.modules['torchvision'] = None; "
        "sys.argv = ['bench.py', 'model=tiny', 'device=cpu', 'steps=2', "
        "'width=64', 'height=64', '--images', '2', '--repeats', '2', '--batch-sizes', '1,2', "
        f"'--json', {str(out)!r}]; runpy.run_path({str(ROOT / 'scripts/bench.py')!r}, "
        "run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (report["model"], report["device"], report["width"], report["steps"]) == (
        "tiny",
        "cpu",
        64,
        2,
    )
    assert [r["batch_size"] for r in report["results"]] == [1, 2]
    printed = [float(x) for x in re.findall(r"^ratio: ([0-9.]+)$", proc.stdout, re.M)]
    # the printed line is the JSON's ratio, formatted to 2 decimals
    assert printed == [float(f"{r['ratio']:.2f}") for r in report["results"]]
    for result in report["results"]:
        assert result["images"] == 2 and len(result["bare"]["seconds_per_image_rounds"]) == 2
        for path in ("bare", "keyframes"):
            figures = result[path]
            assert figures["seconds_per_image"] > 0
            assert figures["images_per_hour"] == pytest.approx(
                3600 / figures["seconds_per_image"], rel=1e-4
            )
            assert figures["vram_peak_gb"] is None  # no CUDA: absent, never 0
            assert figures["tflops_per_second"] == pytest.approx(
                report["flops_per_image"] / figures["seconds_per_image"] / 1e12, rel=1e-2
            )
        assert result["ratio"] == pytest.approx(
            result["keyframes"]["seconds_per_image"] / result["bare"]["seconds_per_image"],
            abs=1e-3,
        )
        # a plain run evaluates the UNet twice per step (CFG): the bare call's FLOPs spent
        assert result["unet_evaluations_per_image"] == 4
        assert result["keyframes"]["flops_per_image"] == result["bare"]["flops_per_image"]
    assert (
        report["flops_source"] == "counted now on meta (this model)"
        and report["flops_per_image"] > 0
    )
    assert report["memory"]["mode"] == "none" and report["speed"]["preset"] == "sdpa"


def test_bench_bad_override_exits_2(tmp_path, monkeypatch, capsys):
    """Through the script's own main, in this process (the slow bench test runs it whole)."""
    import runpy

    bench = runpy.run_path(str(ROOT / "scripts/bench.py"))  # not as __main__: defines only
    monkeypatch.chdir(tmp_path)
    assert bench["main"](["model=tiny", "speed=compile"]) == 2
    err = capsys.readouterr().err
    assert "speed=compile compiles the model for a CUDA GPU" in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()
