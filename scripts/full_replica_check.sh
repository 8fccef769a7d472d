#!/usr/bin/env bash
# The README's default command on the full-size SDXL base replica (published configs, random
# fp16 weights in the Hugging Face cache layout) and the full-size ViT-L-14 scorer, offline, on
# the CPU at 256x256 with 2 steps. Proves that the real repo's file names, fp16 variant files,
# placement and the whole pipeline work at full size; the images are noise (random weights).
# Needs about 8 GB of disk and 18 GB of RAM. Prints the wall time and peak memory of each part.
#   usage: scripts/full_replica_check.sh [FOLDER]   (default: outputs/full-replica)
set -euo pipefail
folder=$(realpath -m "${1:-outputs/full-replica}")
cd "$(dirname "$0")/.."
measure() { /usr/bin/time -f "  wall %e s, peak RSS %M KB" "$@"; }

echo "== writing the full-size replicas into $folder"
[ -d "$folder/hub" ] || measure uv run python -m keyframes.replicas "$folder" --full
echo "== the default command, offline, 256x256, 2 steps"
HF_HOME="$folder" HF_HUB_OFFLINE=1 measure uv run python -m keyframes.run \
    width=256 height=256 steps=2 hydra.run.dir="$folder/run" \
    mlflow.tracking_uri="sqlite:///$folder/mlflow.db"
uv run python - "$folder/run/manifest.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))["run"]
print(f"  {run['model_source']} ({run['dtype']}, {run['device']}), scorer {run['scorer']}:",
      json.dumps({k: run["summary"][k] for k in ("images", "images_failed", "model_load_seconds",
                  "warmup_seconds", "seconds_per_image_mean", "rss_peak_gb")}))
PY
