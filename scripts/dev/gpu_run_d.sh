#!/usr/bin/env bash
# Device run D (one GPU, ~5 min): GPU tests (kernels, step plan host syncs, compile), bench.py
# 2 x 512K (128/8 and 4096/12 against FA2, same run), 1M prefill against flash-attn.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 110 python -m pytest -q -m gpu tests/test_fused_selected.py tests/test_triton_moba.py tests/test_cudnn_gpu.py \
  tests/test_triton_gate.py tests/test_triton_decode.py tests/test_compile.py tests/test_step_plan.py tests/test_merge.py \
  > "$OUT/pytest_gpu.log" 2>&1; echo "pytest rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/pytest_gpu.log" | tail -8 | cut -c1-300
timeout 150 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 \
  --iters 2 --out-dir "$OUT/bench_512k" > "$OUT/bench_512k.log" 2>&1; echo "bench rc=$?"; grep -E "^method=" "$OUT/bench_512k.log" | cut -c1-220
timeout 90 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors flash \
  --iters 2 --forward-only --out-dir "$OUT/prefill_1m" > "$OUT/prefill_1m.log" 2>&1; echo "prefill rc=$?"; grep -E "^method=" "$OUT/prefill_1m.log" | cut -c1-220
