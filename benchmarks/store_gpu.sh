#!/usr/bin/env bash
# Issue 14's GPU figures in one short call on a lent machine with one GPU and no network
# (run tool: `bash benchmarks/store_gpu.sh`; results under $OUT, or benchmarks/results/).
# Each part has its own time limit; together they stay under 8 minutes on an H200.
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ALEXNET_CACHE=${ALEXNET_CACHE:-/tmp/alexnet-cache} PYTHONPATH=$PWD/src
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name())' | tee "$OUT/store-gpu-environment.txt"
date -u +%FT%TZ | tee -a "$OUT/store-gpu-environment.txt"
# 1. nvJPEG and the pinned ring against the CPU loader.
timeout 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/data/test_jpegstore.py > "$OUT/store-gpu-pytest.txt" 2>&1
tail -n 3 "$OUT/store-gpu-pytest.txt"
# 2. End to end and data path from the JPEG store against the raw store, interleaved
#    (prepares both stores of 20,000 bench JPEGs first: about 2 minutes on 16 cores).
timeout 330 python3 benchmarks/store_e2e.py --images 20000 --rounds 3 --steps 50 --device cuda \
    > "$OUT/store-gpu-e2e.json" 2> "$OUT/store-gpu-e2e.txt"
cat "$OUT/store-gpu-e2e.json"
# 3. nvJPEG decode alone, and the CPU decode on one thread, of the JPEG store.
JPEG=$ALEXNET_CACHE/bench-20000-500x375.jpeg256
timeout 40 python3 benchmarks/store_ab.py decode "$JPEG" --batches 50 --device cuda | tee "$OUT/store-gpu-nvjpeg.json"
timeout 40 python3 benchmarks/store_ab.py decode "$JPEG" --batches 20 --device cpu | tee "$OUT/store-cpu-decode.json"
# 4. The reference pipeline, end to end from the same JPEGs: alexnet bench's own figure.
timeout 150 python3 -m alexnet bench --images 20000 --steps 50 --warmup 10 --no-progress \
    --json "$OUT/store-gpu-bench.json" > "$OUT/store-gpu-bench.txt" 2>&1
grep -i "reference\|end to end" "$OUT/store-gpu-bench.txt" | tail -n 4
