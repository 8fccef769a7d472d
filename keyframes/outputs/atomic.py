"""Files written whole or not at all: to a temporary name, then renamed over the old one."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """write(tmp) then rename tmp to path; a full disk or an interrupt leaves no temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
