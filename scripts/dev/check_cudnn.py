"""One-command GPU self-check and micro-benchmark of the cuDNN kernel backend.

    PYTHONPATH=/tmp/site:$PWD python scripts/dev/check_cudnn.py [--out FILE] [--skip-bench]
        [--skip-variants] [--sizes 32768,65536,131072] [--iters 5] [--variant mask=..,stats=..]
        [--backend-only]

Sections (each case catches and prints its own exception, so one run answers everything):

  1. environment: torch, CUDA device, cudnn frontend / backend versions, ``supports()``;
  2. correctness on bf16 (one fp16) inputs against a float64 reference computed from the same
     values: forward output and LSE, then backward dq/dk/dv (fed the backend's own out/LSE, as in
     training). Varlen with empty segments, GQA 16/4 and 8/8, key segments longer than query
     segments (causal bottom-right), more queries than keys (rows that see no key), non-causal,
     D 128 and 64, non-contiguous inputs, and a key set split in two and merged by LSE (backward
     with the merged out/LSE). PyTorch's FlashAttention-2 runs the same case as a yardstick.
     PASS: every max abs error within max(2e-2 * max|ref|, 2x FA2's) (LSE: max(1e-2, 2x FA2's)),
     ``-inf`` LSE and zero rows exactly where the reference has rows that see no key;
  3. graph cache in steady state (new cu_seqlens in the same shape class build nothing) and no
     host sync under ``torch.cuda.set_sync_debug_mode("error")``;
  4. every graph variant (mask spelling x stats layout x offset sharing): builds? correct?;
  5. timing of forward and forward+backward against FA2 at 32K-128K tokens (one sequence and
     several), plus MoBA-shaped calls, in TFLOP/s;
  6. graph-cache counters and the variant/engine of every cached graph.

Exit status 1 when any correctness check fails.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import traceback

import torch

from moba_dist.kernels import merge_lse
from moba_dist.kernels.cuda_backends import AtenFlashBackend
from moba_dist.kernels.cudnn_backend import CudnnBackend, Variant, candidate_variants

LINES: list[str] = []
FAILS: list[str] = []
OPTS: dict = {}  # CudnnBackend keyword arguments from the command line


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def cu_of(lengths, dev):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device=dev)


# ------------------------------------------------------------------------------------------
# float64 reference (analytic gradients; rows that see no key give 0 and lse -inf)
# ------------------------------------------------------------------------------------------


def reference(q, k, v, dout, lq, lk, scale, causal):
    """Returns float64 ``out [Tq,Hq,D], lse [Hq,Tq], dq, dk, dv`` for bottom-right causal or full
    attention per segment; loops over kv heads so memory is one group's ``[G, Lq, Lk]``."""
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float64, device=q.device)
    qa = ka = 0
    for a, b in zip(lq, lk):
        if a and b:
            mask = torch.ones(a, b, dtype=torch.bool, device=q.device)
            if causal:
                mask = (torch.arange(b, device=q.device)[None, :]
                        <= torch.arange(a, device=q.device)[:, None] + (b - a))
            for h in range(hkv):
                hs = slice(h * g, (h + 1) * g)
                Q = q[qa:qa + a, hs].transpose(0, 1)  # [G, a, D]
                K, V = k[ka:ka + b, h], v[ka:ka + b, h]
                dO = dout[qa:qa + a, hs].transpose(0, 1)
                S = (Q @ K.T * scale).masked_fill(~mask, float("-inf"))
                L = torch.logsumexp(S, -1)
                P = torch.exp(S - torch.where(torch.isinf(L), 0.0, L)[..., None])
                Ot = P @ V
                dP = dO @ V.T
                dS = P * (dP - (dO * Ot).sum(-1, keepdim=True))
                out[qa:qa + a, hs] = Ot.transpose(0, 1)
                lse[hs, qa:qa + a] = L
                dq[qa:qa + a, hs] = (dS @ K * scale).transpose(0, 1)
                dk[ka:ka + b, h] += (dS.transpose(1, 2) @ Q).sum(0) * scale
                dv[ka:ka + b, h] += (P.transpose(1, 2) @ dO).sum(0)
        qa, ka = qa + a, ka + b
    return out, lse, dq, dk, dv


def run_backend(be, q, k, v, dout, cu_q, cu_k, mq, mk, scale, causal):
    out, lse = be.forward(q, k, v, cu_q, cu_k, mq, mk, scale, causal)
    dq, dk, dv = be.backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, causal)
    return out, lse, dq, dk, dv


def errors(got, ref):
    """(max abs, mean abs, max|ref|) over finite entries; inf pattern must match exactly."""
    got = got.double()
    fin = torch.isfinite(ref)
    if not bool(fin.any()):
        return 0.0, 0.0, 0.0
    d = (got[fin] - ref[fin]).abs()
    return d.max().item(), d.mean().item(), ref[fin].abs().max().item()


NAMES = ("out", "lse", "dq", "dk", "dv")


def compare(name, results, ref, fa2=None):
    """Print one case's errors; record FAIL. ``results``/``ref``/``fa2``: 5-tuples."""
    dead = torch.isneginf(ref[1])  # [Hq, Tq]
    ok, cells = True, []
    for i, n in enumerate(NAMES):
        e_max, e_mean, r_max = errors(results[i], ref[i])
        f_max = errors(fa2[i], ref[i])[0] if fa2 is not None else 0.0
        tol = max(1e-2 if n == "lse" else 2e-2 * max(r_max, 1e-3), 2 * f_max)
        good = math.isfinite(e_max) and e_max <= tol  # NaN in a compared entry makes e_max NaN
        ok &= good
        cells.append(f"{n} {e_max:.2e}/{e_mean:.1e} (rel {e_max / max(r_max, 1e-30):.1e}"
                     + (f", fa2 {f_max:.2e}" if fa2 is not None else "") + ")" + ("" if good else " X"))
    # Rows that see no key: -inf LSE and exact zeros in out and dq, nowhere else.
    lse_pattern = torch.equal(torch.isneginf(results[1]), dead)
    dead_rows = dead[0]
    zero_out = bool((results[0][dead_rows] == 0).all()) and bool((results[2][dead_rows] == 0).all())
    ok &= lse_pattern and zero_out
    extra = f"dead rows {int(dead_rows.sum())}: -inf pattern {'ok' if lse_pattern else 'WRONG'}, " \
            f"zeros {'ok' if zero_out else 'WRONG'}"
    status = "PASS" if ok else "FAIL"
    if not ok:
        FAILS.append(name)
    say(f"  [{status}] {name}: " + "; ".join(cells) + f"; {extra}")
    return ok


def make_inputs(lq, lk, hq, hkv, d, dtype, dev, seed, noncontig=False):
    g = torch.Generator(device=dev).manual_seed(seed)
    tq, tk = sum(lq), sum(lk)
    if noncontig:
        qkv = torch.randn(max(tq, tk), hq + 2 * hkv, d, device=dev, generator=g).to(dtype)
        q, k, v = qkv[:tq, :hq], qkv[:tk, hq:hq + hkv], qkv[:tk, hq + hkv:]
    else:
        q = torch.randn(tq, hq, d, device=dev, generator=g).to(dtype)
        k = torch.randn(tk, hkv, d, device=dev, generator=g).to(dtype)
        v = torch.randn(tk, hkv, d, device=dev, generator=g).to(dtype)
    dout = torch.randn(tq, hq, d, device=dev, generator=g).to(dtype)
    return q, k, v, dout


CASES = [
    # name, q lengths, k lengths, hq, hkv, d, causal, dtype, non-contiguous
    ("varlen+empty segs, GQA 16/4, causal, D128", [300, 0, 1000, 77, 0, 129], [300, 0, 1000, 77, 5, 129],
     16, 4, 128, True, torch.bfloat16, False),
    ("MHA 8/8, causal, D128", [513, 1024, 7], [513, 1024, 7], 8, 8, 128, True, torch.bfloat16, False),
    ("Lk > Lq, causal bottom-right, GQA 16/4", [100, 256, 1, 0, 50], [300, 256, 700, 20, 50],
     16, 4, 128, True, torch.bfloat16, False),
    ("Lq > Lk (rows with no key), causal, GQA 16/4", [8, 300, 64, 5], [3, 100, 0, 5],
     16, 4, 128, True, torch.bfloat16, False),
    ("non-causal, Lk != Lq, empty key segment", [128, 40, 64, 0], [200, 0, 3, 9],
     16, 4, 128, False, torch.bfloat16, False),
    ("D64, GQA 16/4, causal", [1000, 2000], [1000, 2000], 16, 4, 64, True, torch.bfloat16, False),
    ("fp16, Lk > Lq, causal, GQA 16/4", [100, 256, 1, 50], [300, 256, 700, 50], 16, 4, 128, True,
     torch.float16, False),
    ("non-contiguous q/k/v views, GQA 16/4, causal", [400, 333], [400, 333], 16, 4, 128, True,
     torch.bfloat16, True),
    ("one sequence 8K, GQA 16/4, causal", [8192], [8192], 16, 4, 128, True, torch.bfloat16, False),
]


def moba_selected_case(dev, seed=7):
    """MoBA's selected part: one head, many segments (bucketed batch > 512), non-causal."""
    g = torch.Generator().manual_seed(seed)
    n = 600
    lq = torch.randint(0, 40, (n,), generator=g).tolist()
    lk = torch.randint(1, 200, (n,), generator=g).tolist()
    return ("MoBA selected part: H 1, 600 segments, non-causal", lq, lk, 1, 1, 128, False,
            torch.bfloat16, False)


def check_case(be, fa2, case, dev, seed):
    name, lq, lk, hq, hkv, d, causal, dtype, noncontig = case
    q, k, v, dout = make_inputs(lq, lk, hq, hkv, d, dtype, dev, seed, noncontig)
    cu_q, cu_k = cu_of(lq, dev), cu_of(lk, dev)
    scale = d ** -0.5
    ref = reference(q, k, v, dout, lq, lk, scale, causal)
    got = run_backend(be, q, k, v, dout, cu_q, cu_k, max(lq), max(lk), scale, causal)
    yard = None
    if fa2 is not None and fa2.supports(dev, dtype, d):
        try:
            yard = run_backend(fa2, q, k, v, dout, cu_q, cu_k, max(lq), max(lk), scale, causal)
        except Exception as e:  # noqa: BLE001
            say(f"    (FA2 yardstick failed: {type(e).__name__}: {e})")
    compare(name, got, ref, yard)


def check_split_merge(be, dev):
    """Keys of each segment split in two calls, merged by LSE; backward of each call with the merged
    out/LSE must give the gradients of attention over all keys."""
    lq, lk, hq, hkv, d = [300, 200, 64], [500, 256, 100], 16, 4, 128
    q, k, v, dout = make_inputs(lq, lk, hq, hkv, d, torch.bfloat16, dev, 11)
    scale = d ** -0.5
    ref = reference(q, k, v, dout, lq, lk, scale, False)
    ia, ib, la, lb = [], [], [], []
    start = 0
    for n in lk:
        h = n // 3
        ia += range(start, start + h)
        ib += range(start + h, start + n)
        la.append(h)
        lb.append(n - h)
        start += n
    ia, ib = torch.tensor(ia, device=dev), torch.tensor(ib, device=dev)
    cu_q, cu_a, cu_b = cu_of(lq, dev), cu_of(la, dev), cu_of(lb, dev)
    tq = sum(lq)
    oa, sa = be.forward(q, k[ia], v[ia], cu_q, cu_a, max(lq), max(la), scale, False)
    ob, sb = be.forward(q, k[ib], v[ib], cu_q, cu_b, max(lq), max(lb), scale, False)
    out, lse = merge_lse(oa.reshape(-1, d), sa.t().reshape(-1), ob.reshape(-1, d), sb.t().reshape(-1))
    out = out.to(q.dtype).view(tq, hq, d)
    lse = lse.view(tq, hq).t().contiguous()
    dqa, dka, dva = be.backward(dout, q, k[ia], v[ia], out, lse, cu_q, cu_a, max(lq), max(la), scale, False)
    dqb, dkb, dvb = be.backward(dout, q, k[ib], v[ib], out, lse, cu_q, cu_b, max(lq), max(lb), scale, False)
    dk, dv = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    dk[ia], dk[ib], dv[ia], dv[ib] = dka.float(), dkb.float(), dva.float(), dvb.float()
    got = (out, lse, dqa.float() + dqb.float(), dk, dv)
    compare("keys split in two calls, merged by LSE, backward with merged out/LSE", got, ref)


def check_cache_and_syncs(dev):
    be = CudnnBackend(fallback=False, **OPTS)
    hq, hkv, d, scale = 16, 4, 128, 128 ** -0.5
    # One shape class: 3-4 segments, longest <= 1024, 2305..2560 tokens.
    shapes = [([700, 900, 800], [700, 900, 800]), ([1000, 600, 400, 400], [1000, 600, 400, 400]),
              ([950, 1023, 425], [950, 1023, 425])]
    for i, (lq, lk) in enumerate(shapes):
        q, k, v, dout = make_inputs(lq, lk, hq, hkv, d, torch.bfloat16, dev, 20 + i)
        run_backend(be, q, k, v, dout, cu_of(lq, dev), cu_of(lk, dev), max(lq), max(lk), scale, True)
        info = be.cache_info()
        say(f"    call {i}: segments {len(lq)}, tokens {sum(lq)}, max {max(lq)} -> "
            f"misses {info['misses']}, hits {info['hits']}, builds {info['builds']}")
    ok = be.cache_info()["misses"] == 2
    say(f"  [{'PASS' if ok else 'FAIL'}] steady state: 3 calls in one shape class built "
        f"{be.cache_info()['builds']} graphs (expect 2: forward and backward)")
    if not ok:
        FAILS.append("graph cache steady state")
    torch.cuda.synchronize()
    lq = lk = [999, 1001, 512]
    q, k, v, dout = make_inputs(lq, lk, hq, hkv, d, torch.bfloat16, dev, 30)
    cu = cu_of(lq, dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_backend(be, q, k, v, dout, cu, cu, max(lq), max(lk), scale, True)
        synced = None
    except RuntimeError as e:
        synced = str(e)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    say(f"  [{'PASS' if synced is None else 'FAIL'}] no host sync in a warm forward+backward"
        + ("" if synced is None else f": {synced[:300]}"))
    if synced is not None:
        FAILS.append("host sync")


def check_variants(dev):
    """Build and check every variant on a causal and a non-causal case."""
    cases = [CASES[3], CASES[4]]
    for variant in candidate_variants(True):
        be = CudnnBackend(fallback=False, variant=variant, backend_only=OPTS.get("backend_only"))
        for case in cases:
            if not case[6] and variant.mask == "legacy":
                continue  # non-causal ignores the mask spelling
            label = f"variant {variant if case[6] else Variant('none', variant.stats, variant.share)}"
            try:
                name, lq, lk, hq, hkv, d, causal, dtype, nc = case
                q, k, v, dout = make_inputs(lq, lk, hq, hkv, d, dtype, dev, 3)
                ref = reference(q, k, v, dout, lq, lk, d ** -0.5, causal)
                got = run_backend(be, q, k, v, dout, cu_of(lq, dev), cu_of(lk, dev), max(lq), max(lk),
                                  d ** -0.5, causal)
                before = len(FAILS)
                compare(f"{label} on '{name}'", got, ref)
                del FAILS[before:]  # a variant that builds but is wrong is reported, not fatal
            except Exception as e:  # noqa: BLE001
                say(f"  [NO BUILD] {label} on '{case[0]}': {type(e).__name__}: {str(e)[:300]}")


# ------------------------------------------------------------------------------------------
# benchmark
# ------------------------------------------------------------------------------------------


def causal_pairs(lq, lk, causal):
    if not causal:
        return sum(a * b for a, b in zip(lq, lk))
    total = 0
    for a, b in zip(lq, lk):
        m = min(a, b)  # rows that see keys: the last m, with b - m + 1 .. b keys
        total += m * (b - m) + m * (m + 1) // 2
    return total


def timed(fn, iters):
    fn()
    fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(iters):
        fn()
    t1.record()
    torch.cuda.synchronize()
    return t0.elapsed_time(t1) / iters / 1e3


def bench_one(be, inputs, args, iters):
    """Seconds per forward, per forward+backward, and the peak GiB allocated above the inputs."""
    q, k, v, dout = inputs

    def fwd():
        be.forward(q, k, v, *args)

    def fwd_bwd():
        o, lse = be.forward(q, k, v, *args)
        be.backward(dout, q, k, v, o, lse, *args)

    tf = timed(fwd, iters)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    tb = timed(fwd_bwd, iters)
    return tf, tb, (torch.cuda.max_memory_allocated() - base) / 2**30


def bench(backends, dev, sizes, iters):
    hq, hkv, d = 16, 4, 128
    rows = []
    shapes = []
    for t in sizes:
        for nseq in (1, 4, t // 4096):
            shapes.append((f"T {t // 1024}K, {nseq} seq, causal, 16/4", [t // nseq] * nseq,
                           [t // nseq] * nseq, hq, hkv, True))
    g = torch.Generator().manual_seed(0)
    lq = torch.randint(2048, 6144, (32,), generator=g).tolist()
    shapes.append(("MoBA selected-like: H 1, 32 segs x ~4K q x 4096 k, non-causal", lq, [4096] * 32, 1, 1,
                   False))
    say("| shape | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | peak GiB fwd+bwd |")
    say("|---|---|---|---|---|---|---|")
    for name, lq, lk, hq_, hkv_, causal in shapes:
        try:
            inputs = make_inputs(lq, lk, hq_, hkv_, d, torch.bfloat16, dev, 1)
        except Exception as e:  # noqa: BLE001
            say(f"| {name} | - | inputs failed: {type(e).__name__}: {e} | | | | |")
            continue
        args = (cu_of(lq, dev), cu_of(lk, dev), max(lq), max(lk), d ** -0.5, causal)
        flops_fwd = 4 * causal_pairs(lq, lk, causal) * hq_ * d
        for bname, be in backends:
            try:
                tf, tb, peak = bench_one(be, inputs, args, iters)
                rows.append((name, bname, tf, tb))
                say(f"| {name} | {bname} | {tf * 1e3:.2f} | {flops_fwd / tf / 1e12:.0f} | {tb * 1e3:.2f} | "
                    f"{3.5 * flops_fwd / tb / 1e12:.0f} | {peak:.2f} |")
            except Exception as e:  # noqa: BLE001
                say(f"| {name} | {bname} | failed: {type(e).__name__}: {str(e)[:200]} | | | | |")
        del inputs
        torch.cuda.empty_cache()
    say("")
    by = {}
    for name, bname, tf, tb in rows:
        by.setdefault(name, {})[bname] = (tf, tb)
    for name, r in by.items():
        if "cudnn" in r and "aten_flash" in r:
            say(f"  speedup over FA2, {name}: fwd {r['aten_flash'][0] / r['cudnn'][0]:.2f}x, "
                f"fwd+bwd {r['aten_flash'][1] / r['cudnn'][1]:.2f}x")


# ------------------------------------------------------------------------------------------


def section(title):
    say("")
    say(f"## {title}")


def guarded(label, fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        FAILS.append(label)
        say(f"  [ERROR] {label}: {type(e).__name__}: {e}")
        say("    " + "".join(traceback.format_exc().splitlines(keepends=True)[-6:]).replace("\n", "\n    "))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,65536,131072")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-variants", action="store_true")
    ap.add_argument("--variant", default=None, help="pin a graph variant, e.g. stats=padded,mask=legacy")
    ap.add_argument("--backend-only", action="store_true",
                    help="exclude the frontend's Python-side engines (cuDNN's own engines only)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    OPTS.update(backend_only=True if a.backend_only else None)
    dev = torch.device("cuda")
    t_start = time.time()

    section("environment")
    say(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    say(f"device {torch.cuda.get_device_name(dev)}, capability {torch.cuda.get_device_capability(dev)}")
    be = CudnnBackend(fallback=False, variant=a.variant, **OPTS)
    cudnn = be.module()
    if cudnn is None:
        say(f"cudnn does not import: {be.import_error}")
        FAILS.append("import")
    else:
        say(f"cudnn frontend {getattr(cudnn, '__version__', '?')}, backend {cudnn.backend_version()} "
            f"({getattr(cudnn, 'backend_version_string', lambda: '?')()}), from {cudnn.__file__}")
    for dt, hd in ((torch.bfloat16, 128), (torch.float16, 64), (torch.bfloat16, 256), (torch.float32, 128)):
        say(f"supports({dt}, head_dim={hd}) = {be.supports(dev, dt, hd)}")
    fa2 = AtenFlashBackend()
    if not fa2.supports(dev, torch.bfloat16, 128):
        fa2 = None
        say("PyTorch FlashAttention-2 unavailable: no yardstick")
    if cudnn is None:
        return finish(a, t_start)

    section("correctness vs float64 reference (max abs / mean abs error)")
    for i, case in enumerate([*CASES, moba_selected_case(dev)]):
        guarded(case[0], check_case, be, fa2, case, dev, 100 + i)
    guarded("split keys + merged LSE", check_split_merge, be, dev)

    section("graph cache and host syncs")
    guarded("cache/syncs", check_cache_and_syncs, dev)

    if not a.skip_variants and a.variant is None:
        section("graph variants (each built alone)")
        check_variants(dev)

    if not a.skip_bench:
        section("timing (bf16, D 128; TFLOP/s: causal pairs only, backward counted as 2.5x forward)")
        sizes = [int(s) for s in a.sizes.split(",") if s]
        backends = [("cudnn", be)] + ([("aten_flash", fa2)] if fa2 is not None else [])
        guarded("bench", bench, backends, dev, sizes, a.iters)

    section("graph cache of the main backend instance")
    info = be.cache_info()
    for k_, v_ in info.items():
        if k_ != "errors":
            say(f"  {k_}: {v_}")
    for err in info["errors"]:
        say(f"  build error: {err}")
    for key, val in be.engines().items():
        say(f"  {key[0]} {key[1]} hq={key[2]} hkv={key[3]} d={key[4]} {key[5]} causal={key[6]}: {val}")
    return finish(a, t_start)


def finish(a, t_start):
    section("summary")
    say(f"{'ALL PASS' if not FAILS else 'FAILED: ' + '; '.join(FAILS)} ({time.time() - t_start:.0f} s)")
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(LINES) + "\n")
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
