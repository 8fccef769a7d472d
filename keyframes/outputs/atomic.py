"""Files written whole or not at all: to a temporary name, then renamed over the old one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def temp_path(path: Path) -> Path:
    """Where atomic_write writes before the rename: a hidden name beside the file."""
    return path.with_name(f".{path.name}{TEMP_SUFFIX}")


def is_temporary(path: Path) -> bool:
    """A leftover of a write that a SIGKILL cut off: never a result, never an artifact."""
    return path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) then rename tmp to path; a full disk or an interrupt leaves no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
