#!/usr/bin/env bash
# Device run R (one GPU, ~6 min): the attention op after the seventh session's backward changes
# (plan_pairs' 16-bit sort and searchsorted bounds, delta in one Triton pass), against FA2 in the
# same run, and the commit before them (.ab/base) at 128/8 for an A/B on the same machine;
# then 1M prefill (forward only) against FA2. Prepare here, then run with carry [".wheels", ".ab"]:
#   rm -rf .ab && mkdir -p .ab/base && git archive 77518b8 | tar -x -C .ab/base
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
ROOT=$PWD; W=/tmp/r; mkdir -p $W; LOG=$OUT/run_r.log
bench() {  # name dir timeout args...
  local name=$1 dir=$2 t=$3; shift 3
  ( cd "$dir" && export PYTHONPATH=/tmp/site:$dir
    timeout $t python scripts/bench.py "$@" --out-dir $W/$name > $W/$name.log 2>&1; echo "$name rc=$?" )
  grep -E "^method=|Error|error" $W/$name.log | cut -c1-240
}
{
timeout 150 python -m pytest -q -m gpu tests/test_triton_moba.py tests/test_fused_selected.py -x 2>&1 | tail -3
bench b512 $ROOT 200 --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2 --iters 2
[ -d .ab/base/moba_dist ] && bench b512_base $ROOT/.ab/base 90 --sizes 524288 --seqs 2 --configs 128:8 --anchors "" --iters 2
bench p1m $ROOT 200 --sizes 1048576 --seqs 1 --configs 128:8,4096:12 --anchors fa2 --iters 2 --forward-only
} > $LOG 2>&1
cp $W/*.log $OUT/ 2>/dev/null
cat $LOG
