#!/usr/bin/env bash
# The training example on the GPUs of one host (device tool, carry .wheels): a learning run of
# MoBA and of full attention at 4K tokens per held-out sequence, context-parallel over all GPUs,
# and one PNG of their curves. Results under $OUT/learn_{moba,full}, $OUT/learn_curves.png.
#   bash scripts/train_gpu.sh            (STEPS, SEQ override; LEARN_ARGS adds flags)
#
# The model and task are the CPU preset's (1 layer, hidden 128; 4 key-value pairs, chance 1/16)
# with 8x the sequence length and 4x the batch: 16 packed sequences of 32..4096 tokens per step
# (the short ones teach the lookup, the long ones demand it across the context). MoBA chunk 64
# top-k 4: a query reads at most 256 keys, 1/16 of a held-out sequence.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/dev/gpu_setup.sh
W=$(nvidia-smi -L | wc -l)
SEQ=${SEQ:-4096}
ARGS=(--preset gpu --seq-len "$SEQ" --min-seq-len 32 --batch 16 --pairs 4 --queries 4 --keys 4
      --values 16 --filler 16 --layers 1 --hidden 128 --heads 8 --kv-heads 4 --intermediate 384
      --moba-chunk 64 --moba-topk 4 --lr 3e-3 --warmup 20 --steps "${STEPS:-400}" --eval-every 25
      --eval-batches 4 --no-checkpointing --loss-chunk 4096 --rope-theta 10000 ${LEARN_ARGS:-})
for attn in moba full; do
  echo "== learn_$attn: torchrun --nproc-per-node $W scripts/train.py ${ARGS[*]} --attn $attn"
  timeout "${LIMIT:-200}" torchrun --nproc-per-node "$W" scripts/train.py "${ARGS[@]}" --attn "$attn" \
    --out-dir "$OUT/learn_$attn" > "$OUT/learn_$attn.log" 2> "$OUT/learn_$attn.err" \
    || { echo "!! learn_$attn failed"; grep -v -E '^W[0-9]{4}|it/s|s/it' "$OUT/learn_$attn.err" | tail -20; }
  tail -2 "$OUT/learn_$attn.log"
done
python scripts/train_log.py "$OUT/learn_curves.png" "$OUT/learn_moba:MoBA 64/4" "$OUT/learn_full:full attention"
