"""Style presets from the files people already have (listed by `python -m keyframes.styles`).

Two formats: a JSON list of {"name", "prompt" (with {prompt}), "negative_prompt"}, as several
SDXL front ends keep their style libraries; and AUTOMATIC1111's styles.csv
(name,prompt,negative_prompt), where a prompt without {prompt} goes after the user's prompt,
joined with ", ".
"""

from __future__ import annotations

import csv
from pathlib import Path

from keyframes.config.inputs import json_problems, load_json, read_bounded
from keyframes.config.schema import CONF_DIR, StyleConfig
from keyframes.errors import ConfigError, first_line

CONF_STYLES = CONF_DIR / "style"


MAX_STYLE_FILE_BYTES = 20_000_000


def read_style_file(path: Path) -> list[StyleConfig]:
    """Every preset of a .json or .csv style file, in file order; one ConfigError naming
    every preset that is not one."""
    what = f"style.file={path}:"
    raw = read_bounded(path, MAX_STYLE_FILE_BYTES, "style file", ConfigError)
    try:
        text = raw.decode("utf-8-sig")  # A1111 on Windows writes a BOM
        if path.suffix.lower() == ".csv":
            entries = list(csv.DictReader(text.splitlines()))
        else:
            entries = load_json(text)
    except RecursionError:
        raise ConfigError(f"{what} nested too deeply to be a style file") from None
    except (ValueError, csv.Error) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise ConfigError(f"{what} not a readable style file ({first_line(e)})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"{what} expected a list of presets")
    problems = json_problems(entries)
    styles = [_preset(entry, number, problems) for number, entry in enumerate(entries, 1)]
    if problems:
        raise ConfigError(f"{what} not a style file:", problems)
    return styles


def _preset(entry: object, number: int, problems: list[str]) -> StyleConfig | None:
    """One preset; what is wrong with it goes to problems."""
    if not isinstance(entry, dict):
        problems.append(f"preset {number}: expected an object, got {type(entry).__name__}")
        return None
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.append(f"preset {number}: no name")
        name = ""
    texts = {}
    for key in ("prompt", "negative_prompt"):
        value = entry.get(key) or ""
        if not isinstance(value, str):
            problems.append(f"preset {number} ({name or 'no name'}).{key}: expected text")
            value = ""
        texts[key] = value
    return StyleConfig(
        name=name.strip(),
        prompt=as_template(texts["prompt"]),
        negative_prompt=texts["negative_prompt"].strip(),
    )


def as_template(prompt: str) -> str:
    """A1111's rule: a style prompt without {prompt} is appended to the user's prompt."""
    prompt = prompt.strip()
    if "{prompt}" in prompt:
        return prompt
    return f"{{prompt}}, {prompt}" if prompt else "{prompt}"


def resolve_style(style: StyleConfig) -> StyleConfig:
    """style=file: the named preset from style.file; any other style as it is."""
    if style.file is None:
        return style
    if not style.file:
        raise ConfigError(
            "style=file needs style.file=PATH (a .json or A1111 .csv style file) and "
            "style.name=NAME"
        )
    path = Path(style.file).expanduser()
    presets = {s.name: s for s in read_style_file(path)}
    if style.name not in presets:
        names = list(presets)
        known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        raise ConfigError(
            f"style.name={style.name or '(unset)'}: not in {path} (presets: {known}). "
            f"List them: uv run python -m keyframes.styles --file {path}"
        )
    chosen = presets[style.name]
    return StyleConfig(chosen.name, chosen.prompt, chosen.negative_prompt, file=str(path))


def builtin_styles() -> list[StyleConfig]:
    from omegaconf import OmegaConf

    return [
        StyleConfig(**OmegaConf.to_container(OmegaConf.load(p)))
        for p in sorted(CONF_STYLES.glob("*.yaml"))
        if p.stem != "file"
    ]
