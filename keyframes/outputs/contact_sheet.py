"""The contact sheet: a run's keyframes in labelled grids, in shotlist order, in pages of
SHEET_PAGE, for a look at the whole film."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from keyframes.outputs.atomic import atomic_write
from keyframes.outputs.files import keyframe_file
from keyframes.outputs.records import ImageRecord

THUMB_WIDTH = 384  # contact sheet cell width


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


def fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…"
    return text


def write_contact_sheets(
    run_dir: Path, images: list[ImageRecord], title: str, width: int, height: int
) -> list[Path]:
    """The contact sheet in pages of SHEET_PAGE keyframes, one page in memory at a time, so a
    run of thousands makes pictures a viewer can open (and stays under Pillow's limits)."""
    pages = math.ceil(len(images) / SHEET_PAGE)
    written = []
    for page in range(1, pages + 1):
        records = images[(page - 1) * SHEET_PAGE : page * SHEET_PAGE]
        thumbs = [_thumbnail(run_dir, r, width, height) for r in records]
        heading = title if pages == 1 else f"{title} · page {page} of {pages}"
        sheet = contact_sheet(thumbs, [_label(r) for r in records], heading, thumbs[0].width)
        written.append(run_dir / sheet_name(page))
        save_contact_sheet(sheet, written[-1])
    for stale in run_dir.glob("contact_sheet_*.png"):  # pages of an earlier, longer make
        if stale not in written:
            stale.unlink()
    return written


def _thumbnail(run_dir: Path, record: ImageRecord, width: int, height: int) -> Image.Image:
    """The image scaled to the contact sheet's cell, or a dark cell saying why it is not
    there. A damaged file never stops the sheet (nor the run that draws it)."""
    w = min(THUMB_WIDTH, width)
    h = max(1, round(w * height / width))
    path = keyframe_file(run_dir, record.file) if record.ok else None
    try:
        if path is not None:
            with Image.open(path) as image:
                return image.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    except (OSError, ValueError):  # whole on disk, yet it does not decode
        pass
    why = "unreadable" if record.ok else "failed"
    cell = Image.new("RGB", (w, h), (60, 20, 20))
    ImageDraw.Draw(cell).text((8, 8), why, fill=(255, 180, 180), font=load_font(14))
    return cell


def _label(record: ImageRecord) -> str:
    """Two lines, so that a 256 px thumbnail shows all of it: the scene, then seed and score."""
    r = record
    label = f"{r.scene_index:02d} {r.scene_id} t{r.take}\nseed {r.seed}"
    if r.clip_score is not None:
        label += f" · CLIP {r.clip_score:.1f}"
    return label
