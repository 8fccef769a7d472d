"""List style presets:

uv run python -m keyframes.styles                 # the built-in presets (conf/style)
uv run python -m keyframes.styles --file PATH     # the presets in a style file
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from keyframes.config.styles import builtin_styles, read_style_file
from keyframes.errors import KeyframesError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyframes.styles", description=__doc__)
    parser.add_argument("--file", type=Path, help="a .json or A1111 .csv style file")
    args = parser.parse_args(argv)
    try:
        styles = read_style_file(args.file) if args.file else builtin_styles()
    except KeyframesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for style in styles:
        print(f"{style.name}\n  prompt:   {style.prompt}")
        if style.negative_prompt:
            print(f"  negative: {style.negative_prompt}")
    how = f"style=file style.file={args.file} style.name=NAME" if args.file else "style=NAME"
    print(f"\n{len(styles)} presets; use one with: uv run python -m keyframes.run {how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
