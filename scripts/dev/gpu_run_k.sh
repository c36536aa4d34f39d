#!/usr/bin/env bash
# Device run K (one GPU, ~7 min): the training-step A/B (gpu_ab_train.sh: HEAD against the older
# commit unpacked in .ab/old; prepare as its header says, carry [".wheels", ".ab"]), then the
# decode benchmark at 1M with each kernel's device time. At most 8 files come back to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
bash scripts/dev/gpu_ab_train.sh
source scripts/dev/gpu_setup.sh
timeout 120 python scripts/bench_decode.py --iters 50 --profile > /tmp/decode_k.log 2>&1
echo "decode rc=$?"; cp /tmp/decode_k.log "$OUT/decode_k.log"
grep -E "1024K|\| (4096|128)/" /tmp/decode_k.log | cut -c1-160
