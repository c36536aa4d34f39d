#!/usr/bin/env bash
# Device run B (one GPU, ~9 min): the same-run ratios of issue 15 (train.py at 256K MoBA vs
# full, 512K MoBA; bench.py 2 x 512K against FA2) and the GPU test files.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
train() {  # tag, limit, then train.py arguments
  local tag=$1 limit=$2; shift 2
  timeout "$limit" python scripts/train.py --preset gpu --eval-batches 1 "$@" \
    --out-dir "/tmp/train_$tag" > "$OUT/train_$tag.log" 2>&1
  echo "== $tag rc=$? $(grep -h 'peak memory per rank' "$OUT/train_$tag.log" | cut -c1-160)"
  grep -h '^\[train\] step' "$OUT/train_$tag.log"; cp "/tmp/train_$tag/summary.json" "$OUT/summary_$tag.json" 2>/dev/null
  grep -A30 Traceback "$OUT/train_$tag.log" | grep -v "^\[rank0\]:  " | tail -4 | cut -c1-240
}
train moba_262144 80 --seq-len 262144 --steps 3 --attn moba
train full_262144 100 --seq-len 262144 --steps 3 --attn full
train moba_524288 80 --seq-len 524288 --steps 2 --attn moba
timeout 130 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 \
  --iters 2 --out-dir "$OUT/bench_512k" > "$OUT/bench_512k.log" 2>&1; grep -E "^method=|^moba|^fa2|^\|" "$OUT/bench_512k.log" | cut -c1-200
timeout 120 python -m pytest -q -x -m gpu tests/test_fused_selected.py tests/test_triton_moba.py tests/test_cudnn_gpu.py \
  tests/test_triton_gate.py tests/test_triton_decode.py > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; tail -3 "$OUT/pytest_gpu.log"
