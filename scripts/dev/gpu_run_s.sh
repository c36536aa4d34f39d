#!/usr/bin/env bash
# Device run S (one GPU; two commands of <= 10 min each, carry [".wheels", ".ab"]):
#   bash scripts/dev/gpu_run_s.sh op     # fused GPU tests; 2 x 512K fwd+bwd vs FA2, with an A/B of
#                                        # 128/8 against .ab/base; 1M prefill (4096/12 first, as run M)
#   bash scripts/dev/gpu_run_s.sh train  # train.py --preset gpu, eager and --compile, 64K and 256K,
#                                        # 6 steps each (steps after the first builds compare)
# What changed since run R: the fused backward folds the head-major dk/dv into the self part's in
# one Triton pass (was a mixed-dtype add over transposed rows), and cuDNN shape classes put token
# totals on a grid of >= 32 MiB of accumulator (run Q built graphs in every training step).
# Prepare: rm -rf .ab && mkdir -p .ab/base && git archive 9ea97b0 | tar -x -C .ab/base
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
ROOT=$PWD; W=/tmp/s; mkdir -p $W; LOG=$OUT/run_s_$1.log
bench() {  # name dir timeout args...
  local name=$1 dir=$2 t=$3; shift 3
  ( cd "$dir" && export PYTHONPATH=/tmp/site:$dir
    timeout $t python scripts/bench.py "$@" --out-dir $W/$name > $W/$name.log 2>&1; echo "$name rc=$?" )
  grep -E "^method=|Error|error" $W/$name.log | cut -c1-240
}
steps() { tr "\r" "\n" < "$1" | grep -oE "\[train\] step.*|\[train\] peak.*|Recompiling.*|Graph break in user.*|Error.*" | cut -c1-200 | head -20; }
train() {  # name seq steps timeout extra...
  local name=$1 seq=$2 n=$3 t=$4; shift 4
  timeout $t python scripts/train.py --preset gpu --eval-batches 1 --seq-len $seq --steps $n --attn moba "$@" \
    --out-dir $W/t_$name > $W/train_$name.log 2>&1; echo "$name rc=$?"; steps $W/train_$name.log
}
{
if [ "$1" = op ]; then
  timeout 120 python -m pytest -q -m gpu tests/test_triton_moba.py tests/test_fused_selected.py tests/test_cudnn_gpu.py -x 2>&1 | tail -3
  bench b512 $ROOT 200 --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 --iters 2
  [ -d .ab/base/moba_dist ] && bench b512_base $ROOT/.ab/base 60 --sizes 524288 --seqs 2 --configs 128:8 --anchors "" --iters 2
  bench p1m $ROOT 150 --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors fa2 --iters 2 --forward-only
else
  python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
  train e64 65536 6 90
  TORCH_LOGS=recompiles train c64 65536 6 120 --compile
  train e256 262144 6 150
  TORCH_LOGS=recompiles train c256 262144 6 190 --compile
fi
} > $LOG 2>&1
cp $W/*.log $OUT/ 2>/dev/null
cat $LOG
