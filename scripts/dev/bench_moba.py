"""Single-GPU forward+backward time and peak memory: moba_attn_varlen vs full causal attention.

    python scripts/dev/bench_moba.py [--sizes 32768,131072,524288] [--configs 4096:12,128:8] [--out FILE]
    python scripts/dev/bench_moba.py --cpu --sizes 512 --configs 64:3   # smoke test, no GPU

One sequence of T tokens, Hq 16, Hkv 4, D 128, bf16. Full attention: cuDNN SDPA (K/V expanded to
Hq heads, as it has no GQA) and FlashAttention-2 (PyTorch's bundled kernel, and the flash-attn
package when installed). MoBA: each CUDA backend.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for benchutil
from benchutil import causal_flops, moba_flops, time_fwd_bwd  # noqa: E402

import moba_dist  # noqa: E402
from moba_dist.kernels import get_backend, varlen_attn_with_lse  # noqa: E402


def full_fa2(backend):
    def run(q, k, v):
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        return varlen_attn_with_lse(q, k, v, cu, cu, q.shape[0], q.shape[0], causal=True, backend=backend)[0]
    return run


def full_cudnn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rep = q.shape[1] // k.shape[1]
    qt, kt, vt = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.repeat_interleave(rep, 1),
                                                            v.repeat_interleave(rep, 1)))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)[0].transpose(0, 1)


def moba(backend, chunk, topk):
    def run(q, k, v):
        cu = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        return moba_dist.moba_attn_varlen(q, k, v, cu, q.shape[0], chunk, topk, backend=backend)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,131072,524288")
    ap.add_argument("--configs", default="4096:12,128:8")
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", dest="d", type=int, default=128)
    ap.add_argument("--no-full", action="store_true", help="time MoBA only")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cpu" if a.cpu else "cuda")
    dtype = torch.float32 if a.cpu else torch.bfloat16
    configs = [tuple(map(int, c.split(":"))) for c in a.configs.split(",")]
    cuda_backends = ["torch"] if a.cpu else [b for b in ("aten_flash", "flash_attn")
                                              if _ok(dev, dtype, a.d, b)]
    impls = [(f"full causal, FA2 ({b})", full_fa2(b), None) for b in cuda_backends]
    if a.no_full:
        impls = []
    elif not a.cpu:
        impls.insert(0, ("full causal, cuDNN SDPA", full_cudnn, None))
    for chunk, topk in configs:
        impls += [(f"MoBA chunk {chunk} topk {topk} ({b})", moba(b, chunk, topk), (chunk, topk))
                  for b in cuda_backends]
    lines = ["| T | implementation | fwd+bwd ms | TFLOP/s (useful) | peak GiB |", "|---|---|---|---|---|"]
    for t in map(int, a.sizes.split(",")):
        g = torch.Generator(device=dev).manual_seed(t)
        q, k, v = (torch.randn(t, h, a.d, device=dev, generator=g).to(dtype).requires_grad_()
                   for h in (a.hq, a.hkv, a.hkv))
        go = torch.randn(t, a.hq, a.d, device=dev, generator=g).to(dtype)
        iters = 2 if t >= 500_000 else 3
        for name, fn, cfg in impls:
            try:
                ms, peak = time_fwd_bwd(fn, (q, k, v), go, warmup=1, iters=iters)
            except Exception as e:  # report, keep going (e.g. out of memory)
                lines.append(f"| {t} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | |")
                torch.cuda.empty_cache() if not a.cpu else None
                print(lines[-1], flush=True)
                continue
            flops = causal_flops(t, a.hq, a.d) if cfg is None else moba_flops(t, a.hq, a.d, *cfg)
            lines.append(f"| {t} | {name} | {ms:.1f} | {flops / ms / 1e9:.0f} | {peak:.1f} |")
            print(lines[-1], flush=True)
        del q, k, v, go
    text = "\n".join(lines)
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


def _ok(dev, dtype, d, name):
    try:
        get_backend(dev, dtype, d, name)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
