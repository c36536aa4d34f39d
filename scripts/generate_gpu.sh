#!/usr/bin/env bash
# Generation on one GPU (device tool, carry .wheels): the cached-vs-uncached bf16 check, then
# train.py's learning run (the model and task of scripts/train_gpu.sh) for MoBA and for full
# attention with checkpoints, and scripts/generate.py on both at 1x, 4x and 16x the training
# length. Results: $OUT/check_generate*.json, $OUT/generate/generate_results.{json,md},
# $OUT/generate/generate_accuracy.png, logs beside them.
#   bash scripts/generate_gpu.sh            (STEPS, SEQ override)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/dev/gpu_setup.sh
python3 scripts/dev/check_generate.py --out "$OUT/check_generate.json" 2>&1 | tail -3
python3 scripts/dev/check_generate.py --prompt 65536 --chunk 4096 --topk 12 --batch 1 --steps 16 \
  --out "$OUT/check_generate_4096.json" 2>&1 | tail -3
SEQ=${SEQ:-4096}
ARGS=(--preset gpu --seq-len "$SEQ" --min-seq-len 32 --batch 16 --pairs 4 --queries 4 --keys 4
      --values 16 --filler 16 --layers 1 --hidden 128 --heads 8 --kv-heads 4 --intermediate 384
      --moba-chunk 64 --moba-topk 4 --lr 3e-3 --warmup 20 --steps "${STEPS:-400}" --eval-every 100
      --eval-batches 4 --no-checkpointing --loss-chunk 4096 --rope-theta 10000)
for attn in moba full; do
  timeout "${LIMIT:-200}" torchrun --nproc-per-node 1 scripts/train.py "${ARGS[@]}" --attn "$attn" \
    --out-dir "$OUT/learn_$attn" --ckpt-dir "/tmp/ckpt_$attn" > "$OUT/learn_$attn.log" 2> "$OUT/learn_$attn.err" \
    || { echo "!! learn_$attn failed"; tail -20 "$OUT/learn_$attn.err"; }
  tail -1 "$OUT/learn_$attn.log"
done
python3 scripts/generate.py --ckpt /tmp/ckpt_moba --ckpt /tmp/ckpt_full --label "MoBA 64/4" \
  --label "full attention" --sequences 32 --batch 8 --out-dir "$OUT/generate" \
  > "$OUT/generate.log" 2> "$OUT/generate.err" || tail -20 "$OUT/generate.err"
cat "$OUT/generate/generate_results.md"
