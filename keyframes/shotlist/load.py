"""Load and validate a shotlist JSON file into frozen dataclasses.

Every problem is collected with its path (e.g. `scenes[3].id: missing`) and raised together
as one ShotlistError, so a user fixes the file in one pass.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyframes.config.inputs import json_problems, load_json, read_bounded
from keyframes.config.schema import MAX_SEED, MAX_TAKES
from keyframes.errors import ShotlistError

DEMO = Path(__file__).resolve().parent.parent / "data" / "demo_shotlist.json"

SCENE_TEXT_FIELDS = (
    "prompt",
    "negative_prompt",
    "shot",
    "camera",
    "lighting",
    "mood",
)
SCENE_FIELDS = {
    "id",
    "description",
    "characters",
    "seed",
    "takes",
    "reference",
    "control",
    *SCENE_TEXT_FIELDS,
}
TOP_FIELDS = {"title", "characters", "scenes"}
# Bounds that turn a runaway upstream stage into a clear error rather than a hang.
MAX_FILE_BYTES = 20_000_000
MAX_SCENES = 10_000
MAX_TEXT = 4_000  # characters in any one text field; CLIP reads about 300 anyway


@dataclass(frozen=True)
class Character:
    name: str
    description: str
    reference: str | None = None  # image path, resolved
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scene:
    id: str
    description: str
    prompt: str | None = None  # full override of the assembled scene prompt
    negative_prompt: str | None = None
    shot: str | None = None
    camera: str | None = None
    lighting: str | None = None
    mood: str | None = None
    characters: tuple[str, ...] = ()
    seed: int | None = None
    takes: int | None = None
    reference: str | None = None  # image path, resolved; for the consistency features
    control: dict[str, Any] | None = None  # {"type": ..., "image": resolved path}
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, kept as metadata


@dataclass(frozen=True)
class Shotlist:
    title: str
    scenes: tuple[Scene, ...]
    characters: dict[str, Character] = field(default_factory=dict)
    path: str = ""
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    unknown_fields: tuple[str, ...] = ()  # e.g. "scenes[*].music", for one warning
    notes: tuple[str, ...] = ()  # warnings: ids with invisible or look-alike characters


def resolve_path(name: str) -> Path:
    """'demo' is the bundled short film; anything else is a file path."""
    return DEMO if name == "demo" else Path(name).expanduser()


def load_shotlist(name: str, allow_external_paths: bool = False) -> Shotlist:
    path = resolve_path(name)
    raw = read_bounded(path, MAX_FILE_BYTES, "shotlist", ShotlistError)
    try:
        data = load_json(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ShotlistError(f"shotlist {path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ShotlistError(
            f"shotlist {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from None
    except RecursionError:
        raise ShotlistError(f"shotlist {path} is nested too deeply to be a shotlist") from None
    return parse_shotlist(
        data,
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        base_dir=path.parent,
        allow_external_paths=allow_external_paths,
    )


def parse_shotlist(
    data: Any,
    path: str = "<data>",
    sha256: str = "",
    base_dir: Path | None = None,
    allow_external_paths: bool = False,
) -> Shotlist:
    """Validate decoded JSON. A bare list of scenes is accepted as well as the full object.
    Image paths resolve against base_dir (the shotlist's folder) and may not leave it unless
    allow_external_paths."""
    paths = _PathRules(base_dir or Path.cwd(), allow_external_paths)
    problems: list[str] = json_problems(data)  # repeated keys, runaway nesting
    unknown: list[str] = []
    if isinstance(data, list):
        data = {"scenes": data}
    if not isinstance(data, dict):
        raise ShotlistError(
            f"shotlist {path} is invalid:",
            [f"top level: expected an object with 'scenes' or a list of scenes, got {_kind(data)}"],
        )
    if problems:  # deep or ambiguous data is not walked any further
        raise ShotlistError(f"shotlist {path} is invalid:", problems)

    title = data.get("title", Path(path).stem if path != "<data>" else "untitled")
    if not isinstance(title, str) or not title.strip():
        problems.append("title: must be a non-empty string")
        title = "untitled"
    elif len(title) > 200:
        problems.append(f"title: {len(title)} characters, the limit is 200")
    extra = {k: v for k, v in data.items() if k not in TOP_FIELDS}
    unknown += sorted(extra)

    characters = _parse_characters(data.get("characters", {}), problems, paths)
    scenes = _parse_scenes(data.get("scenes"), characters, problems, unknown, paths)
    if problems:
        raise ShotlistError(f"shotlist {path} is invalid:", problems)
    return Shotlist(
        title=title.strip(),
        scenes=tuple(scenes),
        characters=characters,
        path=path,
        sha256=sha256,
        extra=extra,
        unknown_fields=tuple(dict.fromkeys(unknown)),
        notes=tuple(id_notes([scene.id for scene in scenes])),
    )


def _parse_scenes(
    raw: Any,
    characters: dict[str, Character],
    problems: list[str],
    unknown: list[str],
    paths: _PathRules,
) -> list[Scene]:
    """The scene list, each scene checked, ids unique."""
    if raw is None:
        problems.append("scenes: missing")
    elif not isinstance(raw, list):
        problems.append(f"scenes: expected a list, got {_kind(raw)}")
    elif not raw:
        problems.append("scenes: empty, a shotlist needs at least one scene")
    elif len(raw) > MAX_SCENES:
        problems.append(f"scenes: {len(raw)} scenes, the limit is {MAX_SCENES}")
    else:
        scenes = [
            _parse_scene(item, f"scenes[{i}]", characters, problems, unknown, paths)
            for i, item in enumerate(raw)
        ]
        _check_unique_ids(raw, problems)  # also where a scene has other problems
        return [scene for scene in scenes if scene is not None]
    return []


def id_notes(ids: list[str], limit: int = 10) -> list[str]:
    """Scene ids a person would misread: with invisible characters (a zero-width space, a
    control character), or the same as another id once look-alikes are folded (full-width
    letters, ligatures, case). They still work; the warning says which is which."""
    notes, seen = [], {}
    for i, scene_id in enumerate(ids):
        hidden = [
            c
            for c in scene_id
            if unicodedata.category(c) in ("Cf", "Cc", "Co", "Cn") or (c.isspace() and c != " ")
        ]
        if hidden:
            codes = ", ".join(f"U+{ord(c):04X}" for c in dict.fromkeys(hidden))
            notes.append(f"scenes[{i}].id {scene_id!r} holds invisible characters ({codes})")
        plain = "".join(c for c in scene_id if c not in hidden)
        folded = unicodedata.normalize("NFKC", plain).casefold()
        if folded in seen:
            j = seen[folded]
            notes.append(f"scenes[{i}].id {scene_id!r} looks like scenes[{j}].id {ids[j]!r}")
        seen.setdefault(folded, i)
    return notes[:limit] + ([f"... and {len(notes) - limit} more"] if len(notes) > limit else [])


def _check_unique_ids(raw: list, problems: list[str]) -> None:
    first_index: dict[str, int] = {}
    for i, item in enumerate(raw):
        scene_id = item.get("id") if isinstance(item, dict) else None
        if isinstance(scene_id, bool) or not isinstance(scene_id, str | int):
            continue
        key = str(scene_id).strip()
        if key in first_index:
            problems.append(
                f"scenes[{i}].id: duplicate id {key!r} (first used by scenes[{first_index[key]}])"
            )
        else:
            first_index[key] = i


def _parse_characters(raw: Any, problems: list[str], paths: _PathRules) -> dict[str, Character]:
    """`name -> description`, or `name -> {"description": ..., "reference": image, ...}`."""
    if not isinstance(raw, dict):
        problems.append(f"characters: expected an object of name -> description, got {_kind(raw)}")
        return {}
    out = {}
    for name, value in raw.items():
        where = f"characters.{name}"
        extra: dict[str, Any] = {}
        reference = None
        if isinstance(value, dict):
            extra = {k: v for k, v in value.items() if k not in ("description", "reference")}
            reference = paths.image(value.get("reference"), f"{where}.reference", problems)
            value = value.get("description")
        if not isinstance(value, str) or not value.strip():
            problems.append(f"{where}: expected a non-empty description string")
            continue
        if len(value) > MAX_TEXT:
            problems.append(f"{where}: {len(value)} characters, the limit is {MAX_TEXT}")
            continue
        out[name] = Character(
            name=name, description=value.strip(), reference=reference, extra=extra
        )
    return out


class _PathRules:
    """Resolve image paths written in a shotlist, relative to its folder, inside it."""

    def __init__(self, base: Path, allow_external: bool):
        self.base = base.resolve()
        self.allow_external = allow_external

    def image(self, value: Any, where: str, problems: list[str]) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            problems.append(f"{where}: expected an image path, got {_kind(value)}")
            return None
        path = (self.base / Path(value).expanduser()).resolve()
        if not self.allow_external and not path.is_relative_to(self.base):
            problems.append(
                f"{where}: {value!r} is outside the shotlist's folder {self.base} "
                "(set allow_external_paths=true to allow it)"
            )
            return None
        if not path.is_file():
            problems.append(f"{where}: image not found: {path}")
            return None
        return str(path)


def _parse_scene(
    raw: Any,
    where: str,
    characters: dict[str, Character],
    problems: list[str],
    unknown: list[str],
    paths: _PathRules,
) -> Scene | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected an object, got {_kind(raw)}")
        return None
    start = len(problems)
    scene_id, description = raw.get("id"), raw.get("description")
    _check_id_and_description(scene_id, description, where, problems)
    texts = _scene_texts(raw, where, problems)
    names = _scene_characters(raw, where, characters, problems)
    reference = paths.image(raw.get("reference"), f"{where}.reference", problems)
    control = _scene_control(raw, where, paths, problems)
    seed = _int_field(raw, "seed", where, problems, low=0, high=MAX_SEED)
    takes = _int_field(raw, "takes", where, problems, low=1, high=MAX_TAKES)
    extra = {k: v for k, v in raw.items() if k not in SCENE_FIELDS}
    unknown += [f"scenes[*].{k}" for k in extra]
    if len(problems) > start:
        return None
    return Scene(
        id=str(scene_id).strip(),
        description=description.strip(),
        characters=tuple(names),
        seed=seed,
        takes=takes,
        reference=reference,
        control=control,
        extra=extra,
        **texts,
    )


def _check_id_and_description(
    scene_id: object, description: object, where: str, problems: list[str]
) -> None:
    if scene_id is None:
        problems.append(f"{where}.id: missing")
    elif isinstance(scene_id, bool) or not isinstance(scene_id, (str, int)):
        problems.append(f"{where}.id: expected a string, got {_kind(scene_id)}")
    elif not str(scene_id).strip():
        problems.append(f"{where}.id: must not be empty")
    elif isinstance(scene_id, str) and len(scene_id) > 200:
        problems.append(f"{where}.id: {len(scene_id)} characters, the limit is 200")
    if description is None:
        problems.append(f"{where}.description: missing")
    elif not isinstance(description, str) or not description.strip():
        problems.append(f"{where}.description: expected a non-empty string")
    elif len(description) > MAX_TEXT:
        problems.append(
            f"{where}.description: {len(description)} characters, the limit is {MAX_TEXT}"
        )


def _scene_texts(raw: dict, where: str, problems: list[str]) -> dict[str, str | None]:
    texts = {}
    for key in SCENE_TEXT_FIELDS:
        value = raw.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{where}.{key}: expected a string, got {_kind(value)}")
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            problems.append(f"{where}.{key}: {len(value)} characters, the limit is {MAX_TEXT}")
            value = None
        texts[key] = (value.strip() or None) if isinstance(value, str) else None
    return texts


def _scene_characters(raw: dict, where: str, characters: dict, problems: list[str]) -> list:
    names = raw.get("characters", [])
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list):
        problems.append(f"{where}.characters: expected a list of names, got {_kind(names)}")
        names = []
    for j, name in enumerate(names):
        if not isinstance(name, str):
            problems.append(f"{where}.characters[{j}]: expected a name, got {_kind(name)}")
        elif name not in characters:
            known = ", ".join(characters) or "none defined"
            problems.append(
                f"{where}.characters[{j}]: unknown character {name!r} (the sheet has: {known})"
            )
    return names


def _scene_control(raw: dict, where: str, paths: _PathRules, problems: list[str]):
    control = raw.get("control")
    if control is not None:
        if not isinstance(control, dict) or not isinstance(control.get("type"), str):
            problems.append(f'{where}.control: expected {{"type": ..., "image": path}}')
            control = None
        else:
            image = paths.image(control.get("image"), f"{where}.control.image", problems)
            control = {**control, "image": image}
    return control


def _int_field(raw: dict, key: str, where: str, problems: list[str], low: int, high: int | None):
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(f"{where}.{key}: expected an integer, got {_kind(value)}")
        return None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        problems.append(f"{where}.{key}: {value} is out of range, must be {bound}")
        return None
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"the number {value}"
    return names.get(type(value), type(value).__name__)
