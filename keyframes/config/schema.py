"""Typed settings. Types live here, values live in conf/*.yaml (Hydra composes them).

A default here is only ever a neutral one: unset (None), off (False) or empty, for a field
that an option of its group does not use, or for what a command line adds (a LoRA entry).
Every real setting (an id, a number, a mode) is written once, in its YAML file.

Every stage takes its own sub-config, never the whole tree. config.validate checks what a type
cannot express; config.plan turns the composed settings into the frozen plan a run follows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

DEVICES = ("auto", "cuda", "mps", "cpu")
MAX_PIXELS = 4096 * 4096  # far beyond SDXL's 1 MP training size; larger is a typo or an OOM
MAX_SIDE = 8192
MAX_TAKES = 1000
DTYPES = ("auto", "float16", "bfloat16", "float32")
SEED_MODES = ("derived", "fixed")
OBJECTIVES = ("clip_score_mean", "clip_score_per_second", "aesthetic_score_mean")
OFFLOADS = ("none", "model", "sequential")  # memory.offload
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ARCHITECTURES = ("sdxl_base",)
FAMILIES = ("auto", "sdxl", "sd15")
PREDICTIONS = ("auto", "epsilon", "v_prediction")
LONG_PROMPT_MODES = ("chunk", "truncate")
PROMPT_WEIGHTINGS = ("a1111", "none")
CONTROL_TYPES = ("canny", "depth")
MAX_SEED = 2**32 - 1  # seeds are 32-bit, as in other SD front ends
# The Hydra configs: inside the package where it is installed from a wheel (which ships conf/
# as keyframes/conf), else the checkout's conf/ beside the package.
_PACKAGE = Path(__file__).resolve().parent.parent
CONF_DIR = _PACKAGE / "conf" if (_PACKAGE / "conf").is_dir() else _PACKAGE.parent / "conf"


@dataclass
class ModelConfig:
    name: str = MISSING  # label used in tags, metadata and the A1111 "Model:" field
    id: str | None = None  # Hugging Face hub repo id
    path: str | None = None  # local diffusers folder or single .safetensors file; wins over id
    config: str | None = None  # single files: folder or hub id with configs (default: base repo)
    variant: str | None = None  # weight variant to prefer, e.g. fp16
    dtype: str = "auto"  # auto: bfloat16 on CUDA where supported, else float16; CPU float32
    family: str = "auto"  # sdxl | sd15 | auto: read from the weights (the pipeline class follows)
    architecture: str | None = None  # build this packaged architecture with random weights
    vae: str | None = None  # replacement VAE (hub id or folder), e.g. the fp16-fix SDXL VAE
    unet: str | None = None  # replacement UNet weights: .safetensors file or hub org/repo/file
    timestep_spacing: str | None = None  # scheduler override the weights need, e.g. trailing
    # auto: what the weights say (a single file's v_pred marker, a folder's scheduler config)
    prediction: str = "auto"  # auto | epsilon | v_prediction
    zero_snr: bool | None = None  # zero terminal SNR; None: the weights' ztsnr marker or config
    # What a distilled model was made for; other values get a warning and these are used:
    steps_range: list[int] | None = None  # [min, max] steps
    cfg_scale: float | None = None  # guidance the model was distilled for (0: none)
    base_size: int | None = None  # training resolution (the aspect buckets scale to it)
    sampler: str | None = None  # the sampler it is made for (another one gets a warning)
    allow_pickle: bool = False  # load .ckpt/.bin/.pt (pickle: can run code) - only if trusted


@dataclass
class StyleConfig:
    name: str = MISSING
    prompt: str = MISSING  # template; {prompt} is replaced by the scene prompt
    negative_prompt: str = ""
    file: str | None = None  # style=file: read the preset `name` from this .json/.csv file


@dataclass
class NegativeConfig:
    name: str = MISSING
    prompt: str = ""  # comma-separated terms added to every negative prompt


@dataclass
class SamplerConfig:
    name: str = MISSING
    label: str = MISSING  # the name AUTOMATIC1111-style metadata readers know
    scheduler: str = MISSING  # diffusers scheduler class name
    options: dict[str, Any] = field(default_factory=dict)  # passed to from_config


@dataclass
class QualityConfig:
    name: str = MISSING
    steps: int = MISSING
    cfg_scale: float = MISSING
    base_size: int = MISSING  # side of the square the resolution buckets are scaled to


@dataclass
class ScorerConfig:
    name: str = MISSING
    model: str | None = None  # open_clip architecture, "tiny", or null for no scoring
    pretrained: str | None = None  # open_clip pretrained tag, e.g. openai
    aesthetic: str | None = None  # LAION aesthetic head: owner/repo/file, a local file, tiny


@dataclass
class LoraConfig:
    path: str = MISSING  # a .safetensors file, a folder holding one, or a hub id
    scale: float = 1.0
    name: str | None = None  # default: the file's stem or the repo's name
    weight_name: str | None = None  # the file inside a folder or hub repo, if it has several


@dataclass
class EmbeddingConfig:
    path: str = MISSING  # a textual-inversion .safetensors file (SDXL: clip_l + clip_g tensors)
    token: str | None = None  # the word prompts use for it; default: the file's stem, as in A1111


@dataclass
class ControlNetConfig:
    name: str = MISSING  # none | canny_sdxl | depth_sdxl | canny_sd15 | depth_sd15
    type: str | None = None  # the scene control type it follows: canny | depth
    family: str | None = None  # the model family it was trained with: sdxl | sd15
    id: str | None = None  # hub repo of the ControlNet
    path: str | None = None  # local diffusers ControlNet folder; wins over id
    conditioning_scale: float | None = None  # how strongly the control steers (0: not at all)
    canny_low: int | None = None  # canny: thresholds (OpenCV), as the ControlNets were trained
    canny_high: int | None = None


@dataclass
class UpscaleConfig:
    """upscale=none; each option's own settings are in its subclass (the group's schemas)."""

    name: str = MISSING  # none | hires | refiner


@dataclass
class HiresConfig(UpscaleConfig):
    factor: float = MISSING  # output size / generated size
    strength: float = MISSING  # how much of the upscaled image img2img redraws
    steps: int | None = None  # img2img steps (null: the run's steps)


@dataclass
class RefinerConfig(UpscaleConfig):
    high_noise_frac: float = MISSING  # share of the steps the base model runs
    id: str | None = None  # hub repo of the SDXL refiner
    path: str | None = None  # local diffusers folder; wins over id
    variant: str | None = None  # weight variant to prefer, e.g. fp16


@dataclass
class ConsistencyConfig:
    """consistency=none and style_aligned; ip_adapter's own settings are in IPAdapterConfig,
    and a method from outside keyframes brings its own subclass (conditioning.base.register)."""

    name: str = MISSING  # none | style_aligned | ip_adapter | character_ref | story
    reference: str | None = None  # style_aligned: scene id of the reference; null: the first


@dataclass
class IPAdapterConfig(ConsistencyConfig):
    image: str | None = None  # the run's reference image; null: the first keyframe
    ip_adapter_id: str | None = None  # hub repo of the adapter weights
    ip_adapter_path: str | None = None  # a local copy of the repo; wins over the id
    ip_adapter_subfolder: str = MISSING
    ip_adapter_weight: str = MISSING
    ip_adapter_scale: float = MISSING  # how strongly the reference image steers
    style_only: bool = False  # InstantStyle: only the style block reads the image


@dataclass
class CharacterRefConfig(IPAdapterConfig):
    portrait: str = MISSING  # the reference portrait's prompt; {name} and {description} filled


@dataclass
class StoryConfig(ConsistencyConfig):
    share: float = MISSING  # the share of an anchor's tokens the others attend to
    anchors: int = MISSING  # per character, made together before the other scenes
    layers: list[str] = field(default_factory=list)  # self-attention layers sharing, by prefix
    steps: list[int | None] = field(default_factory=list)  # [first, end) step that shares
    keep: str = "device"  # where the kept tokens wait: device (fast) | cpu (copied per use)


# Config groups whose options have schemas of their own: group -> {option: schema}. A method
# from outside keyframes adds its own when it registers (conditioning.base.register).
OPTION_SCHEMAS = {
    "upscale": {"hires": HiresConfig, "refiner": RefinerConfig, "tiny_refiner": RefinerConfig},
    "consistency": {
        "ip_adapter": IPAdapterConfig,
        "character_ref": CharacterRefConfig,
        "story": StoryConfig,
    },
}


@dataclass
class MemoryConfig:
    """A memory mode is what it trades for VRAM, as data (conf/memory/); auto picks a mode."""

    name: str = MISSING  # auto | none | balanced | low_vram | minimal (pipeline/memory.py)
    offload: str = "none"  # none | model: one component on the GPU at a time | sequential
    vae_slicing: bool = False  # decode one image of a batch at a time
    vae_tiling: bool = False  # decode in overlapping tiles
    attention_slicing: bool = False  # attention in slices


@functools.cache
def memory_mode(name: str) -> MemoryConfig:
    """A memory mode's settings as conf/memory/<name>.yaml holds them (memory=auto's picks)."""
    from omegaconf import OmegaConf

    node = OmegaConf.merge(
        OmegaConf.structured(MemoryConfig), OmegaConf.load(CONF_DIR / "memory" / f"{name}.yaml")
    )
    return OmegaConf.to_object(node)


def memory_settings(mode: str | MemoryConfig) -> MemoryConfig:
    """A memory mode's settings: as given, or read by its name (memory_mode)."""
    return memory_mode(mode) if isinstance(mode, str) else mode


@dataclass
class SpeedConfig:
    name: str = MISSING
    compile: bool = False  # torch.compile the UNet (its repeated blocks) and the VAE decoder
    compile_mode: str | None = None  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    channels_last: bool = False  # NHWC memory layout for the convolutions
    fuse_qkv: bool = False  # one projection for query, key and value
    tf32: bool = False  # TF32 tensor cores for float32 matmuls and convolutions (CUDA)
    warm_up: bool = False  # a throwaway generation per batch shape (always on with compile)
    # DeepCache: the whole UNet every N-th step, only its shallow branch in between (1: off)
    deepcache_interval: int = 1
    deepcache_branch: int = 0  # which down/up level the shallow branch reaches: 0 = shallowest

    @property
    def deepcache(self) -> tuple[int, int] | None:
        """(interval, branch) where feature reuse is on."""
        if self.deepcache_interval <= 1:
            return None
        return self.deepcache_interval, self.deepcache_branch


@dataclass
class FreeUConfig:
    """FreeU (Si et al., CVPR 2024): the UNet decoder's backbone features scaled up (b1, b2),
    its skip features' low frequencies down (s1, s2). Defaults: diffusers' SDXL values."""

    enabled: bool = MISSING
    s1: float = MISSING
    s2: float = MISSING
    b1: float = MISSING
    b2: float = MISSING

    @property
    def on(self) -> bool:
        return self.enabled


@dataclass
class PagConfig:
    """Perturbed-attention guidance (Ahn et al., ECCV 2024): a third UNet row per step whose
    self-attention in `layers` is the identity, guided away from."""

    scale: float = MISSING  # 0: off
    adaptive_scale: float = MISSING  # 0: the same scale at every step
    layers: list[str] = MISSING  # diffusers' pag_applied_layers: mid, down.block_1, up...

    @property
    def on(self) -> bool:
        return self.scale > 0


@dataclass
class TrackingConfig:
    tracking_uri: str = MISSING  # sqlite file (no server) or http(s) server
    experiment_name: str | None = None  # null: derived from the shotlist title
    artifact_root: str | None = None  # null: beside a local store, or the server's default


@dataclass
class Config:
    shotlist: str = MISSING  # path to a shotlist JSON file, or "demo" for the bundled film
    steps: int = MISSING
    cfg_scale: float = MISSING
    seed: int = MISSING
    seed_mode: str = MISSING  # derived: per scene from seed + scene id; fixed: same seed for all
    takes: int = MISSING  # images per scene (a scene's own "takes" wins)
    max_images: int = MISSING  # a run making more images than this stops before it starts
    batch_size: int = MISSING  # images per pipeline call, across scenes and takes
    objective: str = MISSING  # the value a run returns to a sweeper (Optuna maximises it)
    long_prompts: str = MISSING  # over 77 CLIP tokens: chunk (encode it all) | truncate
    prompt_weighting: str = MISSING  # a1111: (words:1.3), ((words)), [words], BREAK | none
    guidance_interval: list[float] | None = None  # guided share of the schedule [start, end]
    guidance_rescale: float | None = None  # 0-1; None: 0.7 for zero-terminal-SNR models, else 0
    resume: bool = MISSING  # continue the newest unfinished run with the same settings
    remake: bool = MISSING  # a run folder made with other settings is made again, not refused
    allow_external_paths: bool = MISSING  # shotlist image paths may point outside its folder
    device: str = MISSING
    aspect: str = MISSING  # W:H, mapped to an SDXL training resolution
    width: int | None = None  # explicit size wins over aspect
    height: int | None = None
    loras: list[LoraConfig] = field(default_factory=list)  # LoRA adapters, all applied at once
    fuse_loras: bool = False  # fold the LoRAs into the weights: faster steps, slower to swap
    embeddings: list[EmbeddingConfig] = field(default_factory=list)  # textual inversions
    model: ModelConfig = field(default_factory=ModelConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    negative: NegativeConfig = field(default_factory=NegativeConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    upscale: UpscaleConfig = field(default_factory=UpscaleConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    mlflow: TrackingConfig = field(default_factory=TrackingConfig)
    freeu: FreeUConfig = field(default_factory=FreeUConfig)
    pag: PagConfig = field(default_factory=PagConfig)
