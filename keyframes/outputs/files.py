"""What a run folder holds, read with suspicion. A manifest is data from disk: a path it names
is used only when it stays inside the run folder, and a keyframe counts as made only when its
PNG is whole. Resume, the contact sheet and sync all ask here."""

from __future__ import annotations

import stat
from pathlib import Path

from PIL import Image, UnidentifiedImageError


def inside(run_dir: Path, name: str) -> Path | None:
    """run_dir/name when it stays inside run_dir once resolved (no '..', no absolute path, no
    symlink out); None otherwise."""
    if not isinstance(name, str) or not name or "\0" in name:
        return None
    root = run_dir.resolve()
    path = (root / name).resolve()
    return path if path != root and path.is_relative_to(root) else None


def regular_file(path: Path) -> bool:
    """A plain file (not a FIFO, a device or a folder); False where it cannot be seen."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def whole_png(path: Path) -> bool:
    """A regular file holding a complete PNG: every chunk present with a matching CRC (no
    decoding, so cheap). A truncated or overwritten keyframe is False."""
    if not regular_file(path):
        return False
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                return False
            image.verify()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
        return False
    return True


def keyframe_file(run_dir: Path, name: str) -> Path | None:
    """The whole PNG a manifest record names, inside run_dir; None otherwise."""
    path = inside(run_dir, name)
    return path if path is not None and whole_png(path) else None
