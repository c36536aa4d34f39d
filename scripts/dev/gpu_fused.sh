#!/usr/bin/env bash
# One-GPU device run for the fused selected-part kernel: GPU tests, then the bench of
# moba_attn_varlen (two 512K sequences) with the fused Triton kernel and with the varlen backend.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 240 python -m pytest -q -m gpu -x tests/test_triton_moba.py tests/test_fused_selected.py 2>&1 | tail -15 \
  | tee "$OUT/pytest.txt"
SIZES=${SIZES:-524288}
MOBA_DIST_SELECTED_KERNEL=triton timeout 300 python scripts/bench.py --sizes "$SIZES" --seqs 2 \
  --configs ${CONFIGS:-128:8,4096:12} --anchors ${ANCHORS:-fa2,cudnn} --iters 2 --profile \
  --out-dir "$OUT/triton" 2>&1 | grep -v -i warn | tail -12
MOBA_DIST_SELECTED_KERNEL=varlen timeout 200 python scripts/bench.py --sizes "$SIZES" --seqs 2 \
  --configs 128:8 --anchors "" --iters 2 --out-dir "$OUT/varlen" 2>&1 | grep -v -i warn | tail -5
