"""Pure prompt assembly: scene fields + characters -> scene prompt -> style -> final prompts."""

from __future__ import annotations

from keyframes.shotlist.load import Character, Scene


def scene_prompt(scene: Scene, characters: dict[str, Character]) -> str:
    """What the frame shows, in the order SDXL weighs most: framing, subject, people, look.

    A scene's own `prompt` replaces the assembled text (the style still applies)."""
    if scene.prompt:
        return scene.prompt
    parts = [scene.shot, scene.description]
    # Descriptions, not names: the model knows nothing of "Mara", and the same words in every
    # scene are what keep a character's look stable.
    parts += [characters[name].description for name in scene.characters]
    parts += [scene.camera]
    parts += [f"{scene.lighting} lighting" if scene.lighting else None]
    parts += [f"{scene.mood} mood" if scene.mood else None]
    return ", ".join(p for p in parts if p)


def apply_style(template: str, prompt: str) -> str:
    # str.replace, not str.format: prompts may contain braces of their own.
    return template.replace("{prompt}", prompt)


def combine_negatives(*negatives: str | None) -> str:
    """Join comma-separated term lists, most specific first, dropping repeats (case-insensitive)."""
    seen: dict[str, str] = {}
    for negative in negatives:
        for term in (negative or "").split(","):
            term = term.strip()
            if term and term.lower() not in seen:
                seen[term.lower()] = term
    return ", ".join(seen.values())
