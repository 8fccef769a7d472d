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
    parsed = OverridesParser.create().parse_overrides(overrides)
    chosen = _chosen_options(parsed, conf_dir)
    problems = []
    for override in parsed:
        key = override.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or key in groups:
            continue  # Hydra checks its own settings; groups are checked when composed
        head, *rest = key.split(".")
        if head in chosen and rest:  # a group whose options have schemas of their own
            problem = _option_problem(head, chosen[head], rest)
        else:
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
        fields = _fields_of_any_option(node)
        if head not in fields:
            return _suggest(head, prefix, list(fields))
        return _unknown(rest, fields[head], f"{prefix}{head}.")
    origin = typing.get_origin(node)
    if origin is list:
        if not head.isdigit():
            return f"{prefix.rstrip('.')} is a list: index it with a number"
        return _unknown(rest, typing.get_args(node)[0], f"{prefix}{head}.")
    return None  # a dict or Any: free-form below here (e.g. sampler.options.*)


def _chosen_options(parsed: list, conf_dir: Path) -> dict[str, str]:
    """The option of each group with per-option schemas: typed on the command line, else the
    default in conf/config.yaml (a sweep over options is left to composition)."""
    import yaml

    from keyframes.config.schema import OPTION_SCHEMAS

    defaults = yaml.safe_load((conf_dir / "config.yaml").read_text()).get("defaults", [])
    chosen = {k: v for d in defaults if isinstance(d, dict) for k, v in d.items()}
    for override in parsed:
        if override.key_or_group in OPTION_SCHEMAS:  # swept: each job's check says which
            chosen[override.key_or_group] = (
                None if override.is_sweep_override() else override.value()
            )
    return {group: str(chosen[group]) for group in OPTION_SCHEMAS if chosen.get(group)}


def _option_problem(group: str, option: str, parts: list[str]) -> str | None:
    """Why `group.<parts>` is not a setting of the chosen option, naming the option that has
    it; a typo gets the closest setting of any option."""
    from keyframes.config.schema import OPTION_SCHEMAS, Config

    base = typing.get_type_hints(Config)[group]
    fields = typing.get_type_hints(OPTION_SCHEMAS[group].get(option, base))
    if parts[0] in fields:
        return _unknown(parts[1:], fields[parts[0]], f"{group}.{parts[0]}.")
    owners = [
        f"{group}={name}"
        for name, schema in OPTION_SCHEMAS[group].items()
        if parts[0] in typing.get_type_hints(schema)
    ]
    if owners:
        return (
            f"{group}={option} has no such setting ({', '.join(owners)} has it; "
            f"{group}={option} has: {', '.join(sorted(fields))})"
        )
    return _suggest(parts[0], f"{group}.", list(_fields_of_any_option(base)))


def _fields_of_any_option(node: type) -> dict[str, Any]:
    """A group's settings: those of its base schema and of every option's own schema (which
    option is chosen is known only once Hydra composes; it then refuses the others' keys)."""
    fields = {}
    for schema in (node, *node.__subclasses__()):
        fields |= typing.get_type_hints(schema)
    return fields


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
