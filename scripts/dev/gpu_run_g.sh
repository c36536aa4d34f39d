#!/usr/bin/env bash
# Device run G (one GPU, ~7 min): torch.profiler breakdowns (bench.py --profile) of 2 x 512K
# fwd+bwd at 128/8 and of the 1M prefill at 4096/12 and 128/8, then scripts/generate_gpu.sh
# (generation end to end) with a shorter training.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
timeout 100 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8 --anchors "" --iters 2 --profile \
  --out-dir "$OUT/prof_512k" > "$OUT/prof_512k.log" 2>&1; echo "prof 512k rc=$?"; grep -E "^method=" "$OUT/prof_512k.log" | cut -c1-200
timeout 120 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors "" --iters 2 \
  --forward-only --profile --out-dir "$OUT/prof_1m" > "$OUT/prof_1m.log" 2>&1; echo "prof 1m rc=$?"; grep -E "^method=" "$OUT/prof_1m.log" | cut -c1-200
rm -f "$OUT"/prof_*/bench.png
STEPS=${STEPS:-300} LIMIT=${LIMIT:-100} timeout 330 bash scripts/generate_gpu.sh 2>&1 | tail -25
