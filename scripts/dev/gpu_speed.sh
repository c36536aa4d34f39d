#!/usr/bin/env bash
# Device run behind BENCHMARKS.md "Speed and memory, one GPU": bench.py fwd+bwd at 2 x 512K and
# the 1M prefill (forward only, no_grad) beside FA2 (PyTorch's, K/V heads repeated) and
# flash-attn (GQA in place); the decode latency at a 1M cache; the GPU test suite. Carry .wheels.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 220 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2,flash \
  --iters 2 --out-dir "$OUT/bench_512k" > "$OUT/bench_512k.log" 2>&1; tail -6 "$OUT/bench_512k.log"
timeout 150 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors fa2,flash \
  --iters 2 --forward-only --out-dir "$OUT/prefill_1m" > "$OUT/prefill_1m.log" 2>&1; tail -6 "$OUT/prefill_1m.log"
timeout 120 python scripts/bench_decode.py > "$OUT/decode.log" 2>&1; tail -14 "$OUT/decode.log" | cut -c1-220
timeout ${TEST_LIMIT:-100} python -m pytest -q -m gpu tests 2>&1 | tail -4
