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

from pydantic import ValidationError

from keyframes.config.inputs import json_problems, load_json, read_bounded
from keyframes.errors import ShotlistError
from keyframes.shotlist.schema import (
    MAX_SCENES,
    MAX_TEXT,
    ImagePaths,
    SceneModel,
    ShotlistModel,
    kind,
)
from keyframes.shotlist.schema import problems as schema_problems

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
# Bounds that turn a runaway upstream stage into a clear error rather than a hang (the
# others, on scenes and texts, are in shotlist.schema).
MAX_FILE_BYTES = 20_000_000
__all__ = ["MAX_SCENES", "MAX_TEXT", "Shotlist", "load_shotlist", "parse_shotlist"]


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
    """Validate decoded JSON (shotlist.schema's models). A bare list of scenes is accepted as
    well as the full object. Image paths resolve against base_dir (the shotlist's folder) and
    may not leave it unless allow_external_paths."""
    paths = ImagePaths((base_dir or Path.cwd()).resolve(), allow_external_paths)
    problems: list[str] = json_problems(data)  # repeated keys, runaway nesting
    if isinstance(data, list):
        data = {"scenes": data}
    if not isinstance(data, dict):
        raise ShotlistError(
            f"shotlist {path} is invalid:",
            [f"top level: expected an object with 'scenes' or a list of scenes, got {kind(data)}"],
        )
    if problems:  # deep or ambiguous data is not walked any further
        raise ShotlistError(f"shotlist {path} is invalid:", problems)
    default_title = Path(path).stem if path != "<data>" else "untitled"
    context = {"paths": paths, "characters": _sheet_names(data.get("characters"))}
    top, scene_list_ok = None, True
    try:
        top = ShotlistModel.model_validate({"title": default_title, **data}, context=context)
    except ValidationError as e:
        problems = schema_problems(e)
        # the scenes are still checked one by one when only the title or the sheet failed
        scene_list_ok = all(error["loc"][:1] != ("scenes",) for error in e.errors())
    scenes = _scenes(data["scenes"] if scene_list_ok else [], context, problems)
    if problems or top is None:
        raise ShotlistError(f"shotlist {path} is invalid:", problems)
    extra = dict(top.model_extra or {})
    unknown = sorted(extra) + [f"scenes[*].{k}" for scene in scenes for k in scene.extra]
    return Shotlist(
        title=top.title,
        scenes=tuple(scenes),
        characters=_characters(top.characters),
        path=path,
        sha256=sha256,
        extra=extra,
        unknown_fields=tuple(dict.fromkeys(unknown)),
        notes=tuple(id_notes([scene.id for scene in scenes])),
    )


def _sheet_names(raw: Any) -> list[str]:
    """The characters scenes may name: those with a valid description (a bad reference image
    is reported on the sheet, not again on every scene that names the character)."""
    names = []
    for name, value in raw.items() if isinstance(raw, dict) else ():
        text = value.get("description") if isinstance(value, dict) else value
        if isinstance(text, str) and text.strip() and len(text) <= MAX_TEXT:
            names.append(name)
    return names


def _characters(sheet: dict[str, dict[str, Any]]) -> dict[str, Character]:
    return {
        name: Character(
            name=name,
            description=fields["description"],
            reference=fields.get("reference"),
            extra={k: v for k, v in fields.items() if k not in ("description", "reference")},
        )
        for name, fields in sheet.items()
    }


def _scenes(raw: list, context: dict[str, Any], problems: list[str]) -> list[Scene]:
    """Each scene checked against the valid characters, then the ids for repeats (also where
    a scene has other problems)."""
    scenes = []
    for i, item in enumerate(raw):
        try:
            scene = SceneModel.model_validate(item, context=context)
        except ValidationError as e:
            problems += schema_problems(e, f"scenes[{i}]")
            continue
        fields = scene.model_dump(exclude={"characters"})
        scenes.append(
            Scene(
                **{k: v for k, v in fields.items() if k in SCENE_FIELDS},
                characters=tuple(scene.characters),
                extra=dict(scene.model_extra or {}),
            )
        )
    _check_unique_ids(raw, problems)
    return scenes


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
