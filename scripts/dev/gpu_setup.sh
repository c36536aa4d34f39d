# Source on a device machine: installs the carried wheels (.wheels/, see README "GPU machines")
# into /tmp/site and sets PYTHONPATH and the NCCL settings the benchmarks use.
if [ -d .wheels ]; then
  mkdir -p /tmp/site
  tar -xJf .wheels/flash_attn-*.tar.xz -C /tmp/site 2>/dev/null || true
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARN
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
