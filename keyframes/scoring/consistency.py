"""How alike a run's keyframes look, measured on the files on disk (resumed ones included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from keyframes.scoring.clip import ClipScorer, style_consistency


def consistency_of(run_dir: Path, images: list[dict[str, Any]], scorer: ClipScorer):
    """style_consistency (across scenes) and style_consistency_takes (within a scene) of the
    run's keyframes on disk, resumed ones included."""
    ok = [r for r in images if r["status"] == "ok" and (run_dir / r["file"]).is_file()]
    features = []
    for start in range(0, len(ok), 16):
        opened = [Image.open(run_dir / r["file"]) for r in ok[start : start + 16]]
        features.append(scorer.image_features(opened))
        for image in opened:
            image.close()
    if not features:
        return {}
    figures = style_consistency(torch.cat(features), [r["scene_id"] for r in ok])
    return {k: round(v, 4) for k, v in figures.items()}
