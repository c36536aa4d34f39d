"""Ring full causal attention on W GPUs: our ring (two kernel backends) against ring-flash-attn's
zigzag and llama3 algorithms, all through ``moba_dist.ring_attn_varlen_cp``.

    torchrun --nproc-per-node 4 scripts/dev/bench_ring.py [--sizes 131072,524288,1048576]
    torchrun --nproc-per-node 2 scripts/dev/bench_ring.py --cpu --sizes 256      # CPU/gloo smoke test

One sequence per size, Hq 16, Hkv 4, D 128, bf16 (float32 and the torch backend with --cpu).
Every rank holds a contiguous slice of T/W tokens; each implementation relays it out to its own
layout and back (included in the time). Time: median fwd+bwd of a few iterations after a
warm-up (CUDA events; 1 warm-up + 2 timed from 500K tokens). FLOPs: causal attention forward
``4 * T^2/2 * Hq * D``, backward 2.5x forward, so fwd+bwd ``7 * T^2 * Hq * D``; TFLOP/s per GPU
divides by W. Peak memory: max over ranks of ``torch.cuda.max_memory_allocated``.

Before timing, ``--check-size`` tokens in three sequences over unequal slices are run through
each implementation and compared with single-device causal attention on the full tensors.
Implementations that cannot run here (package missing, CPU) print ``n/a``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

_SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _SCRIPTS)  # for benchutil
sys.path.insert(1, os.path.dirname(_SCRIPTS))  # the repo, for moba_dist
from benchutil import causal_flops, init_distributed, time_fwd_bwd  # noqa: E402

import moba_dist  # noqa: E402
from moba_dist.kernels import get_backend, varlen_attn_with_lse  # noqa: E402
from moba_dist.parallel.ring_flash import unavailable_reason  # noqa: E402

# name -> (impl, kernel backend)
IMPLS = {
    "ours/aten_flash": ("ours", "aten_flash"),
    "ours/flash_attn": ("ours", "flash_attn"),
    "ours/torch": ("ours", "torch"),
    "rfa_zigzag": ("rfa_zigzag", None),
    "rfa_llama3": ("rfa_llama3", None),
}
GPU_DEFAULT = "ours/aten_flash,ours/flash_attn,rfa_zigzag,rfa_llama3"
CPU_DEFAULT = "ours/torch,rfa_zigzag,rfa_llama3"


def why_not(name: str, probe: torch.Tensor, cu: torch.Tensor, world: int) -> str | None:
    impl, backend = IMPLS[name]
    if impl == "ours":
        try:
            get_backend(probe.device, probe.dtype, probe.shape[-1], backend)
        except ValueError as e:
            return str(e)
        return None
    return unavailable_reason(impl, probe, cu, world)


def ring_fn(name: str, cu: torch.Tensor):
    impl, backend = IMPLS[name]
    return lambda q, k, v: moba_dist.ring_attn_varlen_cp(q, k, v, cu, impl=impl, backend=backend)


def check(a, names, rank, world, dev, dtype, say):
    """Max abs error of out/dq/dk/dv (max over ranks) against one-device attention on full tensors."""
    t = a.check_size
    lengths = [t // 2, t // 4, t - t // 2 - t // 4]
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], t], dtype=torch.int32)
    g = torch.Generator(device=dev).manual_seed(t)
    q, k, v, go = (torch.randn(t, h, a.d, device=dev, generator=g).to(dtype)
                   for h in (a.hq, a.hkv, a.hkv, a.hq))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    cu_dev = cu.to(dev)
    ref, _ = varlen_attn_with_lse(*full, cu_dev, cu_dev, max(lengths), max(lengths), causal=True)
    ref.backward(go)
    # Unequal slices: rank r holds (r + 1) parts of W(W+1)/2.
    bounds = [t * (r * (r + 1) // 2) // (world * (world + 1) // 2) for r in range(world + 1)]
    sl = slice(bounds[rank], bounds[rank + 1])
    say(f"check: T={t} in sequences {lengths}, slices {[b - a for a, b in zip(bounds, bounds[1:])]}, "
        "max abs error vs one-device attention (max over ranks)\n")
    say("| impl | out | dq | dk | dv |")
    say("|---|---|---|---|---|")
    for name in names:
        reason = why_not(name, q, cu, world)
        if reason is not None:
            say(f"| {name} | n/a | n/a | n/a | n/a |")
            continue
        loc = [x[sl].clone().requires_grad_() for x in (q, k, v)]
        out = ring_fn(name, cu)(*loc)
        out.backward(go[sl])
        errs = torch.tensor([(got.float() - want[sl].float()).abs().max().item() if got.numel() else 0.0
                             for got, want in [(out, ref), (loc[0].grad, full[0].grad),
                                               (loc[1].grad, full[1].grad), (loc[2].grad, full[2].grad)]],
                            device=dev)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        say(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errs.tolist()) + " |")
    say("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default=None, help="total tokens, comma-separated")
    ap.add_argument("--impls", default=None, help=f"comma-separated, from {list(IMPLS)}")
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", dest="d", type=int, default=128)
    ap.add_argument("--check-size", type=int, default=None, help="0 skips the correctness check")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 3, 2 from 500K)")
    ap.add_argument("--cpu", action="store_true", help="gloo, float32, torch kernels, tiny sizes")
    ap.add_argument("--out", default=None, help="also write the tables to this file (rank 0)")
    a = ap.parse_args()
    rank, world, dev, dtype = init_distributed(a.cpu)
    sizes = [int(s) for s in (a.sizes or ("256" if a.cpu else "131072,524288,1048576")).split(",")]
    names = (a.impls or (CPU_DEFAULT if a.cpu else GPU_DEFAULT)).split(",")
    for name in names:
        if name not in IMPLS:
            raise SystemExit(f"--impls: unknown {name!r}; choose from {list(IMPLS)}")
    check_size = a.check_size if a.check_size is not None else (128 if a.cpu else 16384)
    lines = []

    def say(line):
        if rank == 0:
            print(line, flush=True)
            lines.append(line)

    say(f"ring attention, W={world}, Hq={a.hq}, Hkv={a.hkv}, D={a.d}, {dtype}, {dev.type}; "
        "flops fwd+bwd = 7*T^2*Hq*D (fwd 4*T^2/2*Hq*D, bwd 2.5x)\n")
    if check_size:
        a.check_size = check_size
        check(a, names, rank, world, dev, dtype, say)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    say("| impl | T | W | fwd+bwd ms | TFLOP/s/GPU | peak GiB (max rank) |")
    say("|---|---|---|---|---|---|")
    for t in sizes:
        if t % world:
            raise SystemExit(f"--sizes: {t} is not a multiple of the world size {world}")
        n = t // world
        cu = torch.tensor([0, t], dtype=torch.int32)
        g = torch.Generator(device=dev).manual_seed(1000 + rank)  # each rank draws its own slice
        loc = [torch.randn(n, h, a.d, device=dev, generator=g).to(dtype).requires_grad_()
               for h in (a.hq, a.hkv, a.hkv)]
        grad = torch.randn(n, a.hq, a.d, device=dev, generator=g).to(dtype)
        iters = a.iters or (2 if t >= 500_000 else 3)
        for name in names:
            reason = why_not(name, loc[0], cu, world)
            if reason is not None:
                say(f"| {name} | {t} | {world} | n/a | n/a | n/a |")
                continue
            try:
                ms, peak = time_fwd_bwd(ring_fn(name, cu), loc, grad, warmup=a.warmup, iters=iters)
            except torch.cuda.OutOfMemoryError:
                ms, peak = float("nan"), float("inf")
            vals = torch.tensor([ms, peak if peak == peak else 0.0], dtype=torch.float64, device=dev)
            dist.all_reduce(vals, op=dist.ReduceOp.MAX)
            ms, peak = vals.tolist()
            if ms != ms:
                say(f"| {name} | {t} | {world} | OOM | - | - |")
            else:
                tflops = causal_flops(t, a.hq, a.d) / world / ms / 1e9
                peak_s = f"{peak:.1f}" if dev.type == "cuda" else "-"
                say(f"| {name} | {t} | {world} | {ms:.1f} | {tflops:.3g} | {peak_s} |")
            for x in loc:
                x.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del loc, grad
    if rank == 0 and a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
