"""How heavy a big sweep's review page is: 50 scenes x 16 jobs of 1024x576 noise keyframes
(noise is the worst case for the JPEG thumbnails), the page's size, the seconds to make its
cells, and how long headless Chromium takes to draw all 800 pictures and to sort the rows.

    uv run python scripts/bench_review_page.py [DIR]     # default /tmp/keyframes-review-bench
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keyframes.outputs.review_page import ReviewRow, record_cell, write_review  # noqa: E402
from tests.browser import Browser  # noqa: E402 - the tests' DevTools driver
from tests.helpers import image_record  # noqa: E402

SCENES, JOBS, DISTINCT = 50, 16, 32
DRAWN = (
    "Array.from(document.querySelectorAll('td img'))"
    ".filter(i => i.complete && i.naturalWidth > 0).length"
)
SORT = "const s = document.getElementById('rowsort'); s.value = 'clip_score';"


def main(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "keyframes").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sources = []
    for n in range(DISTINCT):  # then copied: writing 800 noise PNGs would time the disk
        path = folder / "keyframes" / f"source_{n}.png"
        Image.fromarray(rng.integers(0, 255, (576, 1024, 3), dtype=np.uint8)).save(path)
        sources.append(path)
    files = []
    for n in range(SCENES * JOBS):
        files.append(f"keyframes/{n:04d}.png")
        shutil.copy(sources[n % DISTINCT], folder / files[-1])
    start = time.perf_counter()
    rows = []
    for scene in range(SCENES):
        cells = [
            record_cell(
                image_record(file=files[scene * JOBS + job], clip_score=float(rng.random() * 30)),
                folder,
                folder,
            )
            for job in range(JOBS)
        ]
        rows.append(ReviewRow(f"scene-{scene}", "a scene", cells))
    cells_seconds = time.perf_counter() - start
    page = write_review(
        folder / "review.html", "bench", "", [f"job {j}" for j in range(JOBS)], rows
    )
    size = page.stat().st_size / 1e6
    print(f"{SCENES * JOBS} cells made in {cells_seconds:.1f} s; page {size:.1f} MB")
    browser = Browser(shutil.which("chromium") or shutil.which("chromium-browser"), 1600, 1000)
    try:
        start = time.perf_counter()
        browser.open(page.as_uri())
        browser.wait_for(f"{DRAWN} === {SCENES * JOBS}", 300)
        print(f"opened, every picture drawn: {time.perf_counter() - start:.2f} s")
        start = time.perf_counter()
        browser.js(SORT + " s.dispatchEvent(new Event('change'))")
        browser.wait_for(f"{DRAWN} === {SCENES * JOBS}", 300)
        print(f"rows sorted by CLIP, drawn again: {time.perf_counter() - start:.2f} s")
    finally:
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/keyframes-review-bench"))
