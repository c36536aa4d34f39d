#!/usr/bin/env bash
# Device run O (one GPU, ~7 min): the decode tests on the GPU (all of tests/test_triton_decode.py:
# the gate's block means, the bf16 cast split), the decode benchmark at 64K-1M with its launch
# sweep and kernel times (candidate merge back in the attention kernel, gate without float64
# divisions, filter and rounds on the live rows only), then train.py --preset gpu eager against
# --compile and against the fused selected kernel (64K tokens, 8 steps each); between them the
# launch sweep of the fused path's merge and dq-sum kernels (scripts/dev/tune_sums.py). The log is written to $OUT as it goes.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/o; mkdir -p $W; LOG=$OUT/run_o.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
{ timeout 90 python -m pytest -q tests/test_triton_decode.py -m "gpu or not gpu"
  timeout 60 python -m pytest -q tests/test_step_plan.py -m gpu; } > $W/pytest_gpu.log 2>&1
echo "pytest rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" $W/pytest_gpu.log | tail -8 | cut -c1-300
timeout 100 python scripts/bench_decode.py --iters 50 --sweep --profile > $W/decode.log 2>&1; echo "decode rc=$?"
grep -E "1024K|\| (4096|128)/" $W/decode.log | cut -c1-120
timeout 60 python scripts/dev/tune_sums.py > $W/sums.md 2>&1; echo "sums rc=$?"; cat $W/sums.md
for mode in eager compile triton; do
  extra=""; [ $mode = compile ] && extra="--compile"
  # triton: the fused selected-part kernel for 4096-key blocks too (no host sync per layer).
  kern=auto; [ $mode = triton ] && kern=triton
  MOBA_DIST_SELECTED_KERNEL=$kern timeout 150 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 65536 --steps 8 --attn moba $extra \
    --out-dir $W/t_$mode > $W/train_$mode.log 2>&1; echo "$mode rc=$?"
  grep -E "peak memory|^\[train\] step" $W/train_$mode.log | cut -c1-160
  grep -h -A3 "Error" $W/train_$mode.log | head -4 | cut -c1-300
done
} > $LOG 2>&1
cp $W/pytest_gpu.log $W/sums.md $W/decode.log $W/train_eager.log $W/train_compile.log $W/train_triton.log $OUT/ 2>/dev/null
cat $LOG
