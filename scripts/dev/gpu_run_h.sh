#!/usr/bin/env bash
# Device run H (one GPU, ~7 min): torch.profiler breakdowns (bench.py --profile) of 2 x 512K
# fwd+bwd at 128/8 and of the 1M prefill at 4096/12 and 128/8, the prefill memory sites
# (memory_profile.py), then generation end to end (scripts/generate_gpu.sh, shorter training).
# Everything is written under /tmp/h and at most 8 files are copied to $OUT (the device tool
# returns no more).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/h; mkdir -p $W; LOG=$OUT/run_h.log
{
timeout 100 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8 --anchors "" --iters 2 --profile \
  --out-dir $W/prof_512k > $W/prof_512k.log 2>&1; echo "prof 512k rc=$?"; grep -E "^method=" $W/prof_512k.log
timeout 120 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors "" --iters 2 \
  --forward-only --profile --out-dir $W/prof_1m > $W/prof_1m.log 2>&1; echo "prof 1m rc=$?"; grep -E "^method=" $W/prof_1m.log
timeout 100 python scripts/memory_profile.py op --forward-only --tokens 1048576 --hq 16 --hkv 4 --configs 4096:12,128:8 \
  --out $OUT/prefill_1m_memory.md > $W/mem.log 2>&1; echo "memory profile rc=$?"; tail -3 $W/mem.log | cut -c1-300
OUT=$W/gen STEPS=${STEPS:-300} LIMIT=${LIMIT:-100} timeout 330 bash scripts/generate_gpu.sh 2>&1 | grep -v -i "leak\|nanobind" | tail -25
} > $LOG 2>&1
cp $W/prof_512k/profile_128_8_r0.txt $OUT/profile_512k_128_8.txt
cp $W/prof_1m/profile_4096_12_r0.txt $OUT/profile_1m_4096_12.txt
cp $W/prof_1m/profile_128_8_r0.txt $OUT/profile_1m_128_8.txt
cp $W/gen/generate/generate_results.json $W/gen/generate/generate_accuracy.png $OUT/ 2>/dev/null
cat $W/gen/check_generate*.json > $OUT/check_generate.json 2>/dev/null
cat $LOG
