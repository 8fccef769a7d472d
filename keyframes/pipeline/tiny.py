"""The tiny random-weight SDXL used by `model=tiny` and the tests.

Same pipeline class and the same wiring as SDXL base (UNet with text_time conditioning, two
CLIP text encoders whose hidden states are concatenated, a VAE with 8x downsampling, the real
CLIP BPE tokenizer), only a few hundred times smaller, with weights drawn from a fixed seed.
Every config is the published one (keyframes/data/) with only the sizes changed (TINY_SIZES),
so behaviour that hangs on a config value (token ids, prediction type, scheduler) is the real
model's. Its images are noise-like: it tests the machinery, not the look.
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

# What the tiny models change in the published configs (keyframes/data/<model>/): sizes only.
# Everything else (token ids, activations, block types, prediction type, scheduler) is the
# published value, so behaviour that hangs on a config value shows up in the tests.
_TEXT = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
_VAE = {
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 128,
}
_UNET = {
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
    "addition_time_embed_dim": TIME_EMBED_DIM,
}
_SDXL_UNET = {
    "block_out_channels": [32, 64, 64],
    "attention_head_dim": [2, 4, 4],
    "cross_attention_dim": TEXT_WIDTH + TEXT_WIDTH_2,
    # the pooled text embedding of encoder 2 + 6 size and crop numbers
    "projection_class_embeddings_input_dim": TEXT_WIDTH_2 + 6 * TIME_EMBED_DIM,
}
_REFINER_UNET = {  # encoder 2 only; an aesthetic score instead of the target size: 5 numbers
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": [2, 4, 4, 4],
    "cross_attention_dim": TEXT_WIDTH_2,
    "projection_class_embeddings_input_dim": TEXT_WIDTH_2 + 5 * TIME_EMBED_DIM,
}
_SD15_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 2,
    "cross_attention_dim": TEXT_WIDTH,
}
_CLIP_L = _TEXT | {"hidden_size": TEXT_WIDTH, "projection_dim": TEXT_WIDTH}
TINY_SIZES = {
    "sdxl_base": {
        "unet": _UNET | _SDXL_UNET,
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "text_encoder_2": _TEXT | {"hidden_size": TEXT_WIDTH_2, "projection_dim": TEXT_WIDTH_2},
    },
    "sdxl_refiner": {"unet": _UNET | _REFINER_UNET},
    "sd15": {"unet": _UNET | _SD15_UNET, "vae": _VAE, "text_encoder": _CLIP_L},
}


def tiny_config(model: str, part: str) -> dict:
    """The published config of `part` of `model` (sdxl_base, sdxl_refiner, sd15), tiny sizes."""
    from keyframes.pipeline.architectures import published_configs

    sizes = TINY_SIZES[model].get(part, {})
    return published_configs(model)[part] | sizes


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


def _tiny_unet(model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(tiny_config(model, "unet")).eval()


def _tiny_vae(model: str):
    from diffusers import AutoencoderKL

    # eval mode, as from_pretrained gives it: the tiny folders must load as they were built
    return AutoencoderKL.from_config(tiny_config(model, "vae")).eval()


def _tiny_text_encoder(model: str, part: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    kind = CLIPTextModelWithProjection if part == "text_encoder_2" else CLIPTextModel
    return kind(CLIPTextConfig(**tiny_config(model, part))).eval()


def _scheduler(model: str):
    """The published scheduler, as the model's repo ships it (SDXL: Euler; SD 1.5: PNDM)."""
    import diffusers

    from keyframes.pipeline.architectures import published_configs

    config = published_configs(model)["scheduler"]
    return getattr(diffusers, config["_class_name"]).from_config(config)


def build_tiny_pipeline():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = _tiny_unet("sdxl_base")
        vae = _tiny_vae("sdxl_base")
        text_encoder = _tiny_text_encoder("sdxl_base", "text_encoder")
        text_encoder_2 = _tiny_text_encoder("sdxl_base", "text_encoder_2")
    return assemble_sdxl(unet, vae, text_encoder, text_encoder_2, _scheduler("sdxl_base"))


def build_tiny_refiner(base):
    """A tiny SDXL refiner for the tiny base: like stabilityai/stable-diffusion-xl-refiner-1.0,
    it shares the base's second text encoder and VAE, reads encoder 2 only, and its UNet is
    conditioned on an aesthetic score instead of the target size (5 numbers, not 6)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED + 1)
        unet = _tiny_unet("sdxl_refiner")
    return StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet.to(base.unet.device, base.unet.dtype),
        scheduler=_scheduler("sdxl_base"),  # the refiner repo ships the base's scheduler
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_tiny_sd15():
    """A tiny Stable Diffusion 1.5-shaped pipeline: one CLIP text encoder whose last layer the
    UNet reads, no size conditioning, the SD 1.x VAE scaling, no safety checker."""
    from diffusers import StableDiffusionPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = _tiny_unet("sd15")
        vae = _tiny_vae("sd15")
        text_encoder = _tiny_text_encoder("sd15", "text_encoder")
    tokenizer, _ = clip_tokenizers()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler("sd15"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_controlnet(unet):
    """A ControlNet copied from a tiny UNet. Its zero convolutions would make it do nothing:
    they get random weights, and the control image's encoder is made to follow the image
    rather than its biases."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ControlNetModel.from_unet(unet)
        for module in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            torch.nn.init.normal_(module.weight, std=0.3)
        for module in net.controlnet_cond_embedding.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight)
                torch.nn.init.zeros_(module.bias)
    return net


def build_tiny_model(name: str):
    """What tiny_models writes as the folder `name` (see tiny_models.TINY_MODELS)."""
    builders = {
        "sdxl": build_tiny_pipeline,
        "sd15": build_tiny_sd15,
        "sdxl-refiner": lambda: build_tiny_refiner(build_tiny_pipeline()),
        "controlnet-sdxl": lambda: tiny_controlnet(build_tiny_pipeline().unet),
        "controlnet-sd15": lambda: tiny_controlnet(build_tiny_sd15().unet),
    }
    return builders[name]()


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
