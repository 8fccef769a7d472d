"""What lands on disk: PNGs carrying their recipe, manifest.json, contact_sheet.png.

Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from keyframes.conditioning.loras import prompt_tags

MANIFEST_VERSION = 1


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
    control = record.get("control")
    if control:
        settings.append(f"ControlNet: {control['type']} (weight {_number(control['scale'])})")
    upscale = record.get("upscale")
    if upscale and upscale["name"] == "refiner":  # A1111's own names for its refiner switch
        settings.append(
            f"Refiner: {upscale['model']}, Refiner switch at: {_number(upscale['high_noise_frac'])}"
        )
    elif upscale:
        settings.append(
            f"Hires upscale: {_number(upscale['factor'])}, Hires steps: {upscale['steps']}, "
            f"Denoising strength: {_number(upscale['strength'])}"
        )
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


def write_manifest(
    run_dir: Path, run: dict[str, Any], images: list[dict[str, Any]], name: str = "manifest.json"
) -> Path:
    """The whole manifest; its journal (see ManifestWriter) is then redundant and removed."""
    path = run_dir / name
    doc = {"version": MANIFEST_VERSION, "run": run, "images": images}
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    journal_of(path).unlink(missing_ok=True)
    return path


def journal_of(manifest: Path) -> Path:
    """manifest.json -> manifest.journal.jsonl: the image records written since the last
    full manifest, one JSON line each."""
    return manifest.with_suffix(".journal.jsonl")


class ManifestWriter:
    """Keeps a growing run's bookkeeping linear in its images. After each batch its records
    are appended to the journal; the manifest itself is rewritten (and the journal dropped)
    only when the run's image count has doubled since the last full write, and whenever the
    caller asks (start, end, any stop). A kill between two full writes loses nothing:
    load_manifest reads the journal too."""

    def __init__(self, path: Path):
        self.path = path
        self.full_at = 0  # images in the last full write

    def due(self, images: int) -> bool:
        return images >= 2 * max(self.full_at, 1)

    def full(self, run: dict[str, Any], images: list[dict[str, Any]]) -> None:
        write_manifest(self.path.parent, run, images, self.path.name)
        self.full_at = len(images)

    def append(self, records: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(journal_of(self.path), "a", encoding="utf-8") as f:
            f.write(lines)


def load_manifest(path: Path) -> dict[str, Any]:
    """A manifest with the records of its journal added (a record there replaces the one with
    the same file). A journal line cut off by a kill is skipped. Raises OSError or ValueError
    where there is no readable manifest."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    journal = journal_of(path)
    if not journal.is_file():
        return doc
    images = {r["file"]: r for r in doc["images"]}
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        images[record["file"]] = record
    return {**doc, "images": sorted(images.values(), key=lambda r: r["index"])}


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written temp file stays behind
        tmp.unlink(missing_ok=True)
        raise


SHEET_PAGE = 64  # keyframes per contact sheet page: at most 8 x 8, a picture a viewer opens


def sheet_name(page: int) -> str:
    """contact_sheet.png, then contact_sheet_002.png, ... for the pages of a long run."""
    return "contact_sheet.png" if page == 1 else f"contact_sheet_{page:03d}.png"


def contact_sheet(
    images: list[Image.Image], labels: list[str], title: str, thumb_width: int = 384
) -> Image.Image:
    """Keyframes in a labelled grid, in shotlist order, for a look at the whole film: 4
    columns, 8 from 17 images on. A label may have several lines (split on newlines)."""
    columns = min(4 if len(images) <= 16 else 8, max(1, len(images)))
    rows = math.ceil(len(images) / columns)
    aspect = images[0].height / images[0].width
    tw, th = thumb_width, max(1, round(thumb_width * aspect))
    line_h = 18
    pad, label_h, title_h = 8, 4 + line_h * max(label.count("\n") + 1 for label in labels), 34
    sheet = Image.new(
        "RGB",
        (columns * (tw + pad) + pad, title_h + rows * (th + label_h + pad) + pad),
        (24, 24, 24),
    )
    draw = ImageDraw.Draw(sheet)
    font = load_font(14)
    draw.text((pad, 8), title, fill=(240, 240, 240), font=load_font(18))
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + (i % columns) * (tw + pad)
        y = title_h + (i // columns) * (th + label_h + pad)
        if image.size != (tw, th):
            image = image.resize((tw, th), Image.Resampling.LANCZOS)
        sheet.paste(image.convert("RGB"), (x, y))
        for n, line in enumerate(label.split("\n")):
            draw.text(
                (x + 2, y + th + 3 + n * line_h),
                fit_text(draw, line, font, tw - 4),
                fill=(220, 220, 220),
                font=font,
            )
    return sheet


def save_contact_sheet(sheet: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))


def load_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text
