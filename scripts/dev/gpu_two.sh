#!/usr/bin/env bash
# One multi-GPU device run (device tool, carry .wheels): the bench against the anchors at 256K
# tokens per GPU, then the invariance and determinism check. Results under $OUT.
#   bash scripts/dev/gpu_two.sh            (CONFIGS, ANCHORS, ITERS override the defaults)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=$(nvidia-smi -L | wc -l)
run() { local t=$1; shift; timeout "$t" torchrun --nproc-per-node "$W" "$@" 2>&1 | grep -v -E '^W[0-9]{4}|Warning|warn\(|^\*+$|OMP_NUM'; }
run 300 scripts/bench.py --sizes $((262144 * W)) --configs "${CONFIGS:-128:8,4096:12}" \
  --anchors "${ANCHORS:-zigzag,ring}" --iters "${ITERS:-2}" --profile --out-dir "$OUT/bench" | grep "^|"
run 150 scripts/dev/check_invariance.py --size 262144 --out "$OUT/invariance.txt" | tail -3
