"""What a run folder holds, read with suspicion. A manifest is data from disk: a path it names
is used only when it stays inside the run folder, and a keyframe counts as made only when its
PNG is whole. Resume, the contact sheet and sync all ask here."""

from __future__ import annotations

import os
import stat
import tempfile
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


SUBFOLDERS = ("keyframes",)  # what a run makes inside its folder


def run_folder_problem(path: Path) -> str | None:
    """Why a run could not write its folder at `path` (None: it can): a dangling link, a file
    in its place or in place of a folder it makes, a place that cannot be written. Checked
    before anything is written, so that the run stops with one message, not a traceback."""
    if path.is_symlink() and not path.exists():
        return f"{path} is a link to {os.readlink(path)}, which does not exist"
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = next(p for p in [path, *path.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be made below it"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"cannot write in {existing} ({e.strerror or e})"
    for name in SUBFOLDERS:
        inner = path / name
        if (inner.exists() or inner.is_symlink()) and not inner.is_dir():
            return f"{inner} is not a folder; the run writes its {name} in a folder of that name"
    return None


def remove_if_untouched(run_dir: Path, bookkeeping: set[str]) -> None:
    """Bad input leaves nothing behind: drop the run directory if it holds only bookkeeping
    (Hydra's .hydra/ and log, the resolved config), i.e. no image was made, and no other run
    holds it."""
    import shutil

    from keyframes.outputs.folder_lock import in_use

    if not run_dir.is_dir() or not set(os.listdir(run_dir)) <= bookkeeping or in_use(run_dir):
        return
    shutil.rmtree(run_dir)
