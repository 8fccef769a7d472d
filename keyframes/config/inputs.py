"""Files a user hands over (a shotlist, a style file), read defensively: only regular files
(a FIFO would hang the run, /dev/zero never ends), never more than a size limit, and JSON
without duplicate keys (JSON keeps only the last one, so the first is silently lost) or
runaway nesting (which breaks whatever walks the data later)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from keyframes.errors import KeyframesError

MAX_DEPTH = 32  # levels of objects and lists; a shotlist needs about 5


def read_bounded(path: Path, limit: int, what: str, error: type[KeyframesError]) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; `error` (naming `what`)
    otherwise. The size is checked on what is read, not on what stat says."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe or a device)"
        raise error(f"{what} {path} is {kind}; give a file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is over {limit / 1e6:.0f} MB, the limit")
    return data


class _Duplicates(dict):
    """An object with keys given more than once (json keeps the last value of each)."""

    repeated: list[str]


def _keep_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    data = dict(pairs)
    if len(data) == len(pairs):
        return data
    seen, repeated = set(), []
    for key, _ in pairs:
        if key in seen and key not in repeated:
            repeated.append(key)
        seen.add(key)
    marked = _Duplicates(data)
    marked.repeated = repeated
    return marked


def load_json(text: str) -> Any:
    """json.loads that remembers duplicate keys for json_problems. Raises ValueError
    (JSONDecodeError) or RecursionError (nesting beyond Python's limit)."""
    return json.loads(text, object_pairs_hook=_keep_duplicates)


def json_problems(data: Any, limit: int = 20) -> list[str]:
    """Where decoded JSON (from load_json) repeats a key or nests deeper than MAX_DEPTH, each
    with its path (`scenes[2].seed`), at most `limit`. Iterative: deep data cannot overflow."""
    problems, stack = [], [(data, "", 0)]
    while stack and len(problems) < limit:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            problems.append(f"{path or 'top level'}: nested over {MAX_DEPTH} levels deep")
            continue
        if isinstance(value, dict):
            for key in getattr(value, "repeated", []):
                problems.append(
                    f"{path or 'top level'}: key {key!r} appears more than once "
                    "(JSON keeps only the last one)"
                )
            children = [(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            children = [(v, f"{path}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        stack += [(v, p, depth + 1) for v, p in reversed(children)]
    return problems
