"""Cached HF generation with MoBACache against uncached decoding, on a GPU in bf16 (or the CPU).

    python scripts/dev/check_generate.py --out $OUT/check_generate.json       # CUDA, bf16
    python scripts/dev/check_generate.py --device cpu --dtype float32 --prompt 300 --chunk 32 --topk 4

A randomly initialized Llama (GQA, hybrid: the last layer full) decodes greedily from a random
prompt longer than ``topk x chunk`` (sparse MoBA) through ``moba_dist.hf.MoBACache``; the same
steps are recomputed by the uncached training-path forward on the whole sequence. Reported: how
many greedy tokens agree before the first difference (bf16 rounding may part them), the largest
logit difference over the agreeing steps, prefill time and the time per decoded token (the decode
kernel being whatever ``moba_dist.hf.cache.moba_decode`` is now). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch", type=int, default=2, help="rows, left-padded to different lengths")
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    import moba_dist.hf
    from moba_dist.hf import cache_kwargs

    moba_dist.hf.register()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(0)
    hidden = args.heads * args.head_dim
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                      num_hidden_layers=args.layers,
                      vocab_size=1024, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                      moba_chunk_size=args.chunk, moba_topk=args.topk,
                      moba_full_attention_layers=[args.layers - 1])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist", dtype=dtype)
    model = model.to(device).eval()
    lengths = [args.prompt - 37 * i for i in range(args.batch)]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 1024, (n,), generator=g) for n in lengths]
    ids = torch.zeros(args.batch, args.prompt, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, args.prompt - len(r):], mask[i, args.prompt - len(r):] = r, 1
    ids, mask = ids.to(device), mask.to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        cache = moba_dist.hf.MoBACache(model.config, max_cache_len=args.prompt + args.steps)
        ck = cache_kwargs(model, cache)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **ck, logits_to_keep=1)
        sync()
        prefill_s = time.perf_counter() - t0
        tokens, logits = [], []
        t0 = time.perf_counter()
        for _ in range(args.steps):
            last = out.logits[:, -1].float()
            logits.append(last)
            tokens.append(last.argmax(-1))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos, **ck)
        sync()
        decode_s = (time.perf_counter() - t0) / args.steps
        rows_report = []
        for i, r in enumerate(rows):
            seq = r[None].to(device)
            agree, worst = 0, 0.0
            for s in range(args.steps):
                want = model(input_ids=seq, use_cache=False, logits_to_keep=1).logits[0, -1].float()
                worst = max(worst, (want - logits[s][i]).abs().max().item())
                if want.argmax().item() != tokens[s][i].item():
                    break
                agree += 1
                seq = torch.cat([seq, tokens[s][i].view(1, 1)], 1)
            rows_report.append({"prompt": len(r), "tokens_agreeing": agree, "max_logit_diff": worst})
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype).split(".")[-1], "chunk": args.chunk, "topk": args.topk,
              "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim,
              "batch": args.batch, "steps": args.steps, "prefill_s": round(prefill_s, 4),
              "decode_ms_per_token": round(decode_s * 1e3, 3), "rows": rows_report}
    print(json.dumps(report, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
