"""Save the tiny random-weight SDXL as a diffusers folder, to try local loading offline:

uv run python scripts/save_tiny_model.py outputs/tiny-sdxl
uv run python -m keyframes.run experiment=smoke model=local model.path=outputs/tiny-sdxl
"""

import sys
from pathlib import Path

from keyframes.pipeline.tiny import build_tiny_pipeline

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = Path(sys.argv[1])
    build_tiny_pipeline().save_pretrained(folder)  # safetensors by default
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"saved {folder} ({size / 1e6:.1f} MB)")
