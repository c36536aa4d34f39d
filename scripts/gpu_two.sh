#!/usr/bin/env bash
# One 2-GPU device run: benchmarks against the anchors, the invariance check, the training
# example's GPU preset (512K throughput, MoBA and full) and a short learning run of each.
# Usage (device tool, carry .wheels): bash scripts/gpu_two.sh   (results under $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}; R=/tmp/runs; mkdir -p "$OUT" "$R"
mkdir -p /tmp/site && tar -xJf .wheels/flash_attn-*.tar.xz -C /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
W=$(nvidia-smi -L | wc -l)
run() { local t=$1; shift; timeout "$t" torchrun --nproc-per-node "$W" "$@" 2>&1 | grep -v -E '^W[0-9]{4}|Warning|warn\(|^\*+$|OMP_NUM'; }
run 240 scripts/bench.py --sizes $((262144 * W)) --configs 128:8,4096:12 --anchors zigzag,ring --iters 2 \
  --out-dir "$R/bench" | tail -9
run 120 scripts/check_invariance.py --size 262144 --out "$R/invariance.txt"
run 60 scripts/check_invariance.py --size 262144 --configs 128:8 --deterministic | tail -1
for a in moba full; do
  run 150 scripts/train.py --preset gpu --attn "$a" --steps 3 --out-dir "$R/t512_$a" | tail -2
done
for a in moba full; do
  run 150 scripts/train.py --preset gpu --attn "$a" --seq-len 16384 --steps 150 --eval-every 25 \
    --out-dir "$R/learn_$a" | tail -2
done
cp "$R/bench/results.md" "$OUT/bench2.md"; cp "$R/bench/bench.png" "$OUT/bench2.png"
tar -czf "$OUT/runs.tgz" -C "$R" . 2>/dev/null
ls "$R"/learn_*
