"""How alike a run's keyframes look, measured on the files on disk (resumed ones included)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from keyframes.scoring.clip import ClipScorer, style_consistency


def consistency_of(keyframes: list[tuple[Path, str]], scorer: ClipScorer):
    """style_consistency (across scenes) and style_consistency_takes (within a scene) of
    keyframes on disk, given as (file, scene id); files that are gone are left out."""
    ok = [(path, scene) for path, scene in keyframes if path.is_file()]
    features = []
    for start in range(0, len(ok), 16):
        opened = [Image.open(path) for path, _ in ok[start : start + 16]]
        features.append(scorer.image_features(opened))
        for image in opened:
            image.close()
    if not features:
        return {}
    figures = style_consistency(torch.cat(features), [scene for _, scene in ok])
    return {k: round(v, 4) for k, v in figures.items()}
