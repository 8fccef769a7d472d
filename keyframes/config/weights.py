"""Weights files as they are on disk, judged without loading them: which format a file really
is (its first bytes, not its name), which tensors a safetensors file holds (its header), and
the one rule for pickles: they can run code when loaded, so every path that names weights
takes .safetensors, and pickles (.ckpt, .bin, .pt, .pth) only with model.allow_pickle=true."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from keyframes.errors import ConfigError

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
MAX_HEADER = 100_000_000  # safetensors' own limit on its JSON header
ALLOW = "model.allow_pickle=true"


def pickle_problem(path: Path, what: str, allow_pickle: bool) -> str | None:
    """Why `what` (a setting, e.g. `loras`) may not load the file at `path`; None if it may."""
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        return (
            f"{what}: {path} is a pickle ({path.suffix}), which can run code when loaded. "
            f"Use a .safetensors copy, or set {ALLOW} if you trust its source"
        )
    return None


def file_format(path: Path) -> str:
    """What the file is by its first bytes: safetensors, zip (PyTorch's pickle archive),
    pickle, or unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) >= 9:
        (size,) = struct.unpack("<Q", head[:8])
        if 2 <= size <= MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def safetensors_keys(path: Path, what: str) -> list[str]:
    """The tensor names of a safetensors file, from its header (no weights read). A
    ConfigError saying what the file is instead, for a pickle renamed .safetensors, a
    truncated download or anything else."""
    if not path.is_file():
        raise ConfigError(f"{what}: {path}: no such file")
    kind = file_format(path)
    if kind != "safetensors":
        hint = {
            "zip": " but a PyTorch pickle archive (.ckpt/.pt) with a .safetensors name",
            "pickle": " but a pickle with a .safetensors name",
        }.get(kind, " (its first bytes are not a safetensors header)")
        raise ConfigError(f"{what}: {path} is not a safetensors file{hint}")
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        if path.stat().st_size < 8 + size or not isinstance(header, dict):
            raise ValueError("its header is cut off or not a table of tensors")
    except (ValueError, struct.error) as e:
        raise ConfigError(f"{what}: {path} is a damaged safetensors file ({e})") from None
    return [k for k in header if k != "__metadata__"]
