#!/usr/bin/env bash
# Device run Q (one GPU, <= 10 min): train.py --preset gpu --compile against eager at 64K and
# 256K (run O saw no compiled 64K step finish in 150 s; run E at 772e4a7 compiled 256K steps as
# fast as eager). The first compiled run dumps Python stacks every 40 s (scripts/dev/stack_dump.py)
# and logs recompiles; if it is still slow, the run E commit unpacked in .ab/old runs the same
# (carry [".wheels", ".ab"]; see gpu_ab_train.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
ROOT=$PWD; LOG=$OUT/run_q.log
steps() { tr "\r" "\n" < "$1" | grep -oE "\[train\] step.*|\[train\] peak.*|Recompiling.*|- [0-9]+/[0-9]+: .*|Graph break in user.*" | cut -c1-220 | head -30; }
train() {  # name seq steps timeout extra...
  local name=$1 seq=$2 n=$3 t=$4; shift 4
  timeout $t python scripts/train.py --preset gpu --eval-batches 1 --seq-len $seq --steps $n --attn moba "$@" \
    --out-dir /tmp/q_$name > $OUT/train_$name.log 2>&1; echo "$name rc=$?"; steps $OUT/train_$name.log
  cp /tmp/q_$name/summary.json $OUT/summary_$name.json 2>/dev/null
}
{
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
TORCH_LOGS=recompiles,graph_breaks timeout 170 python scripts/dev/stack_dump.py $OUT/stacks_c64.txt scripts/train.py \
  --preset gpu --eval-batches 1 --seq-len 65536 --steps 4 --attn moba --compile --out-dir /tmp/q_c64 \
  > $OUT/train_c64.log 2>&1 &
pid=$!
for t in 40 80 120 160; do
  sleep 40; kill -0 $pid 2>/dev/null || break
  echo "--- dump at ${t}s" >> $OUT/stacks_c64.txt; pkill -USR1 -f "^python scripts/dev/stack_dump.py"
done
wait $pid; echo "c64 rc=$?"; steps $OUT/train_c64.log; cp /tmp/q_c64/summary.json $OUT/summary_c64.json 2>/dev/null
train e64 65536 4 80
if [ -f /tmp/q_c64/summary.json ]; then
  train c256 262144 3 150 --compile
  train e256 262144 3 100
else
  ( cd .ab/old && export PYTHONPATH=/tmp/site:$ROOT/.ab/old
    timeout 100 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 65536 --steps 3 --attn moba --compile \
      --out-dir /tmp/q_old > $OUT/train_old.log 2>&1; echo "old c64 rc=$?" ); steps $OUT/train_old.log
fi
} > $LOG 2>&1
cat $LOG
