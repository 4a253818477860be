#!/usr/bin/env bash
# The full-size CIFAR-10 experiments in one command on a lent one-GPU machine (run tool), both
# experiments at once: Figure 1 (he init, then paper init) beside the ablations. CIFAR-10
# travels in .data/ (ignored by git, carried by the run tool). Everything lands in /tmp/exp and
# comes back as $OUT/exp.tgz; a second call with the same run directories carried back in
# .data/exp continues them (finished training runs are kept).
set -u
OUT=${OUT:-/tmp/exp-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD/src
DATA=.data/cifar10-jpeg.tar.gz
E=/tmp/exp
mkdir -p $E
[ -d .data/exp ] && cp -r .data/exp/. $E/
END=$((SECONDS + ${LIMIT:-540}))
left() { echo $((END - SECONDS > 5 ? END - SECONDS : 5)); }
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 20 > "$OUT/gpu-utilisation.csv" &
SMI=$!
(
    timeout "$(left)" python3 -m alexnet experiment relu-vs-tanh --data $DATA --device cuda --jobs "${RT_JOBS:-4}" \
        --out $E/relu-vs-tanh
    timeout "$(left)" python3 -m alexnet experiment relu-vs-tanh --data $DATA --device cuda --jobs "${RT_JOBS:-4}" \
        --init paper --out $E/relu-vs-tanh-paper-init
) > "$OUT/relu-vs-tanh.log" 2>&1 &
RT=$!
# Pack what has finished every minute: a call that ends early still brings back its runs.
( while sleep 60; do tar czf "$OUT/exp.tgz.part" -C /tmp exp 2>/dev/null && mv "$OUT/exp.tgz.part" "$OUT/exp.tgz"; done ) &
PACK=$!
timeout "$(left)" python3 -m alexnet experiment ablations --data $DATA --device cuda --jobs "${AB_JOBS:-12}" \
    --out $E/ablations > "$OUT/ablations.log" 2>&1
wait $RT
sleep 1
pkill -f 'multiprocessing.spawn' ; kill $SMI $PACK
tar czf "$OUT/exp.tgz" -C /tmp exp
tail -n 30 "$OUT/relu-vs-tanh.log" "$OUT/ablations.log"
