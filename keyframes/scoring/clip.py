"""CLIP prompt adherence with open_clip: score = 100 * max(cos(image, text), 0).

The default, ViT-L-14 with OpenAI weights, is the model torchmetrics' CLIPScore uses, so
numbers are comparable with published CLIP scores. Weights load from safetensors only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from keyframes.config.schema import ScorerConfig
from keyframes.errors import ModelUnavailableError
from keyframes.scoring.aesthetic import load_aesthetic, missing_aesthetic

CONTEXT_LENGTH = 77
SAFETENSORS_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")


@dataclass(frozen=True)
class TextScore:
    score: float
    truncated: bool  # the text was longer than CLIP's 77 tokens and was cut


class ClipScorer:
    def __init__(
        self,
        model: torch.nn.Module,  # an open_clip CLIP
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        device: str,
        name: str,
        aesthetic: torch.nn.Module | None = None,
    ):
        self.model = model.eval().to(device)
        self.aesthetic_head = aesthetic.to(device) if aesthetic is not None else None
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        # unit image embeddings by picture content: a run's scores and its style consistency
        # (read back from the PNGs, which hold the same pixels) encode each keyframe once
        self._embedded: dict[str, torch.Tensor] = {}

    def truncated(self, text: str) -> bool:
        return len(self.tokenizer.encode(text)) + 2 > CONTEXT_LENGTH  # + start and end tokens

    @torch.inference_mode()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """Unit-length CLIP image embeddings, one row per image (float32, on the CPU)."""
        rgb = [im.convert("RGB") for im in images]
        keys = [hashlib.sha1(im.tobytes() + repr(im.size).encode()).hexdigest() for im in rgb]
        new = {key: im for key, im in zip(keys, rgb, strict=True) if key not in self._embedded}
        if new:
            pixels = torch.stack([self.preprocess(im) for im in new.values()]).to(self.device)
            features = self.model.encode_image(pixels).float()
            features = torch.nn.functional.normalize(features, dim=-1).cpu()
            self._embedded.update(zip(new, features, strict=True))
        return torch.stack([self._embedded[key] for key in keys])

    @torch.inference_mode()
    def score(self, images: list[Image.Image], *texts: list[str]) -> list[list[TextScore]]:
        """For each list of texts, image i scored against text i. The images are encoded once
        (the costly part: ViT-L/14 is about 80 GFLOP per image), the texts in one batch."""
        image_features = self.image_features(images).to(self.device)
        flat = [text for text_list in texts for text in text_list]
        text_features = torch.nn.functional.normalize(
            self.model.encode_text(self.tokenizer(flat).to(self.device)).float(), dim=-1
        ).reshape(len(texts), len(images), -1)
        cosines = (image_features * text_features).sum(-1).clamp(min=0) * 100
        return [
            [TextScore(float(c), self.truncated(t)) for c, t in zip(row, text_list, strict=True)]
            for row, text_list in zip(cosines, texts, strict=True)
        ]

    @torch.inference_mode()
    def aesthetic(self, images: list[Image.Image]) -> list[float] | None:
        """The LAION aesthetic score of each image (None without an aesthetic head): from the
        image embeddings scoring already made."""
        if self.aesthetic_head is None:
            return None
        features = self.image_features(images).to(self.device)
        return [float(v) for v in self.aesthetic_head(features).float().cpu()]


_cached: tuple[tuple, ClipScorer | None] | None = None


def cached_scorer(cfg: ScorerConfig, device: str) -> ClipScorer | None:
    """Load once per process; jobs of a sweep with the same scorer settings share it."""
    global _cached
    key = (cfg.name, cfg.model, cfg.pretrained, cfg.aesthetic, device)
    if _cached is None or _cached[0] != key:
        _cached = None  # drop the old one before loading the next
        _cached = (key, load_scorer(cfg, device))
    return _cached[1]


def load_scorer(cfg: ScorerConfig, device: str) -> ClipScorer | None:
    """None where scoring is off (scorer=none)."""
    if cfg.model is None:
        return None  # before importing open_clip: it pulls in torchvision
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT_LENGTH)
    if cfg.model == "tiny":
        model, preprocess = _tiny_clip()
        name = "tiny random-weight CLIP"
    else:
        path = _weights_file(cfg)
        pretrained = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or {}
        model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=path, force_quick_gelu=bool(pretrained.get("quick_gelu"))
        )
        name = f"{cfg.model}/{cfg.pretrained}"
    aesthetic = load_aesthetic(cfg.aesthetic, model.visual.output_dim)
    return ClipScorer(model, preprocess, tokenizer, device, name, aesthetic)


def missing_scorer(cfg: ScorerConfig) -> str | None:
    """Pre-flight: why the scorer's weights cannot be had (None: they can, or none are needed).
    Downloads them when they are not cached and the hub answers."""
    if cfg.model is None:
        return None
    problems = [missing_aesthetic(cfg.aesthetic)]
    if cfg.model != "tiny":
        try:
            _weights_file(cfg)
        except ModelUnavailableError as e:
            problems.insert(0, str(e))
    return "\n".join(p for p in problems if p) or None


def _weights_file(cfg: ScorerConfig) -> str:
    """The safetensors file of an open_clip pretrained tag, from the Hugging Face cache or hub."""
    import open_clip

    from keyframes.pipeline import hub

    if cfg.pretrained and os.path.isfile(cfg.pretrained):
        if not cfg.pretrained.endswith(".safetensors"):
            raise ModelUnavailableError(
                f"scorer.pretrained={cfg.pretrained}: only .safetensors weights are loaded"
            )
        return cfg.pretrained
    tag = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or {}
    repo = (tag.get("hf_hub") or "").strip("/")
    if not repo:
        raise ModelUnavailableError(
            f"scorer: open_clip knows no hub copy of {cfg.model}/{cfg.pretrained}; "
            "set scorer.pretrained to a local .safetensors file, or scorer=none."
        )
    for name in SAFETENSORS_NAMES:
        found = hub.fetch(repo, name)
        if found is not None:
            return str(found)
    raise ModelUnavailableError(
        f"CLIP scorer {cfg.model}/{cfg.pretrained} is not available.\n"
        f"  Looked for {repo} ({' or '.join(SAFETENSORS_NAMES)}) in {hub.where()}.\n"
        "  Download it on a machine with network: "
        f"uv run hf download {repo} {SAFETENSORS_NAMES[0]}\n"
        "  Or run without scoring: scorer=none (or scorer=tiny for a random-weight test scorer)."
    )


def _tiny_clip():
    """A CLIP with the real tokenizer and random weights from a fixed seed: for offline runs."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(
                layers=2, width=64, head_width=32, patch_size=16, image_size=64
            ),
            text_cfg=CLIPTextCfg(
                context_length=CONTEXT_LENGTH, vocab_size=49408, width=64, heads=2, layers=2
            ),
        )
    preprocess = open_clip.image_transform(64, is_train=False)
    return model, preprocess


def style_consistency(features: torch.Tensor, groups: list[str]) -> dict[str, float]:
    """Mean pairwise CLIP image-image cosine x 100 between images of different groups
    (scenes): `style_consistency`; and between images of the same group (takes of one scene):
    `style_consistency_takes`. A figure is left out where there is no such pair."""
    cosines = features @ features.T
    same = torch.tensor([[a == b for b in groups] for a in groups])
    upper = torch.ones_like(same).triu(diagonal=1)
    out = {}
    for name, mask in (
        ("style_consistency", upper & ~same),
        ("style_consistency_takes", upper & same),
    ):
        if mask.any():
            out[name] = float(cosines[mask].mean()) * 100
    return out
