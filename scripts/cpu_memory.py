"""Peak resident memory of one forward+backward on the CPU: MoBA against PyTorch's SDPA.

    python scripts/cpu_memory.py                                     # the default table
    python scripts/cpu_memory.py --sizes 16384,32768 --heads 16:4,8:2 --dims 64,128 \\
        --configs 512:4,2048:4 --repeats 3 --allocator

Each measurement runs in a fresh Python subprocess (``--child``), so one method's peak never
mixes with another's. The child builds ``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` (float32, one
sequence of ``T`` tokens, ``requires_grad``) and the upstream gradient, runs a small warm-up call
of the same method (so lazily loaded kernels and one-time allocations are not counted), then
resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM`` to the
current RSS) and records the RSS. It runs one forward and ``torch.autograd.grad`` of the inputs,
and reports ``VmHWM - RSS before``: the peak increase of resident memory over the inputs,
outputs and gradients included (``out``, ``dq, dk, dv`` are part of both methods' peaks). Where
``clear_refs`` cannot be written the child falls back to ``ru_maxrss`` (lifetime peak) minus the
RSS before the call, which can only overstate the peak; the table says which was used.

Run to run, MoBA's RSS peak varies by up to about a quarter: glibc serves buffers below its
(dynamic, up to 32 MiB) mmap threshold from its heap and keeps freed heap memory resident, and
how much depends on the order of frees. With ``MALLOC_MMAP_THRESHOLD_`` fixed (no dynamic
threshold) the RSS peak equals the allocator's. So each cell is the median of ``--repeats``
fresh runs, with the largest beside it; ``--allocator`` adds the peak of bytes handed out by
PyTorch's CPU allocator (the profiler's memory events, replayed; one more child per cell),
which does not vary.

Methods: ``moba C/K`` is ``moba_dist.moba_attn_varlen`` (pure-PyTorch kernels on the CPU),
chunk ``C``, top-k ``K``; ``sdpa`` is ``torch.nn.functional.scaled_dot_product_attention`` with
``is_causal=True, enable_gqa=True`` on ``[1, H, T, D]`` inputs (made in that layout, no
transposed copies). On the CPU PyTorch routes that to its flash-attention CPU kernel
(``_scaled_dot_product_flash_attention_for_cpu``, GQA read in place, no ``T x T`` matrix);
``--child`` reports the backend ``torch._fused_sdp_choice`` picks, and the table shows it.

Columns: the peak increase of MoBA and SDPA in MiB, their ratio (medians; "worst": the largest
MoBA run over the median SDPA), and the growth of each median from the smallest to the largest
``T`` (linear in ``T`` is 2.0 for 16K -> 32K).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _allocator_peak(fn) -> int:
    """Most bytes PyTorch's CPU allocator had handed out at once during ``fn()``, from its start."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def child(args) -> dict:
    import torch

    sys.path.insert(0, ROOT)
    import moba_dist

    torch.manual_seed(0)
    t, hq, hkv, d = args.tokens, args.hq, args.hkv, args.dim

    def inputs(n):
        if args.method == "sdpa":
            shapes = [(1, hq, n, d), (1, hkv, n, d), (1, hkv, n, d)]
        else:
            shapes = [(n, hq, d), (n, hkv, d), (n, hkv, d)]
        q, k, v = (torch.randn(s).requires_grad_() for s in shapes)
        return q, k, v, torch.randn(shapes[0])

    def call(q, k, v, go):
        if args.method == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            n = q.shape[0]
            cu = torch.tensor([0, n], dtype=torch.int32)
            out = moba_dist.moba_attn_varlen(q, k, v, cu, n, args.chunk, args.topk)
        grads = torch.autograd.grad(out, (q, k, v), go)
        return out, grads

    info = {}
    if args.method == "sdpa":
        q, k, v, _ = inputs(256)
        info["sdpa_backend"] = int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True))
    # Warm-up: a short sequence that still takes the sparse path (more than topk blocks).
    warm = max(256, args.chunk * (args.topk + 2)) if args.method == "moba" else 1024
    res = call(*inputs(min(warm, t)))
    del res
    q, k, v, go = inputs(t)
    if args.allocator:
        info["alloc_mib"] = _allocator_peak(lambda: call(q, k, v, go)) / 2**20
        return info
    exact = _reset_peak()
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    res = call(q, k, v, go)
    wall = time.perf_counter() - t0
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del res
    info.update(peak_mib=(peak - before) / 1024, exact=exact, wall_s=wall,
                inputs_mib=sum(x.numel() * 4 for x in (q, k, v)) / 2**20)
    if args.method == "moba":
        info["path"] = moba_dist.last_stats().path
    return info


def run_child(method: str, t: int, hq: int, hkv: int, d: int, chunk: int = 0, topk: int = 0,
              allocator: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--method", method, "--tokens", str(t),
           "--hq", str(hq), "--hkv", str(hkv), "--dim", str(d), "--chunk", str(chunk), "--topk", str(topk)]
    if allocator:
        cmd.append("--allocator")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(repeats: int, allocator: bool, *spec) -> dict:
    """Median and largest RSS peak (and wall time) of ``repeats`` fresh runs, plus the allocator
    peak when asked."""
    runs = [run_child(*spec) for _ in range(repeats)]
    bad = [r for r in runs if "error" in r]
    if bad:
        return bad[0]
    peaks = [r["peak_mib"] for r in runs]
    out = dict(runs[0], peak_mib=statistics.median(peaks), peak_max=max(peaks),
               wall_s=statistics.median(r["wall_s"] for r in runs))
    if allocator:
        out["alloc_mib"] = run_child(*spec, allocator=True).get("alloc_mib", float("nan"))
    return out


SDPA_NAMES = {0: "math", 1: "flash (CPU)", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--heads", default="16:4", help="Hq:Hkv, comma-separated")
    ap.add_argument("--dims", default="64", help="head dims, comma-separated")
    ap.add_argument("--configs", default="512:4,2048:4", help="chunk:topk, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="fresh runs per cell (median, max)")
    ap.add_argument("--allocator", action="store_true", help="also the CPU allocator's peak")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="moba", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hq", type=int, default=16, help=argparse.SUPPRESS)
    ap.add_argument("--hkv", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--topk", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    sizes = [int(s) for s in args.sizes.split(",")]
    heads = [tuple(int(x) for x in h.split(":")) for h in args.heads.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
    rep, alloc = args.repeats, args.allocator
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, one sequence; "
          "peak RSS increase of one forward+backward (inputs excluded; outputs and gradients "
          f"included), median (max) of {rep} fresh runs")
    print()
    extra_head = " MoBA alloc MiB | SDPA alloc MiB | alloc ratio |" if alloc else ""
    extra_rule = "---:|---:|---:|" if alloc else ""
    print(f"| Hq/Hkv | D | chunk/topk | T | MoBA MiB | SDPA MiB | MoBA/SDPA | worst |{extra_head} "
          "MoBA s | SDPA s |")
    print(f"|---|---:|---|---:|---:|---:|---:|---:|{extra_rule}---:|---:|")
    growth = []
    for hq, hkv in heads:
        for d in dims:
            sdpa = {t: measure(rep, alloc, "sdpa", t, hq, hkv, d) for t in sizes}
            for chunk, topk in configs:
                moba = {t: measure(rep, alloc, "moba", t, hq, hkv, d, chunk, topk) for t in sizes}
                for t in sizes:
                    m, s = moba[t], sdpa[t]
                    if "error" in m or "error" in s:
                        print(f"| {hq}/{hkv} | {d} | {chunk}/{topk} | {t} | {m.get('error', '')} "
                              f"| {s.get('error', '')} |")
                        continue
                    cells = ""
                    if alloc:
                        cells = (f" {m['alloc_mib']:.0f} | {s['alloc_mib']:.0f} | "
                                 f"{m['alloc_mib'] / s['alloc_mib']:.2f} |")
                    print(f"| {hq}/{hkv} | {d} | {chunk}/{topk} | {t} | {m['peak_mib']:.0f} "
                          f"({m['peak_max']:.0f}) | {s['peak_mib']:.0f} ({s['peak_max']:.0f}) | "
                          f"{m['peak_mib'] / s['peak_mib']:.2f} | {m['peak_max'] / s['peak_mib']:.2f} |"
                          f"{cells} {m['wall_s']:.1f} | {s['wall_s']:.1f} |", flush=True)
                lo, hi = sizes[0], sizes[-1]
                if all("error" not in r for r in (moba[lo], moba[hi], sdpa[lo], sdpa[hi])):
                    growth.append((hq, hkv, d, chunk, topk, moba[hi]["peak_mib"] / moba[lo]["peak_mib"],
                                   sdpa[hi]["peak_mib"] / sdpa[lo]["peak_mib"], moba[lo].get("path"),
                                   sdpa[lo].get("sdpa_backend"), moba[lo]["exact"]))
    print()
    print(f"| Hq/Hkv | D | chunk/topk | MoBA growth {sizes[-1]}/{sizes[0]} | SDPA growth | MoBA path "
          "| SDPA backend | peak counter |")
    print("|---|---:|---|---:|---:|---|---|---|")
    for hq, hkv, d, chunk, topk, gm, gs, path, be, exact in growth:
        print(f"| {hq}/{hkv} | {d} | {chunk}/{topk} | {gm:.2f} | {gs:.2f} | {path} | "
              f"{SDPA_NAMES.get(be, be)} | {'VmHWM (reset)' if exact else 'ru_maxrss'} |")


if __name__ == "__main__":
    main()
