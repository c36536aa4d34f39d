"""One benchmark command: moba-dist and its anchors on the same shapes, in one run.

    torchrun --nproc-per-node 2 scripts/bench.py --sizes 524288 --configs 128:8,4096:12
    python scripts/bench.py --sizes 262144 --seqs 2 --anchors fa2,cudnn          # one GPU
    torchrun --nproc-per-node 2 scripts/bench.py --cpu --sizes 512 --configs 8:3  # CPU smoke

Shapes: ``--seqs`` sequences of ``size`` tokens each, packed, split into W equal contiguous slices;
Hq 16, Hkv 4, D 128, bf16 (float32 on CPU), random inputs, upstream gradient randn. Each row is
the median forward+backward time (CUDA events, after a warm-up), the peak memory (max over
ranks), the memory kept for backward (growth of allocated memory across the forward, outputs
included, max over ranks), the host syncs per call and the bytes fetched. ``--forward-only``
times the forward alone under ``torch.no_grad`` instead (prefill; TFLOP/s then count the forward).

Methods (rows): ``moba C/K`` (``moba_attn_varlen`` on one GPU, ``moba_attn_varlen_cp`` on W) for
each ``--configs`` entry; anchors (``--anchors``): ``zigzag`` (ring-flash-attn zigzag) and
``ring`` (our ring, automatic kernel backend) over W GPUs; ``fa2`` (PyTorch's bundled
FlashAttention-2; its kernels take equal head counts, so K/V heads are repeated) and ``cudnn``
(cuDNN SDPA through ``scaled_dot_product_attention``) full causal attention on one GPU, one
sequence at a time; ``flash`` (the flash-attn package's ``flash_attn_varlen_func``, GQA read in
place, all sequences in one call) on one GPU.

Writes ``results.md``, ``results.csv``, ``bench.png`` (time against tokens, log-log) and
``meta.json`` (machine, versions, command, commit) under ``--out-dir``; with ``--profile`` also
``profile_<config>.txt``, a torch.profiler breakdown of one moba call by pipeline phase
(``moba.*`` ranges) and by kernel.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import subprocess
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchutil import causal_flops, moba_flops  # noqa: E402

import moba_dist  # noqa: E402
from moba_dist.parallel.ring_flash import unavailable_reason  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="524288", help="tokens per sequence, comma-separated")
    ap.add_argument("--seqs", type=int, default=1, help="packed sequences of each size")
    ap.add_argument("--configs", default="128:8,4096:12", help="chunk:topk, comma-separated")
    ap.add_argument("--anchors", default="zigzag,ring,fa2,cudnn")
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", dest="d", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--forward-only", action="store_true",
                    help="time the forward alone under torch.no_grad (prefill); no gradients")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "bench_out"))
    return ap.parse_args()


def setup(cpu: bool):
    if "RANK" in os.environ:
        dist.init_process_group("gloo" if cpu else "nccl")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if cpu:
        return rank, world, torch.device("cpu"), torch.float32
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    return rank, world, dev, torch.bfloat16


def inputs(total: int, rank: int, world: int, a, dev, dtype):
    """This rank's slice of q, k, v (leaves) and the upstream gradient; same stream on all ranks."""
    n = total // world
    sl = slice(rank * n, total if rank == world - 1 else (rank + 1) * n)
    g = torch.Generator(device=dev).manual_seed(total)
    full = [torch.randn(total, h, a.d, device=dev, generator=g, dtype=dtype)
            for h in (a.hq, a.hkv, a.hkv, a.hq)]
    loc = [x[sl].clone() for x in full]
    del full
    return [x.requires_grad_() for x in loc[:3]], loc[3]


def measure(fn, xs, grad, iters: int, dev, forward_only: bool = False):
    """Median ms of fwd+bwd (or of the forward alone under ``torch.no_grad``, prefill), peak GiB,
    GiB kept across the forward (outputs included)."""
    if forward_only:
        with torch.no_grad():
            return measure(lambda *t: _Done(fn(*t)), xs, grad, iters, dev)
    cuda = dev.type == "cuda"
    times, kept = [], 0.0
    for i in range(iters + 1):
        for x in xs:
            x.grad = None
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            before = torch.cuda.memory_allocated(dev)
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
        else:
            import time
            start = time.perf_counter()
        out = fn(*xs)
        if cuda:
            kept = (torch.cuda.memory_allocated(dev) - before) / 2**30
        out.backward(grad)
        del out
        if cuda:
            t1.record()
            torch.cuda.synchronize(dev)
            ms = t0.elapsed_time(t1)
        else:
            ms = (time.perf_counter() - start) * 1e3
        if i:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    return sorted(times)[len(times) // 2], peak, kept


class _Done:
    """A forward's output standing in for a loss whose backward does nothing (prefill timing)."""

    def __init__(self, out):
        self.out = out

    def backward(self, grad):
        del self.out


def reduce_max(vals, dev, world):
    t = torch.tensor(vals, dtype=torch.float64, device=dev)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def profile_call(fn, xs, grad, path: str, dev, forward_only: bool = False):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        if forward_only:
            with torch.no_grad():
                fn(*xs)
        else:
            fn(*xs).backward(grad)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    ev = prof.key_averages()
    phases = [e for e in ev if e.key.startswith("moba.")]
    with open(path, "w") as f:
        f.write("# pipeline phases (record_function ranges; device time where available)\n")
        f.write(ev.table(sort_by=key, row_limit=40) if not phases else
                "\n".join(f"{e.key:28s} cpu {e.cpu_time_total / 1e3:9.2f} ms   device "
                          f"{getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)) / 1e3:9.2f} ms"
                          f"   calls {e.count}" for e in sorted(phases, key=lambda e: e.key)))
        f.write("\n\n# top operators and kernels\n")
        f.write(ev.table(sort_by=key, row_limit=30))


def meta(a, world, dev):
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["torchrun --nproc-per-node", str(world)] if world > 1 else ["python"])
            + " " + " ".join(sys.argv), "world": world, "torch": torch.__version__,
            "python": platform.python_version(), "moba_dist": moba_dist.__version__}
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                 cwd=os.path.dirname(os.path.abspath(__file__)),
                                                 stderr=subprocess.DEVNULL).strip()
    except Exception:
        info["commit"] = "unknown"
    info["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOBA_DIST_")}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    for mod in ("triton", "flash_attn", "ring_flash_attn", "cudnn"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception:
            info[mod] = None
    return info


def plot(rows, path, forward_only=False):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["tokens"], r["ms"]) for r in rows if r["method"] == method and r["ms"] > 0)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("total tokens")
    ax.set_ylabel("forward ms (no_grad)" if forward_only else "fwd+bwd ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    a = parse()
    rank, world, dev, dtype = setup(a.cpu)
    os.makedirs(a.out_dir, exist_ok=True)
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",") if c]
    anchors = [x for x in a.anchors.split(",") if x]
    rows = []

    def add(method, tokens, ms, peak, kept, flops, syncs=float("nan"), fetched=float("nan")):
        flops = flops / 3.5 if a.forward_only else flops  # the forward's share of fwd+bwd
        row = {"method": method, "world": world, "tokens": tokens, "ms": round(ms, 2),
               "tflops_per_gpu": round(flops / world / ms / 1e9, 1) if ms > 0 else 0.0,
               "peak_gib": round(peak, 2), "kept_gib": round(kept, 3), "host_syncs": syncs,
               "fetched_mib": round(fetched / 2**20, 1) if fetched == fetched else fetched}
        rows.append(row)
        if rank == 0:
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    for size in [int(s) for s in a.sizes.split(",") if s]:
        total = size * a.seqs
        cu = torch.arange(a.seqs + 1, dtype=torch.int32, device=dev) * size
        xs, grad = inputs(total, rank, world, a, dev, dtype)
        for chunk, topk in configs:
            if world == 1:
                def fn(q, k, v, cu=cu, size=size, chunk=chunk, topk=topk):
                    return moba_dist.moba_attn_varlen(q, k, v, cu, size, chunk, topk)
            else:
                def fn(q, k, v, cu=cu, chunk=chunk, topk=topk):
                    return moba_dist.moba_attn_varlen_cp(q, k, v, cu, chunk, topk)
            try:
                ms, peak, kept = measure(fn, xs, grad, a.iters, dev, a.forward_only)
                st = moba_dist.last_stats()
                ms, peak, kept, fetched = reduce_max([ms, peak, kept, st.bytes_received.get("kv_fetch", 0)],
                                                     dev, world)
                add(f"moba {chunk}/{topk}", total, ms, peak, kept,
                    a.seqs * moba_flops(size, a.hq, a.d, chunk, topk), st.host_syncs, fetched)
                if a.profile:
                    path = os.path.join(a.out_dir, f"profile_{chunk}_{topk}_r{rank}.txt")
                    profile_call(fn, xs, grad, path, dev, a.forward_only)
            except Exception as e:  # report and go on: one run should answer every row it can
                if rank == 0:
                    print(f"moba {chunk}/{topk} at {total}: {type(e).__name__}: {e}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        flops = a.seqs * causal_flops(size, a.hq, a.d)
        for name in anchors:
            if name in ("zigzag", "ring") and world > 1:
                impl = "rfa_zigzag" if name == "zigzag" else "ours"
                why = unavailable_reason(impl, xs[0], cu, world) if impl != "ours" else None
                if why:
                    if rank == 0:
                        print(f"{name}: n/a ({why})", flush=True)
                    continue

                def fn(q, k, v, cu=cu, impl=impl):
                    return moba_dist.ring_attn_varlen_cp(q, k, v, cu, impl=impl)
            elif name in ("fa2", "cudnn") and world == 1 and dev.type == "cuda":
                fn = _full_single(name, cu, size, a.seqs)
            elif name == "flash" and world == 1 and dev.type == "cuda":
                try:
                    from flash_attn import flash_attn_varlen_func
                except ImportError:
                    print("flash: n/a (flash-attn not installed)", flush=True)
                    continue

                def fn(q, k, v, cu=cu, size=size):
                    return flash_attn_varlen_func(q, k, v, cu, cu, size, size, causal=True)
            else:
                continue
            try:
                ms, peak, kept = measure(fn, xs, grad, max(1, a.iters - 1), dev, a.forward_only)
                ms, peak, kept = reduce_max([ms, peak, kept], dev, world)
                add(name, total, ms, peak, kept, flops)
            except Exception as e:
                if rank == 0:
                    print(f"{name} at {total}: {type(e).__name__}: {e}", flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        del xs, grad

    if rank == 0:
        info = meta(a, world, dev)
        with open(os.path.join(a.out_dir, "meta.json"), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(a.out_dir, "results.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["method"])
            w.writeheader()
            w.writerows(rows)
        cols = list(rows[0]) if rows else []
        table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        text = (f"{info.get('gpu', 'cpu')} x{world}, torch {info['torch']}, commit {info['commit']}, "
                f"{info['date']}\n`{info['command']}`\n\n" + "\n".join(table) + "\n")
        with open(os.path.join(a.out_dir, "results.md"), "w") as f:
            f.write(text)
        plot(rows, os.path.join(a.out_dir, "bench.png"), a.forward_only)
        print(text, flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def _full_single(name: str, cu: torch.Tensor, size: int, seqs: int):
    """Full causal attention on one GPU, sequence by sequence: FA2 (bundled) or cuDNN SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if name == "fa2" else SDPBackend.CUDNN_ATTENTION

    def fn(q, k, v):
        outs = []
        for s in range(seqs):
            sl = slice(s * size, (s + 1) * size)
            group = q.shape[1] // k.shape[1]  # the SDPA kernels take equal head counts
            qs, ks, vs = (x[sl].repeat_interleave(group if x is not q else 1, 1).transpose(0, 1)[None]
                          for x in (q, k, v))
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    return fn


if __name__ == "__main__":
    main()
