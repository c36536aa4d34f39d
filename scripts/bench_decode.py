"""Per-token MoBA decode latency on one GPU: the Triton kernel against full attention.

bf16, batch 1, 16 query / 4 kv heads, head dim 128, one KV cache of 1M tokens read at cache
lengths 64K, 256K and 1M (``cache_seqlens``; the tensor shapes stay those of the 1M cache, as
in generation). Timed with CUDA events, median of ``--iters`` calls, plain (Python launches
each call) and as a replayed CUDA graph:

  * MoBA 4096/12 and 128/8 (``moba_dist.kernels.triton_decode.moba_decode_triton``),
  * ``flash_attn.flash_attn_with_kvcache`` full attention (skipped if flash-attn is missing),
  * ``torch.nn.functional.scaled_dot_product_attention`` full attention over the cache.

Checks, on the same inputs: the kernel's output against the pure-PyTorch ``moba_decode``
(relative max error), and its selection against ``decode_selection`` (the training path's gate:
``triton_gate.gate_topk`` on CUDA) bitwise; plus a tie-stress check in which every block's
scores are mathematically equal, so only the rounding of each score decides the selection
(equal selections there mean the same score arithmetic, not luck).

Prints a markdown table and writes it to ``$OUT/decode.md`` when ``OUT`` is set.

    PYTHONPATH=$PWD python scripts/bench_decode.py            # about a minute on an H100
    PYTHONPATH=$PWD python scripts/bench_decode.py --sweep    # also a few launch configs at 1M
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python scripts/bench_decode.py --smoke  # CPU: runs at all?
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from moba_dist.decode import decode_selection, moba_decode, update_block_sums
from moba_dist.kernels.triton_decode import (
    DecodeConfig,
    decode_selection_triton,
    launch_sizes,
    moba_decode_triton,
)

HQ, HKV, D = 16, 4, 128
CONFIGS = [(4096, 12), (128, 8)]
LENGTHS = [1 << 16, 1 << 18, 1 << 20]
TIE_CASES = [(128, 8, 600), (4096, 12, 40)]  # chunk, topk, blocks


def smoke_sizes() -> None:
    """``--smoke``: tiny sizes on the CPU under TRITON_INTERPRET=1 (checks the script runs;
    its times mean nothing)."""
    global HQ, HKV, D, CONFIGS, LENGTHS, TIE_CASES
    HQ, HKV, D = 4, 2, 16
    CONFIGS = [(16, 3), (4, 4)]
    LENGTHS = [64, 200, 256]
    TIE_CASES = [(4, 4, 20)]


def median_us(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --smoke
        import time

        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) * 1e3 for a, b in ev)


def graph_us(fn, iters: int) -> float:
    """Median replay time of ``fn`` captured in a CUDA graph (warmed up on a side stream)."""
    if not torch.cuda.is_available():  # --smoke
        return float("nan")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return median_us(g.replay, iters)


def kernel_times(fn, iters: int) -> list[tuple[str, float]]:
    """(kernel name, device us per call) of ``fn``'s kernels, largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / iters)
            for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def build_sums(k_cache: torch.Tensor, chunk: int) -> torch.Tensor:
    bsz, lmax, hkv, d = k_cache.shape
    sums = torch.zeros(bsz, -(-lmax // chunk), hkv, d, dtype=torch.float64, device=k_cache.device)
    step = 1 << 16
    for a in range(0, lmax, step):
        pos = torch.arange(a, min(a + step, lmax), device=k_cache.device).expand(bsz, -1)
        update_block_sums(sums, k_cache[:, a:a + step], pos, chunk)
    return sums


def tie_stress(dtype: torch.dtype, chunk: int, topk: int, nblocks: int, dev: str,
               queries: int = 8) -> tuple[bool, int]:
    """Every block's keys are a permutation (along d) of block 0's, and q = 1: all scores are
    the same number, computed in different orders. Returns (selections equal to the training
    gate's for every query, number of queries whose selection is not simply the lowest blocks:
    how often rounding, not the tie rule, decided)."""
    g = torch.Generator(device=dev).manual_seed(0)
    base = torch.randn(chunk, HKV, D, device=dev, generator=g)
    base = base * torch.exp2(torch.randint(-6, 7, (chunk, HKV, D), device=dev, generator=g).float())
    base = base.to(dtype)
    lmax = nblocks * chunk + 1
    k = torch.empty(1, lmax, HKV, D, dtype=dtype, device=dev)
    for j in range(nblocks):
        perm = torch.randperm(D, device=dev, generator=g)
        k[0, j * chunk:(j + 1) * chunk] = base[:, :, perm]
    k[0, -1] = base[0]
    sums = build_sums(k, chunk)
    seqlens = torch.tensor([lmax], dtype=torch.int32, device=dev)
    own = (seqlens.long() - 1) // chunk
    equal, decided = True, 0
    for i in range(queries):
        # q: one value per query, the same in every d (exact products).
        q = torch.full((1, HQ, D), 1.0 + i / 8, dtype=dtype, device=dev)
        ref = decode_selection(q, sums, own.cpu(), chunk, topk)
        sel = decode_selection_triton(q, seqlens, sums, chunk, topk)
        equal &= torch.equal(sel, ref)
        decided += int(not torch.equal(ref.sort(-1).values[0, 0].cpu(), torch.arange(topk - 1)))
    return equal, decided


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--sweep", action="store_true", help="also time a few launch configs at 1M")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    ap.add_argument("--profile", action="store_true",
                    help="also each kernel's device time per call at the longest cache (torch.profiler)")
    args = ap.parse_args()
    if args.smoke:
        smoke_sizes()
        args.iters = 2
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --smoke under TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    lmax = max(LENGTHS)
    dtype = torch.bfloat16
    k_cache = torch.randn(1, lmax, HKV, D, dtype=dtype, device=dev)
    v_cache = torch.randn(1, lmax, HKV, D, dtype=dtype, device=dev)
    sums = {chunk: build_sums(k_cache, chunk) for chunk, _ in CONFIGS}
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception:  # not installed, or built for another torch
        flash_attn_with_kvcache = None
    # Head-major copies for SDPA (its fast kernels want [B, H, L, D]); made once, not timed.
    k_hm, v_hm = k_cache.transpose(1, 2).contiguous(), v_cache.transpose(1, 2).contiguous()

    rows = []
    for length in LENGTHS:
        seqlens = torch.tensor([length], dtype=torch.int32, device=dev)
        q = torch.randn(1, HQ, D, dtype=dtype, device=dev)
        anchors = {}
        if flash_attn_with_kvcache is not None:
            q4 = q[:, None]

            def fa(q4=q4, seqlens=seqlens):
                return flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=seqlens, causal=True)

            anchors["FA2 flash_attn_with_kvcache (full)"] = fa
        qs = q[:, :, None]
        ks, vs = k_hm[:, :, :length], v_hm[:, :, :length]

        def sdpa(qs=qs, ks=ks, vs=vs):
            return torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)

        anchors["SDPA (full)"] = sdpa
        fa_us = None
        for name, fn in anchors.items():
            plain = median_us(fn, args.iters)
            try:
                graph = graph_us(fn, args.iters)
            except Exception as e:  # some backends do not capture
                print(f"{name}: graph capture failed: {e}", file=sys.stderr)
                graph = float("nan")
            if name.startswith("FA2"):
                fa_us = min(plain, graph) if graph == graph else plain
            elif fa_us is None and dev == "cpu":
                fa_us = plain
            rows.append((length, name, plain, graph, "", "", ""))
        for chunk, topk in CONFIGS:
            bs = sums[chunk]

            def moba(q=q, seqlens=seqlens, bs=bs, chunk=chunk, topk=topk):
                return moba_decode_triton(q, k_cache, v_cache, seqlens, bs, chunk, topk)

            out = moba()
            ref = moba_decode(q, k_cache, v_cache, seqlens, bs, chunk, topk)
            rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            own = (seqlens.cpu().long() - 1) // chunk
            same = torch.equal(decode_selection_triton(q, seqlens, bs, chunk, topk),
                               decode_selection(q, bs, own, chunk, topk))
            plain = median_us(moba, args.iters)
            graph = graph_us(moba, args.iters)
            best = graph if graph == graph else plain
            ratio = f"1/{fa_us / best:.1f}" if fa_us else ""
            rows.append((length, f"MoBA {chunk}/{topk} (Triton)", plain, graph, ratio,
                         f"{rel:.1e}", "yes" if same else "NO"))

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke)"
    lines = [f"# MoBA decode, one {gpu}, bf16, batch 1, "
             f"{HQ}/{HKV} heads, d {D}, cache tensors of {lmax} tokens", "",
             "| cache length | method | plain us | CUDA graph us | graph vs FA2 | rel err vs moba_decode "
             "| selection == gate_topk |", "|---|---|---|---|---|---|---|"]
    for length, name, plain, graph, ratio, rel, same in rows:
        size = f"{length // 1024}K" if length >= 1024 else str(length)
        lines.append(f"| {size} | {name} | {plain:.1f} | {graph:.1f} | {ratio} | {rel} | {same} |")
    lines += ["", "Launch grids (gate, attention, merge) at the 1M cache:"]
    for chunk, topk in CONFIGS:
        lines.append(f"- {chunk}/{topk}: {launch_sizes(lmax, chunk, topk, 1, HQ, HKV)}")
    if dev == "cpu":
        lines.append("- (smoke run: the 'vs FA2' column compares with SDPA)")

    lines += ["", "Tie-stress (all scores mathematically equal; rounding decides): selection of the "
              "kernel == the training gate's (gate_topk)", "",
              "| dtype | chunk/topk | blocks | equal | queries decided by rounding |",
              "|---|---|---|---|---|"]
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for chunk, topk, nb in TIE_CASES:
            eq, decided = tie_stress(dt, chunk, topk, nb, dev)
            name = str(dt).split(".")[-1]
            lines.append(f"| {name} | {chunk}/{topk} | {nb} | {'yes' if eq else 'NO'} | {decided}/8 |")

    if args.sweep:
        lines += ["", "Sweep at the 1M cache (CUDA graph us):", "",
                  "| config | split_n | block_n | gate_programs | us |", "|---|---|---|---|---|"]
        seqlens = torch.tensor([lmax], dtype=torch.int32, device=dev)
        q = torch.randn(1, HQ, D, dtype=dtype, device=dev)
        for chunk, topk in CONFIGS:
            for split_n, block_n, gp in ((256, 64, 64), (1024, 128, 64), (512, 64, 32), (512, 64, 64),
                                         (512, 64, 128), (512, 64, 256), (512, 64, 512)):
                if chunk <= split_n and split_n != 512:
                    continue  # one split per block anyway
                cfg = DecodeConfig(split_n=split_n, block_n=block_n, gate_programs=gp)

                def fn(cfg=cfg, chunk=chunk, topk=topk):
                    return moba_decode_triton(q, k_cache, v_cache, seqlens, sums[chunk], chunk, topk,
                                              config=cfg)

                us = graph_us(fn, args.iters)
                lines.append(f"| {chunk}/{topk} | {split_n} | {block_n} | {gp} | {us:.1f} |")

    if args.profile and dev == "cuda":
        lines += ["", f"Device time per call by kernel at the {lmax}-token cache (torch.profiler, "
                  f"{args.iters} calls):", "", "| config | kernel | us per call |", "|---|---|---|"]
        seqlens = torch.tensor([lmax], dtype=torch.int32, device=dev)
        q = torch.randn(1, HQ, D, dtype=dtype, device=dev)
        for chunk, topk in CONFIGS:
            for name, us in kernel_times(lambda chunk=chunk, topk=topk: moba_decode_triton(
                    q, k_cache, v_cache, seqlens, sums[chunk], chunk, topk), args.iters):
                lines.append(f"| {chunk}/{topk} | {name} | {us:.1f} |")

    text = "\n".join(lines) + "\n"
    print(text)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "decode.md"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
