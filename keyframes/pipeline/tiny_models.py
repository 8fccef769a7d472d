"""The tiny random-weight models as diffusers folders, written once per machine and loaded by
the normal loading path like any local model (conf/model/tiny.yaml names the folder).

They live under $KEYFRAMES_TINY_MODELS, else ~/.cache/keyframes/tiny-models. A folder is
written when a run names it and it is missing or was built by other code (a stamp holds the
digest of pipeline/tiny.py, the published configs it starts from and the diffusers version),
in a temporary folder renamed into place under a lock: runs starting at once write it once.
Importing this module loads neither torch nor diffusers.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

log = logging.getLogger("keyframes")

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data"
STAMP = "keyframes-tiny.json"
# folder name -> what it holds
TINY_MODELS = {
    "sdxl": "the tiny SDXL base",
    "sd15": "the tiny SD 1.5",
    "sdxl-refiner": "the tiny SDXL refiner (sharing the tiny base's VAE and text encoder 2)",
    "controlnet-sdxl": "a ControlNet copied from the tiny SDXL UNet",
    "controlnet-sd15": "a ControlNet copied from the tiny SD 1.5 UNet",
}


def tiny_models_root() -> Path:
    """Where the tiny models are; conf/model/tiny.yaml and the others name the same place."""
    root = os.environ.get("KEYFRAMES_TINY_MODELS") or "~/.cache/keyframes/tiny-models"
    return Path(root).expanduser()


def tiny_model_path(name: str) -> Path:
    return tiny_models_root() / name


def builder_digest() -> str:
    """What the tiny weights depend on: the builder's code, the published configs, diffusers."""
    digest = hashlib.sha256((HERE / "tiny.py").read_bytes())
    for path in sorted(DATA.rglob("*.json")):
        digest.update(path.read_bytes())
    digest.update(metadata.version("diffusers").encode())
    return digest.hexdigest()[:16]


def provide_tiny_models(paths: Iterable[str | None]) -> None:
    """Write every tiny model folder among `paths` that is missing or stale."""
    root = tiny_models_root()
    folders = [Path(p).expanduser() for p in paths if p]
    wanted = {f.name for f in folders if f.parent == root and f.name in TINY_MODELS}
    if not wanted:  # every other run: nothing to read or hash
        return
    digest = builder_digest()
    stale = sorted(name for name in wanted if _stamp(root / name) != digest)
    if not stale:
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be writing them right now
        for name in stale:
            if _stamp(root / name) != digest:
                _write(root, name, digest)


def _stamp(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAMP).read_text())["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(root: Path, name: str, digest: str) -> None:
    from keyframes.pipeline import tiny
    from keyframes.pipeline.load import quiet_loading

    log.info("writing %s to %s (once per machine)", TINY_MODELS[name], root / name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with quiet_loading():
            tiny.build_tiny_model(name).save_pretrained(tmp)  # safetensors
        (tmp / STAMP).write_text(json.dumps({"digest": digest, "model": TINY_MODELS[name]}))
        old = root / name
        if old.exists():
            shutil.rmtree(old)
        os.replace(tmp, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
