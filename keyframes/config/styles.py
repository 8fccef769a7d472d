"""Style presets from the files people already have (listed by `python -m keyframes.styles`).

Two formats: a JSON list of {"name", "prompt" (with {prompt}), "negative_prompt"}, as several
SDXL front ends keep their style libraries; and AUTOMATIC1111's styles.csv
(name,prompt,negative_prompt), where a prompt without {prompt} goes after the user's prompt,
joined with ", ".
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from keyframes.config.schema import CONF_DIR, StyleConfig
from keyframes.errors import ConfigError

CONF_STYLES = CONF_DIR / "style"


def read_style_file(path: Path) -> list[StyleConfig]:
    """Every preset of a .json or .csv style file, in file order."""
    if not path.is_file():
        raise ConfigError(f"style.file={path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # A1111 on Windows writes a BOM
        if path.suffix.lower() == ".csv":
            entries = list(csv.DictReader(text.splitlines()))
        else:
            entries = json.loads(text)
    except (ValueError, csv.Error, UnicodeDecodeError) as e:
        raise ConfigError(f"style.file={path}: not a readable style file ({e})") from None
    if not isinstance(entries, list):
        raise ConfigError(f"style.file={path}: expected a list of presets")
    styles = []
    for number, entry in enumerate(entries, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"style.file={path}: preset {number} has no name")
        styles.append(
            StyleConfig(
                name=name.strip(),
                prompt=as_template(entry.get("prompt") or ""),
                negative_prompt=(entry.get("negative_prompt") or "").strip(),
            )
        )
    return styles


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
        known = ", ".join(presets) or "none"
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
