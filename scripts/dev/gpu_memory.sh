#!/usr/bin/env bash
# Device run behind BENCHMARKS.md "Memory": train.py --preset gpu on one GPU, MoBA against full
# attention at 256K (allocation snapshot of the last step) and 512K, then the op alone at the
# training shape. Carry .wheels. Results under $OUT (logs, summary.json, snapshot reports).
#   bash scripts/dev/gpu_memory.sh   (SIZES="262144 524288" and FULL_MAX=524288: no full attention
#   above it; SKIP_OP=1: no op profile)
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$OUT/commit.txt"
train() {  # tag, then train.py arguments
  local tag=$1; shift
  timeout "${LIMIT:-300}" python scripts/train.py --preset gpu --eval-batches 1 "$@" \
    --out-dir "$OUT/train_$tag" > "$OUT/train_$tag.log" 2>&1
  echo "== $tag rc=$? $(grep -h 'peak memory per rank' "$OUT/train_$tag.log" | cut -c1-160)"
  grep -A30 Traceback "$OUT/train_$tag.log" | tail -6 | cut -c1-240
}
for seq in ${SIZES:-262144 524288}; do
  for attn in moba full; do
    if [ "$attn" = full ] && [ "$seq" -gt "${FULL_MAX:-524288}" ]; then continue; fi  # hours per step
    if [ "$seq" = 262144 ]; then
      train "${attn}_$seq" --seq-len "$seq" --steps 3 --attn "$attn" --memory-snapshot "/tmp/snap_$attn.pickle"
      cp "/tmp/snap_$attn.pickle.md" "$OUT/snapshot_train_${attn}_$seq.md" 2>/dev/null
      cp "/tmp/snap_$attn.pickle.layers.md" "$OUT/layers_train_${attn}_$seq.md" 2>/dev/null
    else
      train "${attn}_$seq" --seq-len "$seq" --steps 2 --attn "$attn"
    fi
  done
done
[ -n "${SKIP_OP:-}" ] && exit 0
timeout 200 python scripts/memory_profile.py op --out "$OUT/snapshot_op.md" > "$OUT/op.log" 2>&1
grep -E "^## |^left" "$OUT/snapshot_op.md"; grep -A20 Traceback "$OUT/op.log" | tail -5
