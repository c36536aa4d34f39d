#!/usr/bin/env bash
# Device run P (one GPU, ~5 min): train.py --preset gpu at 256K with the default selected kernel
# (varlen/cuDNN for 4096-key blocks) against the fused Triton kernel, then 2 x 512K 128/8 against
# FA2 (dq sums at 64 rows per program).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/p; mkdir -p $W; LOG=$OUT/run_p.log
{
for kern in auto triton; do
  MOBA_DIST_SELECTED_KERNEL=$kern timeout 110 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 262144 \
    --steps 4 --attn moba --out-dir $W/t_$kern > $W/train_$kern.log 2>&1; echo "$kern rc=$?"
  grep -E "peak memory|^\[train\] step" $W/train_$kern.log | cut -c1-160
done
timeout 120 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8 --anchors fa2 --iters 2 \
  --out-dir $W/b512 > $W/b512.log 2>&1; echo "bench rc=$?"; grep -E "^method=|Error" $W/b512.log | cut -c1-220
} > $LOG 2>&1
cp $W/train_auto.log $W/train_triton.log $OUT/ 2>/dev/null
cat $LOG
