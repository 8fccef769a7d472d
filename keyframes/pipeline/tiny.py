"""The tiny random-weight SDXL used by `model=tiny` and the tests.

Same pipeline class and the same wiring as SDXL base (UNet with text_time conditioning, two
CLIP text encoders whose hidden states are concatenated, a VAE with 8x downsampling, the real
CLIP BPE tokenizer), only a few thousand times smaller, with weights drawn from a fixed seed.
Its images are noise-like: it tests the machinery, not the look.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

INIT_SEED = 0
# Hidden sizes of the two text encoders (SDXL: CLIP ViT-L 768 and OpenCLIP bigG 1280). They
# differ, as in SDXL, so that a swapped encoder, a clip_l/clip_g mix-up in an embedding or a
# wrong single-file mapping fails on shapes instead of passing unnoticed.
TEXT_WIDTH = 32
TEXT_WIDTH_2 = 48
TIME_EMBED_DIM = 8


def clip_tokenizer_files(folder: Path) -> Path:
    """Write vocab.json + merges.txt of the real CLIP BPE, read from the file open_clip ships.
    open_clip itself is not imported: it pulls in torchvision, which a bare GPU box may lack."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip (open-clip-torch) ships the CLIP vocabulary")
    bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    # Same slice as CLIP's own tokenizer: skip the version line, keep 48 894 merges.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = _byte_characters()
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    return folder


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes, in CLIP's vocabulary order:
    printable Latin-1 bytes map to themselves, the others to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = (b for b in range(256) if b not in printable)
    return [chr(b) for b in printable] + [chr(256 + n) for n, _ in enumerate(extra)]


def clip_tokenizers():
    """The two SDXL tokenizers: identical BPE, padded with <|endoftext|> and "!" like SDXL's."""
    from transformers import CLIPTokenizer

    folder = _tokenizer_folder()
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="!")
    return tokenizer, tokenizer_2


@functools.cache
def _tokenizer_folder() -> Path:
    """The BPE files, written once per process: a process (the tests, a sweep) may build the
    tiny pipeline many times, and writing them is most of its 0.6 s. New tokenizers are made
    from them each time, since embeddings add tokens to a pipeline's own."""
    folder = Path(tempfile.mkdtemp(prefix="keyframes-clip-bpe-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return clip_tokenizer_files(folder)


def _tiny_unet(**conditioning):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        norm_num_groups=8,
        **conditioning,
    ).eval()


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),  # four blocks: 8x downsampling, as in SDXL
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=scaling_factor,
    )


def _tiny_text_config(width: int = TEXT_WIDTH):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _tiny_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_pipeline():
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = _tiny_unet(
            cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            # pooled text embedding of encoder 2 + 6 size/crop conditioning numbers
            projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 6 * TIME_EMBED_DIM,
        )
        vae = _tiny_vae(scaling_factor=0.13025)
        text_encoder = CLIPTextModel(_tiny_text_config())
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(TEXT_WIDTH_2))
    # the VAE stays in train mode, as it always was here (no dropout; its decode path differs)
    return assemble_sdxl(unet, vae, text_encoder.eval(), text_encoder_2.eval(), _tiny_scheduler())


def build_tiny_refiner(base):
    """A tiny SDXL refiner for the tiny base: like stabilityai/stable-diffusion-xl-refiner-1.0,
    it shares the base's second text encoder and VAE, reads encoder 2 only, and its UNet is
    conditioned on an aesthetic score instead of the target size (5 numbers, not 6)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED + 1)
        unet = _tiny_unet(
            cross_attention_dim=TEXT_WIDTH_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 5 * TIME_EMBED_DIM,
        )
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet.to(base.unet.device, base.unet.dtype),
        scheduler=_tiny_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_tiny_sd15():
    """A tiny Stable Diffusion 1.5-shaped pipeline: one CLIP text encoder whose last layer the
    UNet reads, no size conditioning, the SD 1.x VAE scaling, no safety checker."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = _tiny_unet(cross_attention_dim=TEXT_WIDTH)
        vae = _tiny_vae(scaling_factor=0.18215)
        text_encoder = CLIPTextModel(_tiny_text_config()).eval()
    tokenizer, _ = clip_tokenizers()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_tiny_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def assemble_sdxl(unet, vae, text_encoder, text_encoder_2, scheduler):
    """An SDXL pipeline of these components, with the real CLIP tokenizers."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizers()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
