"""Command-line keys checked against the typed schema before Hydra composes anything.

Hydra's own hint for an unknown key is to add it with `+`; with `+stpes=4` the run would then
succeed, store `stpes` and leave `steps` alone. So every key a user types must exist in the
schema (keyframes/config/schema.py) or be a config group (a folder of conf/); an unknown one is one
error naming the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

from keyframes.errors import ConfigError


def check_override_keys(overrides: list[str], schema: type, conf_dir: Path) -> None:
    """Raise ConfigError listing every override whose key is not in the schema."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = {p.relative_to(conf_dir).as_posix() for p in conf_dir.rglob("*") if p.is_dir()}
    problems = []
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or key in groups:
            continue  # Hydra checks its own settings; groups are checked when composed
        problem = _unknown(key.split("."), schema, "")
        if problem:
            problems.append(f"{override.get_key_element()}: {problem}")
    if problems:
        raise ConfigError("unknown settings on the command line:", problems)


def _unknown(parts: list[str], node: Any, prefix: str) -> str | None:
    """Why the dotted key `parts` (below `prefix`) is not in the type `node`, or None."""
    node = _unwrap_optional(node)
    if not parts:
        return None
    head, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(node):
        fields = typing.get_type_hints(node)
        if head not in fields:
            return _suggest(head, prefix, list(fields))
        return _unknown(rest, fields[head], f"{prefix}{head}.")
    origin = typing.get_origin(node)
    if origin is list:
        if not head.isdigit():
            return f"{prefix.rstrip('.')} is a list: index it with a number"
        return _unknown(rest, typing.get_args(node)[0], f"{prefix}{head}.")
    return None  # a dict or Any: free-form below here (e.g. sampler.options.*)


def _suggest(name: str, prefix: str, known: list[str]) -> str:
    close = [k for k in known if k.startswith(name)] or difflib.get_close_matches(
        name, known, n=1, cutoff=0.6
    )
    if close:
        return f"no such setting (the closest known one is {prefix}{close[0]})"
    return f"no such setting (known here: {', '.join(prefix + k for k in sorted(known))})"


def _unwrap_optional(node: Any) -> Any:
    if typing.get_origin(node) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return node


def override_keys(overrides: list[str], sweeps_only: bool = True) -> list[str]:
    """The keys of the overrides that sweep (or of all of them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.get_key_element() for o in parsed if o.is_sweep_override() or not sweeps_only]
