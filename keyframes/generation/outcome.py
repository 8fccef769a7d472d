"""What a run comes to: the result of the recipe's generate, or the stop that carries it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from keyframes.outputs.manifest import write_manifest
from keyframes.outputs.records import ImageRecord, Manifest, RunInfo


@dataclass
class RenderResult:
    run_dir: Path
    run: RunInfo
    images: list[ImageRecord] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)

    def write_manifest(self) -> Path:
        return write_manifest(self.run_dir, Manifest(self.run, self.images))


class DiskFull(Exception):
    """No space left where the run writes; the run directory keeps what was finished."""

    def __init__(self, result: RenderResult, path: str, needed_bytes: int, left: int):
        super().__init__(f"no space left on the device of {path}")
        self.result = result  # the run as far as it got
        self.path = path  # the file that could not be written
        self.needed_bytes = needed_bytes  # an estimate for the images still to make
        self.left = left  # images still to make


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run directory holds everything finished before it."""

    def __init__(self, result: RenderResult, while_tracking: bool = False):
        super().__init__("interrupted")
        self.result = result  # the run as far as it got
        self.while_tracking = while_tracking  # it came while MLflow was being written
