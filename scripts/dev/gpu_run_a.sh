#!/usr/bin/env bash
# Device run A (one GPU, ~9 min): reference cycles, where the 1M prefill's memory goes, the 1M
# prefill against flash-attn, train.py at 1M with MoBA, decode with a launch-config sweep.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"; git log --oneline -1 2>/dev/null | tee -a "$OUT/gpu.txt"
timeout 80 python scripts/dev/gc_cycles.py --tokens 262144 > "$OUT/gc_cycles.log" 2>&1; echo "gc rc=$?"; cut -c1-700 "$OUT/gc_cycles.log" | tail -6
timeout 100 python scripts/memory_profile.py op --forward-only --tokens 1048576 --hq 16 --hkv 4 \
  --configs 4096:12,128:8 --out "$OUT/prefill_profile.md" > "$OUT/prefill_profile.log" 2>&1; echo "prefill profile rc=$?"
grep -E "^## |left allocated|^\| [0-9]" "$OUT/prefill_profile.md" | head -40 | cut -c1-200
timeout 80 python scripts/bench.py --sizes 1048576 --seqs 1 --configs 4096:12,128:8 --anchors flash \
  --iters 2 --forward-only --out-dir "$OUT/prefill_1m" > "$OUT/prefill_1m.log" 2>&1; echo "prefill rc=$?"; grep -E "^method=|^moba|^flash|^\|" "$OUT/prefill_1m.log" | cut -c1-200
timeout 130 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 1048576 --steps 2 --attn moba \
  --out-dir /tmp/train_1m > "$OUT/train_1m.log" 2>&1; echo "train1m rc=$?"
grep -E "^\[train\]" "$OUT/train_1m.log" | tail -5 | cut -c1-250; grep -v "^\[rank0\]:  " "$OUT/train_1m.log" | grep -B2 -A8 "Error\|Traceback" | tail -14 | cut -c1-300
timeout 100 python scripts/bench_decode.py --sweep > "$OUT/decode.log" 2>&1; echo "decode rc=$?"; grep "|" "$OUT/decode.log" | head -30 | cut -c1-200
