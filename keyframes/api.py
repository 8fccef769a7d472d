"""keyframes from Python, for the stages of a video pipeline around it:

    import keyframes
    manifest = keyframes.generate("shots.json", ["style=noir", "steps=30"], run_dir="out/run1")
    for image in manifest.images:
        print(image.file, image.seed, image.clip_score)
    keyframes.load_manifest("out/run1/manifest.json")   # a run made earlier, or by the command

The same Hydra configs, checks and run as `keyframes shotlist=shots.json style=noir ...`, in
this process; what the command turns into an exit code is an exception here (KeyframesError:
exit 2, ImagesFailed: 3, DiskFull: 4, Interrupted: 130)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from keyframes.errors import ConfigError, KeyframesError
from keyframes.generation.outcome import DiskFull, Interrupted
from keyframes.outputs.manifest import load_manifest
from keyframes.outputs.records import ImageRecord, Manifest

__all__ = [
    "DiskFull",
    "ImagesFailed",
    "Interrupted",
    "KeyframesError",
    "generate",
    "load_manifest",
]


class ImagesFailed(Exception):
    """Some images of a finished run failed (the command's exit code 3): the manifest holds
    every record, the failed ones with their error."""

    def __init__(self, manifest: Manifest, failed: list[ImageRecord]):
        self.manifest, self.failed = manifest, failed
        lines = "\n".join(f"  {r.file}: {r.error}" for r in failed)
        super().__init__(f"{len(failed)} of {len(manifest.images)} images failed:\n{lines}")


LOG_NAME = "run.log"


def generate(
    shotlist: str | Path = "demo",
    overrides: Sequence[str] = (),
    run_dir: str | Path | None = None,
) -> Manifest:
    """Make the keyframes of `shotlist` with these Hydra overrides into `run_dir` (default:
    outputs/runs/<time>, as the command) and log the run to MLflow; returns its manifest.
    Bad input raises before anything loads and leaves nothing written; a run into a folder
    that holds an earlier one continues it (only what is missing is made)."""
    from keyframes.config.compose import composed_or_refused
    from keyframes.config.overrides import check_override_keys
    from keyframes.config.schema import CONF_DIR, Config
    from keyframes.outputs.files import remove_if_untouched, run_folder_problem
    from keyframes.outputs.folder_lock import LOCK_NAME
    from keyframes.run import run

    overrides = [f"shotlist={shotlist}", *overrides]
    check_override_keys(overrides, Config, CONF_DIR)
    run_dir = Path(run_dir or Path("outputs/runs") / time.strftime("%Y-%m-%d_%H-%M-%S")).absolute()
    if problem := run_folder_problem(run_dir):
        raise ConfigError(f"run_dir={run_dir}: {problem}")
    cfg = composed_or_refused(overrides, typed=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _logged_to(run_dir / LOG_NAME):
            result = run(cfg, run_dir, overrides, None, LOG_NAME, None)
    except Exception:
        remove_if_untouched(run_dir, {LOG_NAME, "config.yaml", LOCK_NAME})
        raise
    manifest = load_manifest(result.run_dir / "manifest.json")
    failed = [image for image in manifest.images if not image.ok]
    if failed:
        raise ImagesFailed(manifest, failed)
    return manifest


@contextmanager
def _logged_to(path: Path):
    """keyframes' log into the run folder's run.log while the run lasts, as the command's."""
    logger = logging.getLogger("keyframes")
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
