#!/usr/bin/env bash
# Device run J (one GPU, ~5 min): the merge kernel's GPU test, train.py at 1M (MoBA), eager vs
# --compile at 256K. At most 8 files come back to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
LOG=$OUT/run_j.log
{
timeout 60 python -m pytest -q -m gpu tests/test_merge.py 2>&1 | tail -2
timeout 150 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 1048576 --steps 2 --attn moba \
  --out-dir /tmp/t1m > /tmp/train_1m.log 2>&1; echo "train 1M rc=$?"
grep -E "peak memory|^\[train\] step" /tmp/train_1m.log | cut -c1-200; grep -h -A3 "OutOfMemory\|Error" /tmp/train_1m.log | head -4 | cut -c1-300
cp /tmp/t1m/summary.json $OUT/summary_moba_1048576.json 2>/dev/null
for mode in eager compile; do
  extra=""; [ $mode = compile ] && extra="--compile"
  timeout 100 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 262144 --steps 4 --attn moba $extra \
    --out-dir /tmp/tc_$mode > /tmp/train_$mode.log 2>&1; echo "$mode rc=$?"
  grep -E "peak memory|^\[train\] step" /tmp/train_$mode.log | cut -c1-200; cp /tmp/tc_$mode/summary.json $OUT/summary_$mode.json 2>/dev/null
  grep -h -A3 "Error" /tmp/train_$mode.log | head -4 | cut -c1-300
done
} > $LOG 2>&1
cat $LOG
