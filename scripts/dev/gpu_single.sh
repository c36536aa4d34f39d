#!/usr/bin/env bash
# One single-GPU device run: GPU unit tests, the bf16 correctness check, the MoBA benchmark.
# Usage (device tool, carry .wheels): bash scripts/dev/gpu_single.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, flash_attn; print('torch', torch.__version__, 'flash_attn', flash_attn.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
python3 scripts/dev/gpu_check.py --out "$OUT/gpu_check.md" 2>&1 | tail -8
python3 scripts/dev/bench_moba.py --out "$OUT/bench_moba.md" "$@" 2>&1 | tee "$OUT/bench_moba.log" | grep -v '^|' ; cat "$OUT/bench_moba.md"
