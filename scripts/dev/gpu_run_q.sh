#!/usr/bin/env bash
# Device run Q (one GPU, ~6 min): where a --compile training step at 64K spends its time (run O
# saw no step finish in 150 s; run E at 772e4a7 compiled 256K steps as fast as eager). This
# checkout with Python stack dumps every 40 s (scripts/dev/stack_dump.py) and recompile logs,
# then the run E commit unpacked in .ab/old (carry [".wheels", ".ab"]; see gpu_ab_train.sh), then this checkout eager.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/dev/gpu_setup.sh
ROOT=$PWD; LOG=$OUT/run_q.log
{
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
TORCH_LOGS=recompiles,graph_breaks timeout 200 python scripts/dev/stack_dump.py $OUT/stacks_new.txt scripts/train.py \
  --preset gpu --eval-batches 1 --seq-len 65536 --steps 3 --attn moba --compile --out-dir /tmp/q_new \
  > $OUT/train_new.log 2>&1 &
pid=$!
for t in 40 80 120 160; do sleep 40; kill -0 $pid 2>/dev/null && { echo "--- dump at ${t}s" >> $OUT/stacks_new.txt; pkill -USR1 -f "^python scripts/dev/stack_dump.py"; }; done
wait $pid; echo "new compile rc=$?"
tr "\r" "\n" < $OUT/train_new.log | grep -oE "\[train\] step.*|\[train\] peak.*|Recompiling.*|- .*guard.*|Graph break in user.*" | cut -c1-220 | head -30
( cd .ab/old && export PYTHONPATH=/tmp/site:$ROOT/.ab/old
  timeout 100 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 65536 --steps 3 --attn moba --compile \
    --out-dir /tmp/q_old > $OUT/train_old.log 2>&1; echo "old compile rc=$?" )
tr "\r" "\n" < $OUT/train_old.log | grep -oE "\[train\] step.*|\[train\] peak.*" | cut -c1-220
timeout 80 python scripts/train.py --preset gpu --eval-batches 1 --seq-len 65536 --steps 3 --attn moba \
  --out-dir /tmp/q_eager > $OUT/train_eager.log 2>&1; echo "new eager rc=$?"
tr "\r" "\n" < $OUT/train_eager.log | grep -oE "\[train\] step.*|\[train\] peak.*" | cut -c1-220
} > $LOG 2>&1
cat $LOG
