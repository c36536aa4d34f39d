#!/usr/bin/env bash
# Device run N (one GPU, ~2.5 min, the last device time of the 4th 12-07 session): the decode
# benchmark with each kernel's time, then the 1M 4096/12 prefill against flash-attn. The log goes
# to $OUT as it is written.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/n; mkdir -p $W; LOG=$OUT/run_n.log
{
timeout 60 python scripts/bench_decode.py --iters 30 --profile > $W/decode.log 2>&1; echo "decode rc=$?"
grep -E "1024K|\| (4096|128)/" $W/decode.log | cut -c1-160
timeout 80 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12 --anchors flash --iters 1 \
  --forward-only --out-dir $W/p1m > $W/p1m.log 2>&1; echo "prefill rc=$?"; grep -E "^method=|Error" $W/p1m.log | cut -c1-220
} > $LOG 2>&1
cp $W/decode.log $OUT/ 2>/dev/null
cat $LOG
