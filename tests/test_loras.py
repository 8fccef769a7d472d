"""LoRA adapters on the tiny model: real effects, recorded names, scales and hashes."""

import hashlib

import numpy as np
import pytest
import torch

from keyframes.conditioning.loras import check_loras, lora_records
from keyframes.config.schema import LoraConfig
from keyframes.errors import ConfigError
from keyframes.outputs.png import a1111_parameters
from tests.helpers import (
    assert_same_picture,
    demo_jobs,
    euler_tiny_pipe,
    image,
    image_record,
    with_loras,
)


def save_tiny_lora(folder, seed):
    """A LoRA for the tiny UNet's attention projections, random A and B (so it does something)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig as PeftLoraConfig
    from peft.utils import get_peft_model_state_dict

    from keyframes.pipeline.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline().unet
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(
        PeftLoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    name = f"tiny_lora_{seed}.safetensors"
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=name)
    return folder / name


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    files = [save_tiny_lora(folder, 1), save_tiny_lora(folder, 2)]
    pipe = euler_tiny_pipe()
    job = demo_jobs(1)[0]
    return pipe, files, job


def test_scale_0_is_no_lora_and_scale_1_changes_the_image(setup):
    pipe, files, job = setup
    plain = image(pipe, job)
    zero = with_loras(pipe, job, [LoraConfig(path=str(files[0]), scale=0.0)])
    one = with_loras(pipe, job, [LoraConfig(path=str(files[0]), scale=1.0)])
    assert_same_picture(zero, plain, "scale 0")  # peft's layers in the path: other kernels
    assert np.abs(one - plain).mean() > 0.5
    assert (image(pipe, job) == plain).all()  # removed: the cached pipeline is plain again


def test_two_loras_at_once_and_fused_equals_unfused(setup):
    pipe, files, job = setup
    loras = [LoraConfig(path=str(files[0]), scale=0.7), LoraConfig(path=str(files[1]), scale=0.5)]
    first_only = with_loras(pipe, job, loras[:1])
    both = with_loras(pipe, job, loras)
    assert np.abs(both - first_only).mean() > 0.1
    fused = with_loras(pipe, job, loras, fuse=True)
    assert_same_picture(fused, both, "fused")  # the same weights, summed once, not each step
    assert (image(pipe, job) == image(pipe, job)).all()


def test_records_and_png_metadata_carry_name_scale_and_hash(setup):
    _, files, _ = setup
    records = lora_records([LoraConfig(path=str(files[0]), scale=0.8)])
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()[:12]
    assert records == [
        {
            "name": "tiny_lora_1",
            "path": str(files[0]),
            "scale": 0.8,
            "sha256": digest,
            "format": "lora",
        }
    ]
    record = {
        "prompt": "a lighthouse",
        "negative_prompt": "",
        "steps": 4,
        "sampler_label": "Euler",
        "cfg_scale": 5.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "model": "tiny",
        "style": "none",
        "loras": records,
    }
    text = a1111_parameters(image_record(**record))
    assert text.splitlines()[0] == "a lighthouse <lora:tiny_lora_1:0.8>"
    assert f'Lora hashes: "tiny_lora_1: {digest}"' in text


def test_bad_lora_paths_fail_before_loading(tmp_path):
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"is a pickle \(.ckpt\), which can run code"):
        check_loras([LoraConfig(path=str(pickle))])
    with pytest.raises(ConfigError, match="no such file"):
        check_loras([LoraConfig(path=str(tmp_path / "missing.safetensors"))])
    with pytest.raises(ConfigError, match="share a name"):
        check_loras([LoraConfig(path="org/film"), LoraConfig(path="other/film")])
    check_loras([LoraConfig(path="org/film-lora")])  # a hub id: checked when it loads
