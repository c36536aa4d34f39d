#!/usr/bin/env bash
# Device run E (one GPU, ~5 min): train.py at 1M (MoBA, --mlp-chunk default), eager vs --compile at 256K.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
timeout 140 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 1048576 --steps 2 --attn moba \
  --out-dir /tmp/t1m > "$OUT/train_moba_1048576.log" 2>&1; echo "train 1M rc=$?"
grep -E "peak memory|^\[train\] step" "$OUT/train_moba_1048576.log" | cut -c1-200; grep -h -A3 "OutOfMemory\|Error" "$OUT/train_moba_1048576.log" | head -4 | cut -c1-300
cp /tmp/t1m/summary.json "$OUT/summary_moba_1048576.json" 2>/dev/null
for mode in eager compile; do
  extra=""; [ $mode = compile ] && extra="--compile"
  timeout 90 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 262144 --steps 4 --attn moba $extra \
    --out-dir /tmp/tc_$mode > "$OUT/train_${mode}_262144.log" 2>&1; echo "$mode rc=$?"
  grep -E "peak memory|^\[train\] step" "$OUT/train_${mode}_262144.log" | cut -c1-200; cp /tmp/tc_$mode/summary.json "$OUT/summary_${mode}.json" 2>/dev/null
  grep -h -A3 "Error" "$OUT/train_${mode}_262144.log" | head -4 | cut -c1-300
done
