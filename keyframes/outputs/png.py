"""PNG files that carry their recipe: AUTOMATIC1111's `parameters` text, which image browsers
read, and the full keyframes record (image, scene, run) as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from keyframes.conditioning.base import png_settings
from keyframes.conditioning.loras import prompt_tags
from keyframes.outputs.records import atomic_write


def a1111_parameters(record: dict[str, Any]) -> str:
    """The `parameters` text that AUTOMATIC1111-compatible image browsers parse."""
    settings = [
        f"Steps: {record['steps']}",
        f"Sampler: {record['sampler_label']}",
        f"CFG scale: {_number(record['cfg_scale'])}",
        f"Seed: {record['seed']}",
        f"Size: {record['width']}x{record['height']}",
        f"Model: {record['model']}",
        f"Style: {record['style']}",
    ]
    if record.get("consistency") not in (None, "none"):
        settings.append(f"Consistency: {record['consistency']} ({record['consistency_reference']})")
    settings += png_settings(record)  # each conditioning method's own entries
    loras = record.get("loras") or []
    hashes = ", ".join(f"{r['name']}: {r['sha256']}" for r in loras if r.get("sha256"))
    if hashes:
        settings.append(f'Lora hashes: "{hashes}"')
    tags = prompt_tags(loras)
    lines = [f"{record['prompt']} {tags}" if tags else record["prompt"]]
    if record["negative_prompt"]:
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:g}"


def save_png(image: Image.Image, path: Path, record: dict[str, Any], provenance: dict[str, Any]):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_text("keyframes", json.dumps(provenance, ensure_ascii=False, sort_keys=True))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_metadata(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        return dict(im.text)
