#!/usr/bin/env bash
# Issue 17's measurements on a lent CUDA machine, one phase per call (each well under 10 min):
#   speed    scripts/bench.py at 1024x1024, 30 steps, CFG 5, batch 1 and 4:
#            speed=sdpa, speed=fast, speed=compile (compile seconds reported apart)
#   paths    scripts/cuda_paths.py (memory modes, out-of-memory fallback, float32 re-decode,
#            default dtype) and the bench with guidance_interval=[0,0.5]
#   product  the README's default command on the full-size replica (random weights) at
#            1344x768, 30 steps, scorer and MLflow, and the bare bench at the same size
#   characters  issue 28's cost of consistent characters: the demo shotlist at 1024x1024,
#            30 steps, scorer and MLflow, as a sweep over consistency=none,story on the
#            full-size replica (s/image, VRAM peak, UNet evaluations and TFLOP per image in
#            the sweep's summary.csv; character_ref needs a full-size IP-Adapter image
#            encoder, whose config is not packaged)
# Everything lands in $OUT (default outputs/gpu): log.txt and results.tgz (JSON, logs, the
# product run's manifest), so that a run stopped at its time limit still returns what it did.
#   usage: scripts/gpu_measure.sh PHASE...
# Dry run on a CPU (tiny models; compile refuses the CPU with exit 2):
#   PYTHON="uv run python" MODEL=tiny SIZE=64 STEPS=2 REPLICA_SIZE= \
#   PRODUCT_OVERRIDES="width=64 height=64 steps=2" CHARACTER_OVERRIDES="width=64 height=64 \
#   steps=2" scripts/gpu_measure.sh speed paths product characters
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${OUT:-outputs/gpu}")
work=${WORK:-/tmp/keyframes-gpu}
py=${PYTHON:-python3}
model=${MODEL:-sdxl_random}
size=${SIZE:-1024}
steps=${STEPS:-30}
mkdir -p "$out" "$work"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1

pack() { tar -czf "$out/results.tgz" --exclude=mlartifacts -C "$work" . ; }
step() {  # step NAME SECONDS COMMAND...: a time limit per step, so later steps still run
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date -u +%FT%TZ)): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$work/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    pack
}
bench() {  # bench NAME LIMIT OVERRIDES...
    local name=$1 limit=$2; shift 2
    step "bench-$name" "$limit" $py scripts/bench.py "model=$model" "width=$size" \
        "height=$size" "steps=$steps" cfg_scale=5 memory=none "$@" --json "$work/bench-$name.json"
}

echo "== $(date -u +%FT%TZ) on $(hostname)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm \
    --format=csv
$py -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"

for phase in "$@"; do
    case $phase in
    speed)
        bench sdpa 130 speed=sdpa --batch-sizes 1,4 --images 4 --repeats 2
        bench compile 300 speed=compile --batch-sizes 1,4 --images 4 --repeats 2
        bench fast 130 speed=fast --batch-sizes 1,4 --images 4 --repeats 2
        ;;
    paths)
        step cuda-paths 300 $py scripts/cuda_paths.py "model=$model" "width=$size" \
            "height=$size" "steps=$steps" cfg_scale=5 --json "$work/cuda-paths.json"
        bench interval 100 speed=sdpa 'guidance_interval=[0,0.5]' --batch-sizes 1 \
            --images 4 --repeats 2
        ;;
    product)
        replica=${REPLICA:-/tmp/keyframes-replica}
        [ -d "$replica/hub" ] || step replica 150 $py -m keyframes.replicas "$replica" \
            ${REPLICA_SIZE---full}
        # the default command: model sdxl_base, scorer clip, memory auto, speed sdpa
        step product 240 env HF_HOME="$replica" HF_HUB_OFFLINE=1 $py -m keyframes.run \
            ${PRODUCT_OVERRIDES:-width=1344 height=768} hydra.run.dir="$work/run" \
            mlflow.tracking_uri="sqlite:///$work/mlflow.db"
        rm -f "$work"/run/*.png  # the manifest and the contact sheet say enough; keep it small
        step bench-product-size 120 $py scripts/bench.py "model=$model" \
            ${PRODUCT_OVERRIDES:-width=1344 height=768} --batch-sizes 1 --images 4 \
            --repeats 2 --json "$work/bench-product-size.json"
        ;;
    characters)
        replica=${REPLICA:-/tmp/keyframes-replica}
        [ -d "$replica/hub" ] || step replica 150 $py -m keyframes.replicas "$replica" \
            ${REPLICA_SIZE---full}
        step characters 420 env HF_HOME="$replica" HF_HUB_OFFLINE=1 $py -m keyframes.run -m \
            consistency=none,story ${CHARACTER_OVERRIDES:-width=1024 height=1024} \
            hydra.sweep.dir="$work/characters" mlflow.tracking_uri="sqlite:///$work/mlflow.db"
        find "$work/characters" -name '*.png' -path '*keyframes*' -delete
        cat "$work/characters/summary/summary.csv"
        ;;
    *) echo "unknown phase $phase (speed, paths, product, characters)"; exit 2 ;;
    esac
done
pack
echo "== done $(date -u +%FT%TZ)"
