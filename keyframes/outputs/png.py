"""PNG files that carry their recipe: AUTOMATIC1111's `parameters` text, which image browsers
read, and the full keyframes record (image, scene, run) as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from keyframes.conditioning.base import png_settings
from keyframes.conditioning.loras import prompt_tags
from keyframes.outputs.atomic import atomic_write
from keyframes.outputs.records import ImageRecord


def a1111_parameters(record: ImageRecord) -> str:
    """The `parameters` text that AUTOMATIC1111-compatible image browsers parse."""
    r = record
    settings = [
        f"Steps: {r.steps}",
        f"Sampler: {r.sampler_label}",
        f"CFG scale: {_number(r.cfg_scale)}",
        f"Seed: {r.seed}",
        f"Size: {r.width}x{r.height}",
        f"Model: {r.model}",
        f"Style: {r.style}",
    ]
    if r.guidance_interval:
        start, end = r.guidance_interval
        settings.append(f"Guidance interval: {_number(start)}-{_number(end)}")
    if r.prediction != "epsilon":  # the noise schedule a viewer must use to make it again
        settings.append(f"Prediction: {r.prediction}")
    if r.zero_snr:
        settings.append("Zero terminal SNR: True")
    if r.guidance_rescale:
        settings.append(f"CFG rescale: {_number(r.guidance_rescale)}")
    if r.deepcache:
        interval, branch = r.deepcache
        settings.append(f"DeepCache: interval {interval}, branch {branch}")
    if r.consistency != "none":
        reference = f" ({r.consistency_reference})" if r.consistency_reference else ""
        settings.append(f"Consistency: {r.consistency}{reference}")
    settings += png_settings(r.to_json())  # each conditioning method's own entries
    hashes = ", ".join(f"{x['name']}: {x['sha256']}" for x in r.loras if x.get("sha256"))
    if hashes:
        settings.append(f'Lora hashes: "{hashes}"')
    tags = prompt_tags(r.loras)
    lines = [f"{r.prompt} {tags}" if tags else r.prompt]
    if r.negative_prompt:
        lines.append(f"Negative prompt: {r.negative_prompt}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:g}"


def save_png(image: Image.Image, path: Path, record: ImageRecord, provenance: dict[str, Any]):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text("keyframes", json.dumps(provenance, ensure_ascii=False, sort_keys=True))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_metadata(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)
