#!/usr/bin/env bash
# Device run L (one GPU, ~9 min): GPU tests, bench.py 2 x 512K (128/8 and 4096/12 against FA2,
# same run) and the 1M prefill against flash-attn with profiles (as run I), then the 1M 4096/12
# prefill's memory sites (memory_profile.py) and the same prefill with its key segments gathered
# per batch (MOBA_DIST_KV_IN_PLACE=0, the path before they were read in place). At most 8 files
# come back.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
W=/tmp/l; mkdir -p $W; LOG=$OUT/run_l.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python -m pytest -q -m gpu tests/test_fused_selected.py tests/test_triton_moba.py tests/test_cudnn_gpu.py \
  tests/test_triton_gate.py tests/test_triton_decode.py tests/test_compile.py tests/test_step_plan.py tests/test_merge.py \
  > $W/pytest_gpu.log 2>&1; echo "pytest rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" $W/pytest_gpu.log | tail -8 | cut -c1-300
timeout 170 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 --iters 2 --profile \
  --out-dir $W/b512 > $W/b512.log 2>&1; echo "bench rc=$?"; grep -E "^method=|Error" $W/b512.log | cut -c1-220
timeout 100 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors flash --iters 2 \
  --forward-only --profile --out-dir $W/p1m > $W/p1m.log 2>&1; echo "prefill rc=$?"; grep -E "^method=|Error" $W/p1m.log | cut -c1-220
timeout 90 python scripts/memory_profile.py op --forward-only --tokens 1048576 --hq 16 --hkv 4 --configs 4096:12 \
  --out $W/prefill_memory.md > $W/memprof.log 2>&1; echo "memory_profile rc=$?"; head -40 $W/prefill_memory.md
MOBA_DIST_KV_IN_PLACE=0 timeout 60 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12 \
  --anchors "" --iters 2 --forward-only --out-dir $W/p1m_gather > $W/p1m_gather.log 2>&1; echo "prefill gather rc=$?"
grep -E "^method=|Error" $W/p1m_gather.log | cut -c1-220
} > $LOG 2>&1
cp $W/pytest_gpu.log $OUT/; cp $W/b512/profile_4096_12_r0.txt $OUT/profile_512k_4096_12.txt
cp $W/b512/profile_128_8_r0.txt $OUT/profile_512k_128_8.txt; cp $W/p1m/profile_128_8_r0.txt $OUT/profile_1m_128_8.txt
cp $W/p1m/profile_4096_12_r0.txt $OUT/profile_1m_4096_12.txt; cp $W/prefill_memory.md $OUT/ 2>/dev/null
cat $W/b512/results.md $W/p1m/results.md > $OUT/results.md 2>/dev/null
cat $LOG
