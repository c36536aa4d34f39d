"""Context-parallel MoBA on W GPUs: correctness against single-GPU moba_attn_varlen, then
forward+backward time, peak memory and bytes fetched per rank.

    torchrun --nproc-per-node 4 scripts/dev/bench_cp.py [--check-size 262144] [--sizes 262144,1048576]
    torchrun --nproc-per-node 2 scripts/dev/bench_cp.py --cpu --check-size 512 --sizes 1024  # smoke

One sequence; Hq 16, Hkv 4, D 128, bf16; chunk 4096, topk 12 by default. Every rank draws the
same full tensors from one seed and keeps its contiguous slice; for the check each rank also
runs the single-GPU function on the full tensors and compares its slice.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/, for benchutil
from benchutil import init_distributed, moba_flops, time_fwd_bwd  # noqa: E402

import moba_dist  # noqa: E402


def full_inputs(t, a, dev, dtype):
    """q, k, v, dout. With ``--skew``, the keys of ``topk - 1`` blocks near the start stand out
    along one direction every query leans toward, so all queries select the same blocks (like
    attention sinks) and the fetch volume follows the selection, not the sequence length."""
    g = torch.Generator(device=dev).manual_seed(t)
    q, k, v, go = (torch.randn(t, h, a.d, device=dev, generator=g) for h in (a.hq, a.hkv, a.hkv, a.hq))
    if a.skew:
        for j in range(a.topk - 1):
            k[(2 * j + 1) * a.chunk:(2 * j + 2) * a.chunk, :, 0] += 4.0
        q[:, :, 0] += 8.0  # 8 sigma: every query leans the same way
    return [x.to(dtype) for x in (q, k, v, go)]


def _cp(q, k, v, cu, a):
    return moba_dist.moba_attn_varlen_cp(q, k, v, cu, a.chunk, a.topk, backend=a.backend)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-size", type=int, default=262144)
    ap.add_argument("--sizes", default="262144,1048576")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--topk", type=int, default=12)
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", dest="d", type=int, default=128)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--grad-scale", type=float, default=1.0, help="upstream gradient = scale * randn")
    ap.add_argument("--skew", action="store_true", help="queries agree on topk-1 standout blocks")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rank, world, dev, dtype = init_distributed(a.cpu)
    lines = []

    def say(line):
        if rank == 0:
            print(line, flush=True)
            lines.append(line)

    if a.check_size:
        t = a.check_size
        q, k, v, go = full_inputs(t, a, dev, dtype)
        go = (go.float() * a.grad_scale).to(dtype)
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = moba_dist.moba_attn_varlen(*xs, cu, t, a.chunk, a.topk, backend=a.backend)
        ref.backward(go)
        n = t // world
        sl = slice(rank * n, (rank + 1) * n)
        loc = [x[sl].clone().requires_grad_() for x in (q, k, v)]
        out = moba_dist.moba_attn_varlen_cp(*loc, cu, a.chunk, a.topk, backend=a.backend)
        out.backward(go[sl])
        errs, mags = [], []
        for got, want in [(out, ref[sl]), (loc[0].grad, xs[0].grad[sl]), (loc[1].grad, xs[1].grad[sl]),
                          (loc[2].grad, xs[2].grad[sl])]:
            diff = (got.float() - want.float()).abs()
            errs.append(torch.tensor([diff.max().item(), diff.mean().item()], device=dev))
            mags.append(want.float().abs().max())
        errs, mags = torch.stack(errs), torch.stack(mags)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        dist.all_reduce(mags, op=dist.ReduceOp.MAX)
        cells = " | ".join(f"{m:.2e} / {mean:.2e}" for m, mean in errs.tolist())
        say(f"check T={t} W={world} chunk={a.chunk} topk={a.topk}, upstream gradient {a.grad_scale} * randn: "
            "CP vs single-GPU moba_attn_varlen, max abs / worst-rank mean abs error\n\n"
            "| | out | dq | dk | dv |\n|---|---|---|---|---|\n"
            f"| error | {cells} |\n| max abs of single-GPU value | "
            + " | ".join(f"{m:.2f}" for m in mags.tolist()) + " |\n")
        del q, k, v, go, xs, ref, loc, out
        if not a.cpu:
            torch.cuda.empty_cache()

    say("| T | W | fwd+bwd ms | TFLOP/s/GPU (useful) | peak GiB (max rank) | fetched MiB/rank (max; fwd) "
        "| all-gather KV MiB/rank | (block, head) fetched / all-gather | blocks/query |")
    say("|---|---|---|---|---|---|---|---|---|")
    for t in [int(x) for x in a.sizes.split(",") if x]:
        q, k, v, go = full_inputs(t, a, dev, dtype)
        n = t // world
        sl = slice(rank * n, (rank + 1) * n)
        loc = [x[sl].contiguous().requires_grad_() for x in (q, k, v)]
        gl = go[sl].contiguous()
        del q, k, v, go
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        fn = functools.partial(_cp, cu=cu, a=a)
        ms, peak = time_fwd_bwd(fn, loc, gl, warmup=1, iters=2 if t >= 500_000 else 3)
        st = moba_dist.last_stats()
        vals = torch.tensor([ms, peak if peak == peak else 0.0, st.bytes_received.get("kv_fetch", 0),
                             st.allgather_kv_bytes, st.fetched_pairs, st.allgather_kv_pairs,
                             st.selected_blocks_per_query], dtype=torch.float64, device=dev)
        dist.all_reduce(vals, op=dist.ReduceOp.MAX)
        ms, peak, fetched, ag, fp, agp, spq = vals.tolist()
        tflops = moba_flops(t, a.hq, a.d, a.chunk, a.topk) / world / ms / 1e9
        say(f"| {t} | {world} | {ms:.0f} | {tflops:.0f} | {peak:.1f} | {fetched / 2**20:.1f} | "
            f"{ag / 2**20:.1f} | {fp:.0f} / {agp:.0f} | {spq:.2f} |")
        del loc, gl
    if rank == 0 and a.out:
        open(a.out, "w").write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
