#!/usr/bin/env bash
# One device run of everything issue 15/16 measure on one GPU, in priority order, each step with
# its own time limit (a session's device time is short): train.py MoBA at 512K, MoBA and full at
# 256K (snapshot, layer timeline), bench.py at 2 x 512K, the decode benchmark, the 1M prefill,
# train.py MoBA at 1M. Carry .wheels.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
train() {  # tag, limit, then train.py arguments
  local tag=$1 limit=$2; shift 2
  timeout "$limit" python scripts/train.py --preset gpu --eval-batches 1 "$@" \
    --out-dir "/tmp/train_$tag" > "$OUT/train_$tag.log" 2>&1
  echo "== $tag rc=$? $(grep -h 'peak memory per rank' "$OUT/train_$tag.log" | cut -c1-160)"
  grep -h '^\[train\] step' "$OUT/train_$tag.log"; cp "/tmp/train_$tag/summary.json" "$OUT/summary_$tag.json" 2>/dev/null
  grep -A30 Traceback "$OUT/train_$tag.log" | grep -v "^\[rank0\]:  " | tail -4 | cut -c1-240
}
train moba_524288 100 --seq-len 524288 --steps 2 --attn moba
for attn in moba full; do
  train "${attn}_262144" 110 --seq-len 262144 --steps 3 --attn "$attn" --memory-snapshot "/tmp/snap_$attn.pickle"
  cp "/tmp/snap_$attn.pickle.md" "$OUT/snapshot_train_${attn}_262144.md" 2>/dev/null
  cp "/tmp/snap_$attn.pickle.layers.md" "$OUT/layers_train_${attn}_262144.md" 2>/dev/null
done
timeout 130 python scripts/bench.py --sizes 524288 --seqs 2 --configs 128:8,4096:12 --anchors fa2,flash \
  --iters 2 --out-dir "$OUT/bench_512k" > "$OUT/bench_512k.log" 2>&1; grep -E "^method=|^moba|^flash|^fa2" "$OUT/bench_512k.log" | cut -c1-200
timeout 70 python scripts/bench_decode.py > "$OUT/decode.log" 2>&1; grep "|" "$OUT/decode.log" | head -14 | cut -c1-200
timeout 70 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors flash \
  --iters 2 --forward-only --out-dir "$OUT/prefill_1m" > "$OUT/prefill_1m.log" 2>&1; grep -E "^method=|^moba|^flash" "$OUT/prefill_1m.log" | cut -c1-200
train moba_1048576 100 --seq-len 1048576 --steps 2 --attn moba
