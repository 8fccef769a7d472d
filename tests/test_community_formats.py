"""The community-format writers name tensors as the published files do. The full-size SDXL is
built on the meta device (shapes only), so the real names and shapes are checked without any
weights; the round trips through diffusers' loaders are in tests/test_replicas.py."""

from types import SimpleNamespace

import pytest
import torch

from keyframes.pipeline.architectures import build_components
from keyframes.pipeline.kohya_layout import kohya_name
from keyframes.pipeline.sgm_layout import original_state_dict, unet_original_name


@pytest.fixture(scope="module")
def sdxl_original():
    unet, vae, text_encoder, text_encoder_2 = build_components("sdxl_base", "meta")
    pipe = SimpleNamespace(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2
    )
    return original_state_dict(pipe), unet.config


# Names and shapes of stabilityai/stable-diffusion-xl-base-1.0's sd_xl_base_1.0.safetensors
PUBLISHED = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.out_layers.3.weight": (320, 320, 3, 3),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
}


def test_the_full_size_sdxl_file_has_the_published_names_and_shapes(sdxl_original):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    state, _ = sdxl_original
    for name, shape in PUBLISHED.items():
        assert name in state and tuple(state[name].shape) == shape, name
    assert not any(
        k.startswith(
            (
                "model.diffusion_model.down_blocks",
                "first_stage_model.encoder.down_blocks",
                "conditioner.embedders.1.model.text_model",
            )
        )
        for k in state
    )
    # the tensors diffusers reads to tell a file's model apart say: SDXL base
    assert infer_diffusers_model_type(state) == "xl_base"
    assert not any(
        upsampler in state
        for upsampler in (
            "model.diffusion_model.output_blocks.8.2.conv.weight",  # the last level has none
            "first_stage_model.decoder.up.0.upsample.conv.weight",
            "first_stage_model.encoder.down.3.downsample.conv.weight",
        )
    )


def test_kohya_names_use_the_original_unet_numbering_and_full_text_model_names(sdxl_original):
    _, config = sdxl_original
    module = "down_blocks.2.attentions.1.transformer_blocks.3.attn1.to_q"
    assert unet_original_name(module, config) == "input_blocks.8.1.transformer_blocks.3.attn1.to_q"
    assert kohya_name("unet", "mid_block.attentions.0.proj_in", config) == (
        "lora_unet_middle_block_1_proj_in"
    )
    assert kohya_name("unet", "up_blocks.0.attentions.2.proj_out", config) == (
        "lora_unet_output_blocks_2_1_proj_out"
    )
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj", config) == (
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.5.mlp.fc1", config) == (
        "lora_te2_text_model_encoder_layers_5_mlp_fc1"
    )


def test_open_clip_attention_is_q_k_v_stacked_and_the_projection_transposed():
    from keyframes.pipeline.sgm_layout import _open_clip_state
    from keyframes.pipeline.tiny import build_tiny_pipeline

    encoder = build_tiny_pipeline().text_encoder_2
    state = _open_clip_state(encoder)
    attention = encoder.text_model.encoder.layers[1].self_attn
    fused = state["transformer.resblocks.1.attn.in_proj_weight"]
    width = attention.q_proj.weight.shape[0]
    for n, part in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert torch.equal(fused[n * width : (n + 1) * width], part.weight)
    hidden = torch.randn(3, width)
    projected = encoder.text_projection(hidden)
    assert torch.allclose(hidden @ state["text_projection"], projected, atol=1e-6)
