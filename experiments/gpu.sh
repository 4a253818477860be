#!/usr/bin/env bash
# The CIFAR-10 experiments in one call on a lent one-GPU machine (run tool).
#
# 1. About 2 minutes of measurement before anything else (experiments/bench_batched.py, the
#    ablation baseline net at full width, all 50,000-image epochs cut to --images): 3 seeds one
#    at a time, the same 3 batched in one process (--batch-seeds: vmap, CUDA graphs), and the
#    same 3 in 3 processes (--jobs 3). $OUT/bench.json is rewritten after every part.
# 2. The experiments, each run's result kept the moment its run (or batched group) finishes:
#    the 30-epoch ablations (11 variants x 3 seeds, all of CIFAR-10), the overfitting pair
#    (baseline and no-dropout, one seed, OVERFIT_EPOCHS), and section 3.3's cifar-norm.
#    $OUT/exp.tgz is repacked whenever a new runs/*.json appears (checked every 10 s), so a
#    call that ends early brings back every finished run; a second call with the run
#    directories carried back in .data/exp continues them.
#
# CIFAR-10 travels in .data/ (ignored by git, carried by the run tool). Knobs: LIMIT (seconds
# for the whole call, default 450), BENCH=0 skips step 1, AB_JOBS (processes for the
# ablation groups, default 4, each a variant with its 3 seeds batched: waves of 4, so the
# first four variants are kept even if the call ends before the next wave does), AB_VARIANTS
# (default all), OVERFIT=0 / NORM=0 skip those, OVERFIT_EPOCHS (default 60), FIG1=1 adds Figure 1.
set -u
OUT=${OUT:-/tmp/exp-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD/src
DATA=.data/cifar10-jpeg.tar.gz
E=/tmp/exp
mkdir -p $E
[ -d .data/exp ] && cp -r .data/exp/. $E/
END=$((SECONDS + ${LIMIT:-450}))
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 10 > "$OUT/gpu-utilisation.csv" &
SMI=$!
python3 -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'gpu': torch.cuda.get_device_name()}))" \
    > "$OUT/versions.json" 2>&1

if [ "${BENCH:-1}" = 1 ]; then
    # 3 runs x 2 epochs x 10,240 images per mode; the first epoch (compiling, capture) is left out.
    timeout 150 python3 experiments/bench_batched.py --device cuda --runs 3 --images 10240 --epochs 2 \
        --rounds 1 --modes alone,batched,jobs --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
fi

# Repack whenever the number of finished runs changes.
(
    last=-1
    while sleep 10; do
        n=$(ls $E/*/runs/*.json 2>/dev/null | wc -l)
        if [ "$n" != "$last" ]; then
            tar czf "$OUT/exp.tgz.part" -C /tmp exp 2>/dev/null && mv "$OUT/exp.tgz.part" "$OUT/exp.tgz" && last=$n
        fi
    done
) &
PACK=$!
PIDS=()
if [ "${OVERFIT:-1}" = 1 ]; then
    timeout "$(left)" python3 -m alexnet experiment ablations --data $DATA --device cuda --batch-seeds --jobs 2 \
        --variants baseline,no-dropout --seeds 1 --epochs "${OVERFIT_EPOCHS:-60}" --out $E/ablations-overfit \
        > "$OUT/overfit.log" 2>&1 &
    PIDS+=($!)
fi
if [ "${NORM:-1}" = 1 ]; then
    timeout "$(left)" python3 -m alexnet experiment cifar-norm --data $DATA --device cuda --batch-seeds --jobs 2 \
        --out $E/cifar-norm > "$OUT/cifar-norm.log" 2>&1 &
    PIDS+=($!)
fi
if [ "${FIG1:-0}" = 1 ]; then
    timeout "$(left)" python3 -m alexnet experiment relu-vs-tanh --data $DATA --device cuda --batch-seeds --jobs 4 \
        --out $E/relu-vs-tanh > "$OUT/relu-vs-tanh.log" 2>&1 &
    PIDS+=($!)
fi
timeout "$(left)" python3 -m alexnet experiment ablations --data $DATA --device cuda --batch-seeds \
    --jobs "${AB_JOBS:-4}" ${AB_VARIANTS:+--variants $AB_VARIANTS} --out $E/ablations-30ep > "$OUT/ablations.log" 2>&1
for p in "${PIDS[@]}"; do wait "$p"; done
sleep 1
kill $SMI $PACK 2>/dev/null
tar czf "$OUT/exp.tgz" -C /tmp exp
tail -n 30 "$OUT"/*.log
