#!/usr/bin/env bash
# Every GPU measurement of issue 13 in one command, for a lent machine with one GPU (an H200)
# and no network: `bash benchmarks/gpu.sh` (JSON under $OUT, or benchmarks/results/ when OUT
# is unset; file names carry the GPU's name). Each part has its own time limit, so one hang
# or slow compile cannot take the others' results with it, and every Python part rewrites
# its JSON as each of its own parts finishes. The limits add up to 7.6 minutes.
#
#   bash benchmarks/gpu.sh --smoke    # CPU dry run of the Python parts at tiny sizes (~2 min on 2 cores)
set -u
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ALEXNET_CACHE=${ALEXNET_CACHE:-/tmp/alexnet-cache}
# One Inductor cache for all parts: the bench's compiled graphs are reused by gpu_steps.py.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/alexnet-inductor}
# This checkout's package, whatever else is installed (no network there: nothing is installed).
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

if [ "$SMOKE" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=
    GPU=smoke-cpu
    BENCH=(--images 24 --source-size 80x60 --image-size 72 --crop-size 64 --batch-size 4 --steps 1 --warmup 1
           --repeats 2 --workers 2 --no-towers)
    STEPS=(--smoke)
    LRN=(--device cpu --batch-size 2 --rounds 3)
else
    GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[-1].lower())' 2>/dev/null || echo gpu)
    BENCH=(--images 5000 --batch-size 256 --steps 20 --warmup 10 --repeats 3)
    STEPS=(--batch-sizes 128,256,512 --repeats 2)
    LRN=(--device cuda --batch-size 256 --rounds 15)
fi
ENV_FILE="$OUT/$GPU-environment.txt"
python3 -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name() if torch.cuda.is_available() else "no cuda")' | tee "$ENV_FILE"
python3 -c 'import triton; print("triton", triton.__version__)' 2>&1 | tee -a "$ENV_FILE"
[ "$SMOKE" = 0 ] && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv | tee -a "$ENV_FILE"
date -u +%FT%TZ | tee -a "$ENV_FILE"

part() {  # part NAME SECONDS COMMAND...: run under its own limit, log to OUT/GPU-NAME.txt, say how it ended
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$GPU-$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$ENV_FILE"
    tail -n 25 "$OUT/$GPU-$name.txt"
}

# 1. The paper network: data path, model step (MFU), split towers, torchvision's network in our
#    step, end to end, each interleaved with the reference pipeline in the same process.
part bench-paper 130 python3 -m alexnet bench "${BENCH[@]}" --no-progress --json "$OUT/$GPU-bench-paper.json"
# 2. torchvision's network end to end against the same reference.
part bench-torchvision 80 python3 -m alexnet bench --model torchvision "${BENCH[@]}" --no-progress \
    --json "$OUT/$GPU-bench-torchvision.json"
# 3. The paper net's step eager / compiled / reduce-overhead at 128, 256, 512; conv1 direct
#    against space-to-depth; the 15 most expensive kernels of the compiled step.
part steps 150 python3 benchmarks/gpu_steps.py "${STEPS[@]}" --json "$OUT/$GPU-steps.json"
# 4. Old against new LRN in the eager step (new on CUDA: the Triton kernels).
part lrn-ab 40 sh -c "python3 benchmarks/lrn_ab.py ${LRN[*]} --amp bf16 > '$OUT/$GPU-lrn-ab.json'"
# 5. The GPU tests (Triton LRN against the CPU path, CUDA graphs against eager, no host syncs).
if [ "$SMOKE" = 0 ]; then
    part pytest-gpu 55 python3 -m pytest -q -p no:cacheprovider -m gpu
fi
ls -l "$OUT" | tee -a "$ENV_FILE"
