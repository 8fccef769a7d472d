from __future__ import annotations

import json
from pathlib import Path

from keyframes.config import ModelConfig


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(name="tiny", tiny=True, **overrides)


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def default_speed():
    from keyframes.config import SpeedConfig

    return SpeedConfig(name="sdpa")
