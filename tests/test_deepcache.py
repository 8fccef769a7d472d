"""UNet feature reuse (DeepCache) on small UNets: the shallow path computes exactly what the
full forward computes from the same deep feature, interval 1 changes nothing, interval 3 runs
the deep blocks on every third step only (counted with hooks), and a run records it."""

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from keyframes.generation.feature_reuse import _shallow_forward, feature_reuse
from keyframes.generation.generator import GenerationSettings, KeyframeGenerator
from tests.conftest import read_manifest
from tests.helpers import demo_jobs, euler_tiny_pipe, mlflow_runs


def three_level_unet() -> UNet2DConditionModel:
    """SDXL's layout (plain outer level, cross-attention inside, text-time embedding), three
    levels so that branches 0 and 1 both exist, a few thousand parameters."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(8, 16, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=8,
        attention_head_dim=4,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16 + 6 * 4,
    ).eval()


def unet_inputs(unet, rows=2, controlnet=False):
    g, config = torch.Generator().manual_seed(1), unet.config
    inputs = {
        "sample": torch.randn(rows, 4, 16, 16, generator=g),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(rows, 7, config.cross_attention_dim, generator=g),
    }
    if config.addition_embed_type == "text_time":  # SDXL's; SD 1.5 has none
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, 16, generator=g),
            "time_ids": torch.randn(rows, 6, generator=g),
        }
    if controlnet:  # a residual for every skip and for the mid block, shaped like them
        sizes = [(8, 16), (8, 16), (8, 16), (8, 8), (16, 8), (16, 8), (16, 4), (16, 4), (16, 4)]
        skips = [torch.randn(rows, c, s, s, generator=g) for c, s in sizes]
        inputs["down_block_additional_residuals"] = tuple(skips)
        inputs["mid_block_additional_residual"] = torch.randn(rows, 16, 4, 4, generator=g)
    return inputs


def sd15_unet():
    from keyframes.pipeline.tiny import build_tiny_sd15

    return build_tiny_sd15().unet


@pytest.mark.parametrize(
    "make, branch, controlnet",
    [
        (three_level_unet, 0, False),
        (three_level_unet, 1, False),
        (three_level_unet, 0, True),
        (three_level_unet, 1, True),
        (sd15_unet, 0, False),
    ],
    ids=[
        "sdxl-like-0",
        "sdxl-like-1",
        "sdxl-like-0-controlnet",
        "sdxl-like-1-controlnet",
        "sd15-0",
    ],
)
def test_the_shallow_path_is_the_full_forward_given_the_same_deep_feature(make, branch, controlnet):
    """The same blocks in the same order on the same inputs: bit-exact in this process. A
    wrong skip connection or embedding would differ by the size of the output itself."""
    unet = make()
    inputs = unet_inputs(unet, controlnet=controlnet)
    kept = {}
    entry = unet.up_blocks[len(unet.up_blocks) - 1 - branch]
    hook = entry.register_forward_pre_hook(
        lambda m, a, k: kept.update(feature=k["hidden_states"]), with_kwargs=True
    )
    with torch.no_grad():
        full = unet(**inputs).sample
        hook.remove()
        shallow = _shallow_forward(unet, branch, kept["feature"], **inputs).sample
        # the deep feature matters: another one gives another output, by about its own size
        other = _shallow_forward(unet, branch, torch.randn_like(kept["feature"]), **inputs)
    assert torch.equal(shallow, full)
    assert (other.sample - full).abs().mean() > 0.05 * full.abs().mean()


def count_calls(module, calls: list):
    return module.register_forward_pre_hook(lambda m, a: calls.append(1))


def generate(pipe, deepcache=None, interval=None, steps=6):
    """(pixels, deep calls, conv_in calls, Generations) for two images in one batch."""
    deep, shallow = [], []
    hooks = [count_calls(pipe.unet.mid_block, deep), count_calls(pipe.unet.conv_in, shallow)]
    try:
        settings = GenerationSettings(
            steps, 5.0, 64, 64, 2, guidance_interval=interval, deepcache=deepcache
        )
        out = [g for b in KeyframeGenerator(pipe, settings).run(demo_jobs(2)) for g in b]
    finally:
        for hook in hooks:
            hook.remove()
    assert all(g.error is None for g in out), [g.error for g in out]
    return [np.asarray(g.image, dtype=np.int16) for g in out], len(deep), len(shallow), out


@pytest.fixture(scope="module")
def made():
    pipe = euler_tiny_pipe()
    cases = {"plain": None, "interval 1": (1, 0), "interval 3": (3, 0)}
    made = {name: generate(pipe, deepcache) for name, deepcache in cases.items()}
    made["interval 3, guidance half"] = generate(pipe, (3, 0), interval=(0.0, 0.5))
    made["guidance half"] = generate(pipe, None, interval=(0.0, 0.5))
    return made


def test_interval_1_is_no_cache_exactly(made):
    for a, b in zip(made["interval 1"][0], made["plain"][0], strict=True):
        assert np.array_equal(a, b)
    assert made["interval 1"][1:3] == made["plain"][1:3] == (6, 6)
    assert [g.unet_shallow_evaluations for g in made["interval 1"][3]] == [0.0, 0.0]


def test_interval_3_runs_the_deep_blocks_every_third_step(made):
    pixels, deep, steps, out = made["interval 3"]
    assert (deep, steps) == (2, 6)  # full at steps 0 and 3; conv_in (the shallow path) at all
    # 2 full guided steps x 2 rows per image; 4 shallow ones
    assert [(g.unet_evaluations, g.unet_shallow_evaluations) for g in out] == [(4, 8)] * 2
    # an approximation: other pixels than the full UNet's, but the same picture broadly (on
    # random weights the gap says nothing about quality; a broken path gives noise: ~80)
    gap = [np.abs(a - b).mean() for a, b in zip(pixels, made["plain"][0], strict=True)]
    assert all(0 < g < 40 for g in gap), gap


def test_feature_reuse_under_a_guidance_interval_reuses_the_conditional_half(made):
    """After step 3 only the conditional row runs; the feature kept at step 3 has it."""
    _, deep, steps, out = made["interval 3, guidance half"]
    assert (deep, steps) == (2, 6)
    # steps 0-2 guided (2 rows), 3-5 conditional only (1 row); full at 0 and 3
    assert [(g.unet_evaluations, g.unet_shallow_evaluations) for g in out] == [(3, 6)] * 2


def test_a_branch_the_unet_does_not_have_is_refused():
    pipe = euler_tiny_pipe()  # three levels, as SDXL's: branches 0 and 1
    with pytest.raises(ValueError, match="branch 2: this UNet has branches 0..1"):
        with feature_reuse(pipe.unet, 4, 3, branch=2):
            pass
    assert "forward" not in pipe.unet.__dict__


def test_a_run_records_deepcache_and_the_guidance_interval_everywhere(cli_in_process, tmp_path):
    shots = tmp_path / "shots.json"  # two scenes are enough
    shots.write_text(
        json.dumps(
            [{"id": "a", "description": "a red door"}, {"id": "b", "description": "a calm sea"}]
        )
    )
    code, err, run_dir, store = cli_in_process(
        f"shotlist={shots}", "speed=deepcache", "guidance_interval=[0,0.5]", "steps=6"
    )
    assert code == 0, err[-2000:]
    manifest = read_manifest(run_dir)
    first = manifest["images"][0]
    assert first["deepcache"] == [3, 0] and first["guidance_interval"] == [0, 0.5]
    assert (first["unet_evaluations"], first["unet_shallow_evaluations"]) == (3, 6)
    summary = manifest["run"]["summary"]
    images = summary["images"]
    assert (summary["unet_evaluations_total"], summary["unet_shallow_evaluations_total"]) == (
        3 * images,
        6 * images,
    )
    # the work spent: 3 whole evaluations and 6 of the shallow branch, each counted on meta
    from keyframes.generation.feature_reuse import shallow_branch_flops
    from keyframes.pipeline.flops import image_flops

    pipe = euler_tiny_pipe()
    flops, _ = image_flops(pipe, 256, 144)
    shallow = shallow_branch_flops(pipe.unet, 256, 144, 0)
    assert 0 < shallow < flops.unet_per_sample_step / 2
    spent = flops.spent(3, 5.0) + 6 * shallow
    assert first["tflops"] == pytest.approx(spent / 1e12, rel=1e-3)
    assert first["tflops"] < flops.per_image(6, 5.0) / 1e12  # fewer than 12 whole ones
    assert summary["tflops_total"] == pytest.approx(images * first["tflops"], abs=1e-4)  # 4 places
    text = Image.open(run_dir / first["file"]).text["parameters"]
    assert "Guidance interval: 0-0.5, DeepCache: interval 3, branch 0" in text
    _, runs = mlflow_runs(store)
    metrics = runs[0].data.metrics  # the latest of each: the per-image ones are the last image's
    assert metrics["unet_shallow_evaluations"] == 6 and metrics["unet_evaluations"] == 3
    assert metrics["unet_shallow_evaluations_total"] == 6 * images
    assert metrics["unet_evaluations_per_image_mean"] == 3
    assert json.loads(runs[0].data.params["speed.deepcache_interval"]) == 3
