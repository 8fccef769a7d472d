"""The shotlist format as pydantic models: types, bounds, required fields and the fields kept as
metadata are declared here, and pydantic collects every problem with its place. `problems()`
turns its errors into keyframes' one-line messages ("scenes[2].seed: -5 is out of range, must
be between 0 and 4294967295"). Checks that need more than one value (an image inside the
shotlist's folder, a character on the sheet) read the validation context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from keyframes.config.schema import MAX_SEED, MAX_TAKES

MAX_SCENES = 10_000
MAX_TEXT = 4_000  # characters in any one text field; CLIP reads about 300 anyway
MAX_TITLE = 200


def kind(value: Any) -> str:
    """How a message names a JSON value of the wrong type."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"the number {value}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"the number {value}"
    return names.get(type(value), type(value).__name__)


def problem(message: str, below: str = "") -> PydanticCustomError:
    """A keyframes message for pydantic to place (below: a sub-field of that place)."""
    return PydanticCustomError("keyframes", "{message}", {"message": message, "below": below})


@dataclass(frozen=True)
class ImagePaths:
    """Image paths written in a shotlist resolve against its folder and stay inside it."""

    base: Path
    allow_external: bool = False

    def resolve(self, value: Any) -> str | None:
        """The image's absolute path; raises a problem naming what is wrong with it."""
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip() or "\0" in value:
            raise problem(f"expected an image path, got {kind(value)}")
        path = (self.base / Path(value).expanduser()).resolve()
        if not self.allow_external and not path.is_relative_to(self.base):
            raise problem(
                f"{value!r} is outside the shotlist's folder {self.base} "
                "(set allow_external_paths=true to allow it)"
            )
        try:
            found = path.is_file()
        except OSError as e:  # a name too long for the file system, say
            raise problem(f"{e.strerror.lower()}: {value[:60]!r}...") from None
        if not found:
            raise problem(f"image not found: {path}")
        return str(path)


def _paths(info: ValidationInfo) -> ImagePaths:
    return (info.context or {}).get("paths") or ImagePaths(Path.cwd().resolve())


def _image(value: Any, info: ValidationInfo) -> str | None:
    return _paths(info).resolve(value)


def _scene_id(value: Any) -> str:
    if value is None:
        raise problem("missing")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise problem(f"expected a string, got {kind(value)}")
    if not str(value).strip():
        raise problem("must not be empty")
    if isinstance(value, str) and len(value) > MAX_TITLE:
        raise problem(f"{len(value)} characters, the limit is {MAX_TITLE}")
    return str(value).strip()


def _description(value: Any) -> str:
    if value is None:
        raise problem("missing")
    if not isinstance(value, str) or not value.strip():
        raise problem("expected a non-empty string")
    if len(value) > MAX_TEXT:
        raise problem(f"{len(value)} characters, the limit is {MAX_TEXT}")
    return value.strip()


def _bounded(low: int, high: int):
    def check(value: Any) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise problem(f"expected an integer, got {kind(value)}")
        if not low <= value <= high:
            raise problem(f"{value} is out of range, must be between {low} and {high}")
        return value

    return BeforeValidator(check)


def _names(value: Any) -> list:
    """A scene's characters: a list of names (one name alone is a list of one)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise problem(f"expected a list of names, got {kind(value)}")
    return value


def _name_on_sheet(value: Any, info: ValidationInfo) -> str:
    if not isinstance(value, str):
        raise problem(f"expected a name, got {kind(value)}")
    sheet = (info.context or {}).get("characters", {})
    if value not in sheet:
        known = ", ".join(sheet) or "none defined"
        raise problem(f"unknown character {value!r} (the sheet has: {known})")
    return value


def _control(value: Any, info: ValidationInfo) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise problem('expected {"type": ..., "image": path}')
    try:
        return {**value, "image": _paths(info).resolve(value.get("image"))}
    except PydanticCustomError as e:
        raise problem(e.context["message"], ".image") from None


def _text_or_none(value: str | None) -> str | None:
    return (value.strip() or None) if value is not None else None


SceneText = Annotated[
    Annotated[StrictStr, StringConstraints(max_length=MAX_TEXT)] | None,
    AfterValidator(_text_or_none),
]


class SceneModel(BaseModel):
    """One scene; fields the format does not know are kept (model_extra) as metadata."""

    model_config = ConfigDict(extra="allow", strict=True)

    id: Annotated[str, BeforeValidator(_scene_id)]
    description: Annotated[str, BeforeValidator(_description)]
    prompt: SceneText = None
    negative_prompt: SceneText = None
    shot: SceneText = None
    camera: SceneText = None
    lighting: SceneText = None
    mood: SceneText = None
    characters: Annotated[
        list[Annotated[str, BeforeValidator(_name_on_sheet)]], BeforeValidator(_names)
    ] = []
    reference: Annotated[str | None, BeforeValidator(_image)] = None
    control: Annotated[dict[str, Any] | None, BeforeValidator(_control)] = None
    seed: Annotated[int | None, _bounded(0, MAX_SEED)] = None
    takes: Annotated[int | None, _bounded(1, MAX_TAKES)] = None


def _character(value: Any, info: ValidationInfo) -> dict[str, Any]:
    """`description` or {"description": ..., "reference": image, ...}, as a dict."""
    fields = dict(value) if isinstance(value, dict) else {"description": value}
    if isinstance(value, dict):
        try:
            fields["reference"] = _paths(info).resolve(value.get("reference"))
        except PydanticCustomError as e:
            raise problem(e.context["message"], ".reference") from None
    text = fields.get("description")
    if not isinstance(text, str) or not text.strip():
        raise problem("expected a non-empty description string")
    if len(text) > MAX_TEXT:
        raise problem(f"{len(text)} characters, the limit is {MAX_TEXT}")
    return {**fields, "description": text.strip()}


def _sheet(value: Any) -> dict:
    if not isinstance(value, dict):
        raise problem(f"expected an object of name -> description, got {kind(value)}")
    return value


def _title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise problem("must be a non-empty string")
    if len(value) > MAX_TITLE:
        raise problem(f"{len(value)} characters, the limit is {MAX_TITLE}")
    return value.strip()


def _scene_list(value: Any) -> list:
    if value is None:
        raise problem("missing")
    if not isinstance(value, list):
        raise problem(f"expected a list, got {kind(value)}")
    if not value:
        raise problem("empty, a shotlist needs at least one scene")
    if len(value) > MAX_SCENES:
        raise problem(f"{len(value)} scenes, the limit is {MAX_SCENES}")
    return value


class ShotlistModel(BaseModel):
    """The top level. The scenes are checked one by one (SceneModel) against the names of
    the sheet's valid characters."""

    model_config = ConfigDict(extra="allow", strict=True)

    title: Annotated[str, BeforeValidator(_title)] = "untitled"
    characters: Annotated[
        dict[str, Annotated[dict[str, Any], BeforeValidator(_character)]],
        BeforeValidator(_sheet),
    ] = {}
    scenes: Annotated[list[Any], BeforeValidator(_scene_list)] = Field(
        default=None, validate_default=True
    )


def problems(error: ValidationError, where: str = "") -> list[str]:
    """pydantic's errors as keyframes' messages: `place: what is wrong`."""
    found = []
    for e in error.errors(include_url=False):
        place = where + "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in e["loc"]
        )
        place = place.lstrip(".")
        context = e.get("ctx") or {}
        found.append(f"{place}{context.get('below', '')}: {_phrase(e, context)}")
    return found


def _phrase(e: dict, context: dict) -> str:
    """What pydantic found, in the words of keyframes' other messages."""
    value = e.get("input")
    if e["type"] == "keyframes":
        return context["message"]
    if e["type"] == "missing":
        return "missing"
    if e["type"] == "string_too_long":
        return f"{len(value)} characters, the limit is {context['max_length']}"
    if e["type"] in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected an object, got {kind(value)}"
    if e["type"] == "string_type":
        return f"expected a string, got {kind(value)}"
    return e["msg"]
