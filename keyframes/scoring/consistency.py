"""How alike a run's keyframes look, measured on the files on disk (resumed ones included):
the style across scenes, and each character's identity across the scenes that list it.

Both read one CLIP image embedding of the whole frame. For a character that also measures
the background, the light and the style the frames share: two shots of one person in two
places score lower than they should, two people in one place higher. Cropping to the
character first (a detector and segmenter such as Grounding DINO + SAM, as ViStoryBench
does, given the character's name) would measure the person alone; keyframes does not crop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from keyframes.scoring.clip import ClipScorer, style_consistency
from keyframes.shotlist.jobs import unique_safe_names


@dataclass(frozen=True)
class Keyframe:
    path: Path
    scene_id: str
    cast: tuple[str, ...] = ()  # the characters its scene lists


@dataclass
class Consistency:
    summary: dict[str, float] = field(default_factory=dict)  # the run's figures
    # per keyframe (in the order given): {character: {"others": ..., "reference": ...}}
    per_image: list[dict[str, dict[str, float]]] = field(default_factory=list)


def consistency_of(
    keyframes: list[Keyframe], scorer: ClipScorer, references: dict[str, Path] | None = None
) -> Consistency:
    """style_consistency (across scenes), style_consistency_takes (within a scene) and the
    character figures (character_identity) of keyframes on disk; files that are gone are
    left out (their per-image entry stays empty), as are references that are gone."""
    ok = [k.path.is_file() for k in keyframes]
    shown = [k for k, present in zip(keyframes, ok, strict=True) if present]
    result = Consistency(per_image=[{} for _ in keyframes])
    if not shown:
        return result
    features = image_features([k.path for k in shown], scorer)
    figures = style_consistency(features, [k.scene_id for k in shown])
    given = {n: p for n, p in (references or {}).items() if p.is_file()}
    refs = dict(zip(given, image_features(list(given.values()), scorer), strict=True))
    summary, per_image = character_identity(features, [k.cast for k in shown], refs)
    result.summary = {k: round(v, 4) for k, v in (figures | summary).items()}
    shown_index = iter(per_image)
    result.per_image = [next(shown_index) if present else {} for present in ok]
    return result


def image_features(paths: list[Path], scorer: ClipScorer) -> torch.Tensor:
    """Unit CLIP image embeddings of image files, 16 at a time."""
    features = []
    for start in range(0, len(paths), 16):
        opened = [Image.open(path) for path in paths[start : start + 16]]
        features.append(scorer.image_features(opened))
        for image in opened:
            image.close()
    return torch.cat(features) if features else torch.empty(0)


def character_identity(
    features: torch.Tensor, casts: list[tuple[str, ...]], references: dict[str, torch.Tensor]
) -> tuple[dict[str, float], list[dict[str, dict[str, float]]]]:
    """Per character, over the keyframes whose cast lists it (unit embeddings, cosines x 100):
    `character_consistency_<name>`, the mean over their pairs, and
    `character_reference_<name>`, their mean similarity to the character's reference image
    where there is one; `character_consistency` and `character_reference`, the means of
    those over the characters. Per keyframe and character of its cast: "others", its mean
    similarity to the character's other keyframes, and "reference"."""
    names = list(dict.fromkeys(name for cast in casts for name in cast))
    safe = unique_safe_names(names)
    cosines = (features @ features.T * 100).tolist()
    summary: dict[str, float] = {}
    per_image: list[dict[str, dict[str, float]]] = [{} for _ in casts]
    for name in names:
        shown = [i for i, cast in enumerate(casts) if name in cast]
        reference = references.get(name)
        near = (features[shown] @ reference * 100).tolist() if reference is not None else None
        for n, i in enumerate(shown):
            entry = {"others": _mean([cosines[i][j] for j in shown if j != i])}
            entry |= {"reference": round(near[n], 4)} if near is not None else {}
            if measured := {k: v for k, v in entry.items() if v is not None}:
                per_image[i][name] = measured
        pairs = [cosines[i][j] for a, i in enumerate(shown) for j in shown[a + 1 :]]
        if pairs:
            summary[f"character_consistency_{safe[name]}"] = sum(pairs) / len(pairs)
        if near:
            summary[f"character_reference_{safe[name]}"] = sum(near) / len(near)
    for kind in ("consistency", "reference"):
        values = [v for k, v in summary.items() if k.startswith(f"character_{kind}_")]
        if values:
            summary[f"character_{kind}"] = sum(values) / len(values)
    return summary, per_image


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
