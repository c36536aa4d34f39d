"""Launch configurations of the fused selected-part kernel, measured in the whole pipeline.

    python scripts/dev/tune_triton_moba.py --size 524288 --seqs 2 --chunk 128 --topk 8

For each configuration: ``moba_attn_varlen`` forward and backward times (CUDA events, median of
``--iters`` after a warm-up), peak memory, and the largest difference of the output and
gradients from the first configuration's (tile sizes change only the summation order).
Inputs: bf16, Hq 16, Hkv 4, D 128, random.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from moba_dist import moba_attn_varlen  # noqa: E402
from moba_dist.kernels import triton_moba as tm  # noqa: E402

CONFIGS = {  # changes from SelConfig's defaults
    "default": {},
    "b32x128w4": dict(bwd_num_warps=4),
    "b16x128": dict(bwd_block_m=16),
    "b64x128": dict(bwd_block_m=64),
    "b32x64": dict(bwd_block_n=64),
    "win4g": dict(max_partial_bytes=4 << 30),
    "win12g": dict(max_partial_bytes=12 << 30),
    "f32x128": dict(block_m=32, block_n=128),
    "f64x64w8": dict(num_warps=8),
    "f128x64w8s3": dict(block_m=128, num_warps=8, num_stages=3),
    "f128x128w8": dict(block_m=128, block_n=128, num_warps=8),
    "f128x64w8s3+b64x128": dict(block_m=128, num_warps=8, num_stages=3, bwd_block_m=64),
    "f128x64w8s3+b128x128": dict(block_m=128, num_warps=8, num_stages=3, bwd_block_m=128),
    "f128x64w8s3+runs64": dict(block_m=128, num_warps=8, num_stages=3, fused_dq_runs=64),
    "varlen": None,  # the varlen backend instead of the fused kernel, for comparison
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=524288)
    ap.add_argument("--seqs", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    total = a.size * a.seqs
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(total, 16, 128, device=dev, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(total, 4, 128, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(2))
    go = torch.randn_like(q)
    cu = torch.arange(0, total + 1, a.size, dtype=torch.int32, device=dev)
    rows, first = [], None
    for name in a.configs.split(","):
        os.environ["MOBA_DIST_SELECTED_KERNEL"] = "varlen" if CONFIGS[name] is None else "triton"
        tm.DEFAULT_CONFIG = tm.SelConfig(**(CONFIGS[name] or {}))
        fwd, bwd = [], []
        try:
            for it in range(a.iters + 1):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                torch.cuda.reset_peak_memory_stats(dev)
                e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
                e[0].record()
                out = moba_attn_varlen(*leaves, cu, a.size, a.chunk, a.topk)
                e[1].record()
                out.backward(go)
                e[2].record()
                torch.cuda.synchronize()
                if it:
                    fwd.append(e[0].elapsed_time(e[1]))
                    bwd.append(e[1].elapsed_time(e[2]))
        except Exception as ex:  # a configuration that does not fit or compile
            print(f"{name}: failed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
            continue
        res = [out.detach()] + [t.grad for t in leaves]
        if first is None:
            first = res
        diff = max((x.float() - y.float()).abs().max().item() for x, y in zip(res, first))
        row = dict(config=name, fwd_ms=round(statistics.median(fwd), 1),
                   bwd_ms=round(statistics.median(bwd), 1),
                   peak_gib=round(torch.cuda.max_memory_allocated(dev) / 2**30, 2), max_diff=diff,
                   **(CONFIGS[name] or {}))
        row["total_ms"] = round(row["fwd_ms"] + row["bwd_ms"], 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del out, leaves, res
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
