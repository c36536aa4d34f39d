#!/usr/bin/env bash
# Device A/B of the training step (one GPU, ~6 min): this checkout against an older commit
# unpacked in .ab/old, each running train.py --preset gpu at 256K (4 steps, per-step lines) and
# bench.py on the attention op alone at the training shape (256K, 8 q / 2 kv heads, 4096/12).
# Prepare here, then run with carry [".wheels", ".ab"]:
#   rm -rf .ab && mkdir -p .ab/old && git archive 772e4a7 | tar -x -C .ab/old
#   grep -qx '/.ab/' .git/info/exclude || echo /.ab/ >> .git/info/exclude
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
ROOT=$PWD
for side in new old; do
  dir=$ROOT; [ $side = old ] && dir=$ROOT/.ab/old
  [ -d "$dir/moba_dist" ] || { echo "$side: no checkout at $dir"; continue; }
  ( cd "$dir" && export PYTHONPATH=/tmp/site:$dir
    timeout 60 python scripts/bench.py --sizes 262144 --seqs 1 --hq 8 --hkv 2 --configs 4096:12 --anchors "" \
      --iters 3 --out-dir /tmp/ab_bench_$side > /tmp/ab_bench_$side.log 2>&1; echo "$side bench rc=$?"
    grep -E "^method=" /tmp/ab_bench_$side.log | cut -c1-200
    timeout 110 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 262144 --steps 4 --attn moba \
      --out-dir /tmp/ab_train_$side > /tmp/ab_train_$side.log 2>&1; echo "$side train rc=$?"
    grep -E "^\[train\] step|peak memory" /tmp/ab_train_$side.log | cut -c1-160 )
done 2>&1 | tee "$OUT/ab_train.log"
