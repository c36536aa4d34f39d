"""GPU check and micro-benchmark of the fused Triton gate + top-k (moba_dist/kernels/triton_gate.py).

    python scripts/check_triton_gate.py [--out FILE] [--quick]

1. Correctness: bf16 queries, float32 block means (one sequence of 16K tokens, chunk 128 = 128
   blocks, 16 q / 4 kv heads, D 128, topk 8) against a float64 dense reference: selections that
   differ, among all (query, head) rows and among rows whose choice float32 rounding cannot flip.
2. Invariance: the same queries gated whole and as slices at odd offsets, with
   ``allow_tf32`` on and off, twice, and with every launch configuration: bitwise equal.
3. Timing at the benchmark shapes (one 512K-token sequence; chunk 128 topk 8 and chunk 4096
   topk 12) for several launch configurations; TFLOP/s counts 2*D flops per (query, head,
   candidate block). The pure-PyTorch gate of ``moba_dist.gating`` is timed alongside when its
   ``select_blocks`` still has the tiled signature.

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

from moba_dist.kernels.triton_gate import GateConfig, gate_topk

HQ, HKV, D = 16, 4, 128

CONFIGS = {
    "m16n64d16w8": GateConfig(block_m=16, block_n=64, block_d=16, num_warps=8),
    "m32n32d16w8": GateConfig(block_m=32, block_n=32, block_d=16, num_warps=8),
    "m8n64d16w4": GateConfig(block_m=8, block_n=64, block_d=16, num_warps=4),
    "m16n32d16w4": GateConfig(block_m=16, block_n=32, block_d=16, num_warps=4),
    "m32n64d16w16": GateConfig(block_m=32, block_n=64, block_d=16, num_warps=16),
    "m16n64d32w8": GateConfig(block_m=16, block_n=64, block_d=32, num_warps=8),
    "m16n128d16w8": GateConfig(block_m=16, block_n=128, block_d=16, num_warps=8),
    "m16n64d16w8-bitonic": GateConfig(block_m=16, block_n=64, block_d=16, num_warps=8, merge="bitonic"),
    "default": GateConfig(),
}


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
    """float64 selection (stable sort: lower block first among equals) and, per row, whether the
    (topk-1)-th and topk-th scores are further apart than float32 rounding can bridge."""
    n = q.shape[0]
    k = topk - 1
    sel = torch.full((n, HQ, k), -1, dtype=torch.int64, device=q.device)
    sure = torch.ones(n, HQ, dtype=torch.bool, device=q.device)
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
            # Each float32 dot of length D is within D * 2**-24 * sum|q*s| of the exact value, so
            # a larger float64 gap between the last kept and first dropped block cannot flip.
            bound = torch.einsum("ihd,jhd->ihj", qd.abs(), sd.abs()).amax(-1)
            gap = vals[..., k - 1] - vals[..., k]
            sure[a:a + rows] = ~(gap <= 2.05 * q.shape[-1] * 2.0**-24 * bound)
    return sel, sure


def as_sets(sel):
    return sel.sort(-1).values


def check_correctness(dev, rows_out, total):
    q, s, qb, qf = one_sequence(total, 128, dev, seed=1)
    ref, sure = reference(q, s, qb, qf, 8)
    for name, cfg in CONFIGS.items():
        try:
            got = gate_topk(q, s, qb, qf, 8, config=cfg)
            diff = (as_sets(got) != as_sets(ref)).any(-1)
            rows_out.append(f"| correctness {name} | {int(diff.sum())} / {diff.numel()} rows differ; "
                            f"{int((diff & sure).sum())} among {int(sure.sum())} unambiguous rows "
                            f"(must be 0) |")
        except Exception as e:  # noqa: BLE001
            rows_out.append(f"| correctness {name} | FAILED: {type(e).__name__}: {e} |")
            traceback.print_exc()


def check_invariance(dev, rows_out, total):
    q, s, qb, qf = one_sequence(total, 128, dev, seed=2)
    n = q.shape[0]
    base = None
    for name, cfg in CONFIGS.items():
        try:
            whole = gate_topk(q, s, qb, qf, 8, config=cfg)
            if base is None:
                base = whole
            same_cfg = bool(torch.equal(whole, base))
            parts = [(0, n // 2 - 415), (n // 2 - 415, n), (3, n - 5), (n // 4 + 1, n // 4 + 3)]
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
            rows_out.append(f"| invariance {name} | slices {sliced}; tf32 on/off/repeat {all(tf32)}; "
                            f"equal to first config {same_cfg} |")
        except Exception as e:  # noqa: BLE001
            rows_out.append(f"| invariance {name} | FAILED: {type(e).__name__}: {e} |")
            traceback.print_exc()


def timed(fn, dev, iters=5, warmup=2):
    """Median milliseconds of ``fn()`` (CUDA events; wall clock on the CPU)."""
    times = []
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
    ap.add_argument("--smoke", action="store_true",
                    help="tiny CPU run of the script's logic (needs TRITON_INTERPRET=1)")
    a = ap.parse_args()
    dev = torch.device("cpu" if a.smoke else "cuda")
    if a.smoke:
        global HQ, HKV, D, CONFIGS
        HQ, HKV, D = 4, 2, 16
        CONFIGS = {k: CONFIGS[k] for k in ("m16n32d16w4", "m32n32d16w8")}
        a.total, a.check_total = 1024, 640
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
