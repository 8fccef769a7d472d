"""What the run's bookkeeping costs per image as runs grow: the manifest rewritten whole after
every batch (keyframes before the journal) against ManifestWriter (journal + doubling), on
records copied from a real smoke run's manifest. Prints ms per image; no model is loaded.

    uv run python scripts/bench_bookkeeping.py RUN_DIR [--sizes 100 2000]

Real runs record the whole of it (scoring, PNGs, manifest) as timings.bookkeeping_seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from keyframes.outputs.manifest import ManifestWriter, load_manifest, write_manifest
from keyframes.outputs.records import ImageRecord, Manifest, RunInfo


def records(template: ImageRecord, count: int) -> list[ImageRecord]:
    return [
        replace(template, index=i, file=f"keyframes/{i:05d}_scene-{i}_t1.png", seed=i)
        for i in range(count)
    ]


def rewrite_every_batch(folder: Path, run: RunInfo, images: list[ImageRecord]) -> None:
    for n in range(1, len(images) + 1):
        write_manifest(folder, Manifest(run, images[:n]))


def journal(folder: Path, run: RunInfo, images: list[ImageRecord]) -> None:
    writer = ManifestWriter(folder / "manifest.json")
    writer.full(run, [])
    for n in range(1, len(images) + 1):
        if writer.due(n):
            writer.full(run, images[:n])
        else:
            writer.append(images[n - 1 : n])
    writer.full(run, images)  # the end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run (its manifest gives records)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 2000])
    args = parser.parse_args()
    manifest = load_manifest(args.run_dir / "manifest.json")
    run, template = manifest.run, manifest.images[0]
    size = len(json.dumps(template.to_json()))
    print(f"records from {args.run_dir}: {size} bytes each, batch size 1")
    for size in args.sizes:
        images = records(template, size)
        for name, way in (("rewrite every batch", rewrite_every_batch), ("journal", journal)):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                way(Path(tmp), run, images)
                seconds = time.perf_counter() - start
            per_image = 1000 * seconds / size
            print(f"{size:6d} images  {name:20s} {seconds:8.2f} s  {per_image:8.2f} ms/image")


if __name__ == "__main__":
    main()
