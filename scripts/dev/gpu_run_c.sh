#!/usr/bin/env bash
# Device run C (one GPU, ~6 min): GPU tests (host syncs, fused/varlen/cuDNN kernels), train.py
# train.py at 1M (MoBA), eager vs --compile at 256K, bench.py 2 x 512K 128/8 against FA2.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 100 python -m pytest -q -m gpu tests/test_fused_selected.py tests/test_triton_moba.py tests/test_cudnn_gpu.py \
  tests/test_triton_gate.py tests/test_triton_decode.py tests/test_compile.py tests/test_step_plan.py > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/pytest_gpu.log" | tail -6
timeout 130 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 1048576 --steps 2 --attn moba \
  --out-dir /tmp/t1m > "$OUT/train_moba_1048576.log" 2>&1; echo "train 1M rc=$?"
grep -E "peak memory|^\[train\] step" "$OUT/train_moba_1048576.log" | cut -c1-200; grep -h -A3 "OutOfMemory\|Error" "$OUT/train_moba_1048576.log" | head -4 | cut -c1-300
for mode in eager compile; do
  extra=""; [ $mode = compile ] && extra="--compile"
  timeout 75 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 262144 --steps 3 --attn moba $extra \
    --out-dir /tmp/tc_$mode > "$OUT/train_${mode}_262144.log" 2>&1; echo "$mode rc=$?"
  grep -E "peak memory|^\[train\] step" "$OUT/train_${mode}_262144.log" | cut -c1-200; cp /tmp/tc_$mode/summary.json "$OUT/summary_${mode}.json" 2>/dev/null
done
timeout 100 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8 --anchors fa2 \
  --iters 2 --out-dir /tmp/b512 > "$OUT/bench_512k.log" 2>&1; grep -E "^method=" "$OUT/bench_512k.log" | cut -c1-200
