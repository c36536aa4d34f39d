"""GPU micro-benchmark of the fused path's two memory-bound row kernels (kernels/triton_moba.py):
``_merge_kernel`` (forward: LSE merge of a row's slot partials with its own block) and
``_dq_sum_kernel`` (backward: the sum of a row's per-slot dq parts), over launch parameters.

    python scripts/dev/tune_sums.py [--tokens 45590] [--slots 7]

One query window of the 2 x 512K, chunk 128 / topk 8 benchmark (1M tokens in 23 windows: about
45.6K tokens x 16 heads = 729K rows, 7 slots, D 128). Every configuration's output must be
bitwise equal to BLOCK_R 16 (the pipeline's), since the per-row summation order does not depend
on the launch; the merge kernel as it was before (one 3-D tile per program) is timed alongside;
time is the median of 20 launches (CUDA events); GB/s counts the bytes each kernel
must move (partials read once, outputs written once).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

from moba_dist.kernels.triton_moba import _dq_sum_kernel, _merge_kernel


@triton.jit
def _merge_kernel_3d(
    o_part_ptr, lse_part_ptr, self_o_ptr, self_lse_ptr, out_ptr, lse_ptr,
    rows, n, row0, stride_so_r,
    HQ: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_SELF: tl.constexpr,
):
    """The merge kernel up to 3b8388e (one 3-D tile summed over its slot axis), for the A/B."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < rows
    sl = tl.arange(0, SP)
    d = tl.arange(0, DP)
    r64 = r.to(tl.int64)
    lse_s = tl.load(lse_part_ptr + r64[:, None] * S + sl[None, :], mask=rm[:, None] & (sl < S)[None, :],
                    other=float("-inf"))
    g = r64 + row0  # global row i * Hq + h
    stat = (g % HQ) * n + g // HQ  # lse is [Hq, n]
    m = tl.max(lse_s, 1)
    if HAS_SELF:
        lse_self = tl.load(self_lse_ptr + stat, mask=rm, other=float("-inf"))
        m = tl.maximum(m, lse_self)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe[:, None])
    denom = tl.sum(w, 1)
    seen = (lse_s > float("-inf"))[:, :, None] & (d < D)[None, None, :]
    o = tl.load(o_part_ptr + (r64[:, None, None] * S + sl[None, :, None]) * D + d[None, None, :],
                mask=seen, other=0.0).to(tl.float32)
    acc = tl.sum(o * w[:, :, None], 1)
    if HAS_SELF:
        w_self = tl.exp(lse_self - m_safe)
        o_self = tl.load(self_o_ptr + g[:, None] * stride_so_r + d[None, :],
                         mask=rm[:, None] & (d < D)[None, :] & (lse_self > float("-inf"))[:, None],
                         other=0.0).to(tl.float32)
        acc += o_self * w_self[:, None]
        denom += w_self
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + g[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & (d < D)[None, :])
    safe = tl.where(denom > 0, denom, 1.0)
    tl.store(lse_ptr + stat, tl.where(denom > 0, m_safe + tl.log(safe), float("-inf")), mask=rm)



def timed(fn, iters=20):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=45590)
    ap.add_argument("--slots", type=int, default=7)
    args = ap.parse_args()
    hq, d, s = 16, 128, args.slots
    m = args.tokens
    rows = m * hq
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    o_part = torch.randn(rows * s, d, device=dev, generator=g)
    lse_part = torch.randn(rows * s, device=dev, generator=g)
    lse_part[torch.rand(rows * s, device=dev, generator=g) < 0.02] = float("-inf")  # empty slots
    self_out = torch.randn(m, hq, d, device=dev, generator=g).bfloat16()
    self_lse = torch.randn(hq, m, device=dev, generator=g)
    print(f"# {torch.cuda.get_device_name()}, window of {m} tokens x {hq} heads, {s} slots, D {d}\n")
    print("| kernel | BLOCK_R | warps | us | GB/s | equal to BLOCK_R 16 |\n|---|---|---|---|---|---|")
    ref = old = None
    move = (rows * s * d * 4 + rows * s * 4) + rows * d * 2 * 2 + rows * 8
    for name, block_r, warps in [("merge (3-D, before)", 16, 8), ("merge", 16, 8), ("merge", 16, 4),
                                 ("merge", 8, 4), ("merge", 32, 8), ("merge", 32, 4), ("merge", 64, 8),
                                 ("merge", 4, 4)]:
        out = torch.empty(m, hq, d, device=dev, dtype=torch.bfloat16)
        lse = torch.empty(hq, m, device=dev)

        def run(name=name, block_r=block_r, warps=warps, out=out, lse=lse):
            if name == "merge":
                _merge_kernel[(triton.cdiv(rows, block_r),)](
                    o_part, lse_part, self_out, self_lse, out, lse, rows, m, 0, self_out.stride(1),
                    HQ=hq, S=s, D=d, DP=d, BLOCK_R=block_r, HAS_SELF=True, num_warps=warps)
            else:
                _merge_kernel_3d[(triton.cdiv(rows, block_r),)](
                    o_part, lse_part, self_out, self_lse, out, lse, rows, m, 0, self_out.stride(1),
                    HQ=hq, S=s, SP=triton.next_power_of_2(s), D=d, DP=d, BLOCK_R=block_r,
                    HAS_SELF=True, num_warps=warps)
        try:
            ms = timed(run)
            got = (out.clone(), lse.clone())
            if name == "merge" and ref is None:
                ref = got
            if name == "merge":
                eq = str(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
            else:
                old = got
                eq = "(reference)"
            print(f"| {name} | {block_r} | {warps} | {ms * 1e3:.0f} | {move / ms / 1e6:.0f} | {eq} |")
        except Exception as e:  # noqa: BLE001
            print(f"| merge | {block_r} | {warps} | error: {type(e).__name__}: {str(e)[:80]} | | |")
    diff = (ref[0].float() - old[0].float()).abs().max().item()
    print(f"\nnew merge vs the 3-D one: max |out difference| {diff:.3g} (bf16 rounding of a "
          f"different summation order), lse {(ref[1] - old[1]).abs().max().item():.3g}\n")
    print("| kernel | BLOCK_R | warps | us | GB/s | equal to BLOCK_R 16 |\n|---|---|---|---|---|---|")
    dq_part = torch.randn(rows * s, d, device=dev, generator=g)
    sel = torch.randint(0, 4096, (rows, s), device=dev, generator=g, dtype=torch.int32)
    sel[torch.rand(rows, s, device=dev, generator=g) < 0.02] = -1
    seg_len = torch.full((4096,), 128, device=dev, dtype=torch.int32)
    base = torch.randn(rows, d, device=dev, generator=g)
    move = rows * s * d * 4 + rows * s * 4 + rows * d * 4 + rows * d * 2
    ref = None
    for block_r, warps in [(16, 4), (16, 8), (32, 4), (32, 8), (64, 4), (64, 8), (8, 4)]:
        dq = torch.empty(rows, d, device=dev, dtype=torch.bfloat16)

        def run(block_r=block_r, warps=warps, dq=dq):
            _dq_sum_kernel[(triton.cdiv(rows, block_r),)](
                dq_part, sel, seg_len, base, dq, rows, S=s, P=1, D=d, DP=d, BLOCK_N=128,
                BLOCK_R=block_r, HAS_BASE=True, num_warps=warps)
        try:
            ms = timed(run)
            got = dq.clone()
            ref = got if ref is None else ref
            print(f"| dq_sum | {block_r} | {warps} | {ms * 1e3:.0f} | {move / ms / 1e6:.0f} | "
                  f"{torch.equal(got, ref)} |")
        except Exception as e:  # noqa: BLE001
            print(f"| dq_sum | {block_r} | {warps} | error: {type(e).__name__}: {str(e)[:80]} | | |")


if __name__ == "__main__":
    main()
