#!/usr/bin/env bash
# Diagnosis run (one GPU): tensors left in reference cycles by one call, where the 1M prefill's
# memory goes, and why train.py at 1M fails. Carry .wheels.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
timeout 90 python scripts/dev/gc_cycles.py --tokens 262144 > "$OUT/gc_cycles.log" 2>&1; echo "gc rc=$?"; cut -c1-600 "$OUT/gc_cycles.log" | tail -8
timeout 120 python scripts/memory_profile.py op --forward-only --tokens 1048576 --hq 16 --hkv 4 \
  --configs 4096:12,128:8 --out "$OUT/prefill_profile.md" > "$OUT/prefill_profile.log" 2>&1; echo "prefill rc=$?"
grep -E "^## |left allocated" "$OUT/prefill_profile.md" | cut -c1-300
timeout 150 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 1048576 --steps 2 --attn moba \
  --out-dir /tmp/train_1m > "$OUT/train_1m.log" 2>&1; echo "train1m rc=$?"
grep -v "^\[rank0\]:  " "$OUT/train_1m.log" | tail -15 | cut -c1-300
