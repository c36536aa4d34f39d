#!/usr/bin/env bash
# One 4-GPU device run: CP MoBA check + benchmark, then ring benchmarks.
# Usage (device tool, carry .wheels): bash scripts/dev/gpu_multi.sh [cp|ring-small|ring-1m|all]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
W=$(nvidia-smi -L | wc -l)
what=${1:-all}
quiet() { grep -v -E '^W[0-9]{4}|Warning|warnings.warn|^\*+$|OMP_NUM_THREADS'; }
if [ "$what" = cp ] || [ "$what" = all ]; then
  nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
  torchrun --nproc-per-node "$W" scripts/dev/bench_cp.py --out "$OUT/bench_cp.md" 2>&1 | quiet | tee "$OUT/bench_cp.log"
fi
if [ "$what" = ring-small ] || [ "$what" = all ]; then
  torchrun --nproc-per-node "$W" scripts/dev/bench_ring.py --sizes 131072,262144,524288 \
    --out "$OUT/bench_ring_small.md" 2>&1 | quiet | tee "$OUT/bench_ring_small.log"
fi
if [ "$what" = ring-1m ] || [ "$what" = all ]; then
  torchrun --nproc-per-node "$W" scripts/dev/bench_ring.py --sizes 1048576 --check-size 0 \
    --out "$OUT/bench_ring_1m.md" 2>&1 | quiet | tee "$OUT/bench_ring_1m.log"
fi
