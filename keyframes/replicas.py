"""Write replicas of the Hugging Face repos keyframes names into a Hugging Face cache folder:
real repo ids, file names, subfolders and fp16 variants, random weights. With them every
preset runs offline exactly as on a machine with the real downloads; the images are noise.

    uv run python -m keyframes.replicas outputs/replicas   # tiny models, full-size scorer
    uv run python -m keyframes.replicas outputs/full --full  # SDXL base at full size (7 GB)
    export HF_HOME=outputs/replicas HF_HUB_OFFLINE=1
    uv run python -m keyframes.run width=64 height=64 steps=2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    description, usage = __doc__.split("\n\n")[:2]
    parser = argparse.ArgumentParser(
        prog="python -m keyframes.replicas",
        description=description,
        epilog="example:\n" + usage,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("hf_home", type=Path, help="the folder to use as HF_HOME")
    parser.add_argument(
        "--full",
        action="store_true",
        help="SDXL base at full size (published configs, random fp16 weights, 7 GB) instead of "
        "the tiny replicas of every repo",
    )
    parser.add_argument(
        "--no-scorer",
        action="store_true",
        help="leave out the ViT-L-14 scorer (full size even here: 0.86 GB, about 20 s)",
    )
    args = parser.parse_args(argv)

    from keyframes.pipeline import replicas

    start = time.perf_counter()
    write = replicas.write_full_replicas if args.full else replicas.write_tiny_replicas
    hub = write(args.hf_home)
    if not args.no_scorer:
        replicas.write_scorer_replica(args.hf_home)
    repos = sorted(
        p.name.removeprefix("models--").replace("--", "/")
        for p in hub.iterdir()
        if p.name.startswith("models--")
    )
    print(f"wrote {len(repos)} repos into {hub} in {time.perf_counter() - start:.0f} s:")
    print("\n".join(f"  {repo}" for repo in repos))
    print(f"use them: HF_HOME={args.hf_home} HF_HUB_OFFLINE=1 uv run python -m keyframes.run ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
