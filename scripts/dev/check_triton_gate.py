"""GPU check and micro-benchmark of the fused Triton gate + top-k (moba_dist/kernels/triton_gate.py).

    python scripts/dev/check_triton_gate.py [--out FILE] [--quick] [--only SUBSTRING ...]

Variants (``CONFIGS``): ``mma3-*`` score bf16 queries on tensor cores against the exact
three-way bf16 split of the summaries; ``fma-*`` use the fp32 FMA chain on CUDA cores (the path of
float16/float32 queries); ``default`` is what ``gate_topk(config=None)`` runs for bf16 queries.
Names: ``m`` query rows per program (times 4 heads), ``n`` blocks per tile, ``d`` head-dim chunk,
``w`` warps, ``s`` pipeline stages, ``-unrolled``: unrolled insertion rounds.

1. Correctness: bf16 queries, float32 block means (one sequence of 16K tokens, chunk 128 = 128
   blocks, 16 q / 4 kv heads, D 128, topk 8) against a float64 dense reference: selections that
   differ, among all (query, head) rows and among rows whose choice float32-class rounding cannot
   flip (``fma``: D * 2**-24 * sum|q*s| per score; ``mma3``: three times that, for truncating
   tensor-core adds over three passes).
2. Invariance: the same queries gated whole and as slices at odd offsets, with
   ``allow_tf32`` on and off, twice: bitwise equal (must hold for every variant). Also reported:
   equality with the default variant of the same score path; ``fma`` variants must all agree,
   ``mma3`` variants may differ in a few rows (another MMA shape), which is allowed: the
   selection is a function of the inputs for the one fixed default configuration.
3. Timing at the benchmark shapes (one 512K-token sequence; chunk 128 topk 8 and chunk 4096
   topk 12) for every variant; TFLOP/s counts 2*D flops per (query, head, candidate block)
   (mma3 issues three times that on tensor cores). ``moba_dist.gating.select_blocks`` (which calls
   the kernel with its default on CUDA) is timed alongside.

Every case catches its own exception and prints it in the table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch
import triton

from moba_dist.kernels.triton_gate import GateConfig, default_config, gate_topk

HQ, HKV, D = 16, 4, 128

def cfg(scores, m, n, d, w, s, **kw):
    return GateConfig(block_m=m, block_n=n, block_d=d, num_warps=w, num_stages=s, scores=scores, **kw)


CONFIGS = {
    "default": None,
    "mma3-m16n64d128w4s2": cfg("mma3", 16, 64, 128, 4, 2),
    "mma3-m16n64d128w4s1": cfg("mma3", 16, 64, 128, 4, 1),
    "mma3-m16n64d128w4s2-unrolled": cfg("mma3", 16, 64, 128, 4, 2, rounds="unrolled"),
    "mma3-m16n128d128w4s2": cfg("mma3", 16, 128, 128, 4, 2),
    "mma3-m16n32d128w4s2": cfg("mma3", 16, 32, 128, 4, 2),
    "mma3-m32n64d128w8s2": cfg("mma3", 32, 64, 128, 8, 2),
    "mma3-m32n64d128w4s2": cfg("mma3", 32, 64, 128, 4, 2),
    "mma3-m32n64d128w8s3-unrolled": cfg("mma3", 32, 64, 128, 8, 3, rounds="unrolled"),
    "mma3-m32n128d128w8s2": cfg("mma3", 32, 128, 128, 8, 2),
    "mma3-m64n64d128w8s2": cfg("mma3", 64, 64, 128, 8, 2),
    "mma3-m16n64d64w4s2": cfg("mma3", 16, 64, 64, 4, 2),
    "fma-m16n128d16w8s1": cfg("fma", 16, 128, 16, 8, 1),
    "fma-m16n64d16w4s1": cfg("fma", 16, 64, 16, 4, 1),
    "fma-m16n64d128w4s1": cfg("fma", 16, 64, 128, 4, 1),
    "fma-m16n128d16w8s1-bitonic": cfg("fma", 16, 128, 16, 8, 1, merge="bitonic"),
}


def path(name):
    """'mma3' or 'fma': the score path of a variant (bf16 queries)."""
    cfg = CONFIGS[name] or default_config(torch.bfloat16)
    return "mma3" if cfg.scores in ("mma3", "auto") else "fma"



def one_sequence(total: int, chunk: int, dev, seed: int = 0):
    """bf16 queries and keys of one sequence, float32 block means (float64 sums), block ids."""
    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(total, HQ, D, device=dev, generator=g).to(torch.bfloat16)
    k = torch.randn(total, HKV, D, device=dev, generator=g).to(torch.bfloat16)
    nb = -(-total // chunk)
    pad = nb * chunk - total
    kp = torch.cat([k.double(), k.new_zeros(pad, HKV, D, dtype=torch.float64)])
    counts = torch.full((nb,), chunk, dtype=torch.float64, device=dev)
    counts[-1] = chunk - pad
    means = (kp.view(nb, chunk, HKV, D).sum(1) / counts[:, None, None]).float()
    q_block = torch.arange(total, device=dev) // chunk
    return q, means, q_block, torch.zeros_like(q_block)


def reference(q, s, qb, qf, topk, rows=2048):
    """float64 selection (stable sort: lower block first among equals) and, per row, the float64
    gap between the (topk-1)-th and topk-th scores over ``D * 2**-24 * max sum|q*s|`` (rows
    without a competitor: inf). A float32 dot of length D is within ``D * 2**-24 * sum|q*s|`` of
    the exact value, so a row whose ratio exceeds ``2 * c`` cannot flip under errors ``c`` times
    that bound."""
    n = q.shape[0]
    k = topk - 1
    sel = torch.full((n, HQ, k), -1, dtype=torch.int64, device=q.device)
    ratio = torch.full((n, HQ), float("inf"), dtype=torch.float64, device=q.device)
    sd = s.double().repeat_interleave(HQ // HKV, dim=1)
    j = torch.arange(s.shape[0], device=q.device)
    for a in range(0, n, rows):
        qd = q[a:a + rows].double()
        sc = torch.einsum("ihd,jhd->ihj", qd, sd)
        valid = ((j >= qf[a:a + rows, None]) & (j < qb[a:a + rows, None]))[:, None, :]
        sc = sc.masked_fill(~valid, float("-inf"))
        vals, idx = torch.sort(sc, dim=-1, descending=True, stable=True)
        w = min(k, s.shape[0])
        cnt = valid.sum(-1)[..., None]
        sel[a:a + rows, :, :w] = torch.where(torch.arange(w, device=q.device) < cnt, idx[..., :w], -1)
        if vals.shape[-1] > k:
            bound = torch.einsum("ihd,jhd->ihj", qd.abs(), sd.abs()).amax(-1) * q.shape[-1] * 2.0**-24
            gap = vals[..., k - 1] - vals[..., k]
            ratio[a:a + rows] = torch.nan_to_num(gap / bound, nan=float("inf"))
    return sel, ratio


def as_sets(sel):
    return sel.sort(-1).values


def check_correctness(dev, rows_out, total):
    q, s, qb, qf = one_sequence(total, 128, dev, seed=1)
    ref, ratio = reference(q, s, qb, qf, 8)
    for name, cfg in CONFIGS.items():
        try:
            got = gate_topk(q, s, qb, qf, 8, config=cfg)
            diff = (as_sets(got) != as_sets(ref)).any(-1)
            sure = ratio > (2.05 if path(name) == "fma" else 6.2)
            rows_out.append(f"| correctness {name} | {int(diff.sum())} / {diff.numel()} rows differ; "
                            f"{int((diff & sure).sum())} among {int(sure.sum())} unambiguous rows "
                            f"(must be 0) |")
        except Exception as e:  # noqa: BLE001
            rows_out.append(f"| correctness {name} | FAILED: {type(e).__name__}: {e} |")
            traceback.print_exc()


def check_invariance(dev, rows_out, total):
    q, s, qb, qf = one_sequence(total, 128, dev, seed=2)
    n = q.shape[0]
    base = {}
    for name, cfg in CONFIGS.items():
        try:
            p = path(name)
            if p not in base:
                base[p] = gate_topk(q, s, qb, qf, 8, config=default_config(
                    torch.bfloat16 if p == "mma3" else torch.float32))
            whole = gate_topk(q, s, qb, qf, 8, config=cfg)
            differ = int((whole != base[p]).any(-1).sum())
            same_cfg = (f"rows differing from the default {p} variant: {differ}"
                        + (" (must be 0)" if p == "fma" else " (allowed: other MMA shape)"))
            cut = n // 2 - n // 7  # not a multiple of any tile height
            parts = [(0, cut), (cut, n), (3, n - 5), (n // 4 + 1, n // 4 + 3)]
            sliced = all(torch.equal(gate_topk(q[a:b], s, qb[a:b], qf[a:b], 8, config=cfg), whole[a:b])
                         for a, b in parts)
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            tf32 = []
            try:
                for flag in (True, False, True):
                    torch.backends.cuda.matmul.allow_tf32 = flag
                    torch.backends.cudnn.allow_tf32 = flag
                    tf32.append(torch.equal(gate_topk(q, s, qb, qf, 8, config=cfg), whole))
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
            rows_out.append(f"| invariance {name} | slices {sliced}; tf32 on/off/repeat {all(tf32)} "
                            f"(both must be True); {same_cfg} |")
        except Exception as e:  # noqa: BLE001
            rows_out.append(f"| invariance {name} | FAILED: {type(e).__name__}: {e} |")
            traceback.print_exc()


def timed(fn, dev, iters=5, warmup=2):
    """Median milliseconds of ``fn()`` (CUDA events; wall clock on the CPU)."""
    times = []
    if dev.type != "cuda":  # the CPU smoke run only exercises the code
        iters, warmup = 1, 0
    for i in range(warmup + iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    return statistics.median(times)


def torch_gate(q, s, qb, qf, topk, chunk):
    """The pure-PyTorch gate of moba_dist.gating with its own tiling (one sequence)."""
    from moba_dist import gating

    n = q.shape[0]
    step = max(chunk, gating.GATE_TILE_ELEMS // (HQ * s.shape[0]))
    tiles = []
    for a in range(0, n, step):
        b = min(n, a + step)
        hi = (b - 1) // chunk
        if hi > 0:
            tiles.append((a, b, 0, hi))
    return lambda: gating.select_blocks(q, s, qb, qf, topk, tiles)


def bench_shape(dev, rows_out, total, chunk, topk, names):
    q, s, qb, qf = one_sequence(total, chunk, dev, seed=3)
    flop = 2.0 * D * float(((qb - qf).double().sum() * HQ).item())
    cases = [(n, lambda c=CONFIGS[n]: gate_topk(q, s, qb, qf, topk, config=c)) for n in names]
    try:
        cases.append(("torch gating.select_blocks", torch_gate(q, s, qb, qf, topk, chunk)))
    except Exception as e:  # noqa: BLE001
        rows_out.append(f"| {total} chunk {chunk} topk {topk} torch | n/a: {e} |")
    for name, fn in cases:
        try:
            ms = timed(fn, dev)
            rows_out.append(f"| {total} chunk {chunk} topk {topk} {name} | {ms:.2f} ms, "
                            f"{flop / ms / 1e9:.1f} TFLOP/s |")
        except Exception as e:  # noqa: BLE001
            rows_out.append(f"| {total} chunk {chunk} topk {topk} {name} | FAILED: "
                            f"{type(e).__name__}: {str(e)[:200]} |")
            traceback.print_exc()
        print(rows_out[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--total", type=int, default=512 * 1024, help="tokens of the timed sequence")
    ap.add_argument("--check-total", type=int, default=16384, help="tokens of the checked sequence")
    ap.add_argument("--quick", action="store_true", help="time the first two configs only")
    ap.add_argument("--only", nargs="*", default=None,
                    help="keep the variants whose names contain one of these substrings")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run of the script's logic (needs TRITON_INTERPRET=1)")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.smoke else "cuda")
    global HQ, HKV, D, CONFIGS
    if a.only:
        CONFIGS = {k: v for k, v in CONFIGS.items() if any(s in k for s in a.only)}
    if a.smoke:
        HQ, HKV, D = 2, 1, 16  # the interpreter pays per program: few of them
        CONFIGS = {k: CONFIGS[k] for k in ("default", "mma3-m16n64d128w4s2-unrolled",
                                           "mma3-m16n64d64w4s2", "fma-m16n64d16w4s1")}
        a.total, a.check_total = 512, 256
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter)"
    rows = [f"device: {name}, torch {torch.__version__}, triton {triton.__version__}",
            "", "| case | result |", "|---|---|"]
    check_correctness(dev, rows, a.check_total)
    print("\n".join(rows), flush=True)
    check_invariance(dev, rows, a.check_total)
    print("\n".join(rows[-len(CONFIGS):]), flush=True)
    names = list(CONFIGS)[:2] if a.quick else list(CONFIGS)
    for chunk, topk in [(128, 8), (4096, 12)]:
        bench_shape(dev, rows, a.total, chunk, topk, names)
    text = "\n".join(rows)
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
