"""manifest.json and its journal, written as a run goes (atomically: a crash never leaves
half a file) and read back as typed records."""

from __future__ import annotations

import json
from pathlib import Path

from keyframes.outputs.atomic import atomic_write
from keyframes.outputs.records import ImageRecord, Manifest, RunInfo


def write_manifest(run_dir: Path, manifest: Manifest, name: str = "manifest.json") -> Path:
    """The whole manifest; its journal (see ManifestWriter) is then redundant and removed."""
    path = run_dir / name
    text = json.dumps(manifest.to_json(), indent=2, ensure_ascii=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))
    journal_of(path).unlink(missing_ok=True)
    return path


def journal_of(manifest: Path) -> Path:
    """manifest.json -> manifest.journal.jsonl: the image records written since the last
    full manifest, one JSON line each."""
    return manifest.with_suffix(".journal.jsonl")


class ManifestWriter:
    """Keeps a growing run's bookkeeping linear in its images. After each batch its records
    are appended to the journal; the manifest itself is rewritten (and the journal dropped)
    only when the run's image count has doubled since the last full write, and whenever the
    caller asks (start, end, any stop). A kill between two full writes loses nothing:
    load_manifest reads the journal too."""

    def __init__(self, path: Path):
        self.path = path
        self.full_at = 0  # images in the last full write

    def due(self, images: int) -> bool:
        return images >= 2 * max(self.full_at, 1)

    def full(self, run: RunInfo, images: list[ImageRecord]) -> None:
        write_manifest(self.path.parent, Manifest(run, images), self.path.name)
        self.full_at = len(images)

    def append(self, records: list[ImageRecord]) -> None:
        lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
        with open(journal_of(self.path), "a", encoding="utf-8") as f:
            f.write(lines)


def load_manifest(path: Path) -> Manifest:
    """A manifest with the records of its journal added (a record there replaces the one with
    the same file). Each journal line is decoded on its own, so a line cut off by a kill (even
    inside a multi-byte character) is skipped and the others are kept. Raises OSError or
    ValueError where there is no readable manifest."""
    manifest = Manifest.from_json(json.loads(path.read_text(encoding="utf-8")))
    journal = journal_of(path)
    if not journal.is_file():
        return manifest
    images = {r.file: r for r in manifest.images}
    for line in journal.read_bytes().splitlines():
        try:
            record = ImageRecord.from_json(json.loads(line.decode("utf-8")))
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            continue
        images[record.file] = record
    manifest.images = sorted(images.values(), key=lambda r: r.index)
    return manifest


def read_run(path: Path) -> RunInfo | None:
    """The run record of a manifest (its images are not read); None where unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo.from_json(data["run"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
