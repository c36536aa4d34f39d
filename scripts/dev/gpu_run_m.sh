#!/usr/bin/env bash
# Device run M (one GPU, ~7 min): decode and cuDNN GPU tests, the 1M prefill against flash-attn
# (run-length key segments), the decode benchmark at 64K-1M with a launch sweep and each kernel's
# time (selection by torch.topk, merge split over d), then 2 x 512K against FA2. The log is
# written to $OUT as it goes (a run cut off by its limit keeps what it printed).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/m; mkdir -p $W; LOG=$OUT/run_m.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python -m pytest -q -m gpu tests/test_triton_decode.py tests/test_cudnn_gpu.py -k "decode or in_place" \
  > $W/pytest_gpu.log 2>&1; echo "pytest rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" $W/pytest_gpu.log | tail -8 | cut -c1-300
timeout 90 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors flash --iters 2 \
  --forward-only --out-dir $W/p1m > $W/p1m.log 2>&1; echo "prefill rc=$?"; grep -E "^method=|Error" $W/p1m.log | cut -c1-220
timeout 90 python scripts/bench_decode.py --iters 50 --sweep --profile > $W/decode.log 2>&1; echo "decode rc=$?"
grep -E "1024K|\| (4096|128)/" $W/decode.log | cut -c1-160
[ -n "${SKIP_512K:-}" ] || timeout 170 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 --iters 2 \
  --out-dir $W/b512 > $W/b512.log 2>&1; echo "bench rc=$?"; grep -E "^method=|Error" $W/b512.log | cut -c1-220
} > $LOG 2>&1
cp $W/pytest_gpu.log $W/decode.log $OUT/ 2>/dev/null
cat $W/p1m/results.md $W/b512/results.md > $OUT/results.md 2>/dev/null
cat $LOG
