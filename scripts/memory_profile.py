"""Where GPU memory goes: the live allocations at the peak, grouped by the code that made them.

    python scripts/memory_profile.py op --tokens 262144 --hq 8 --hkv 2 --configs 4096:12,128:8
    python scripts/train.py --preset gpu --seq-len 262144 --steps 2 --memory-snapshot snap.pickle
    python scripts/memory_profile.py report snap.pickle            # any snapshot dumped by torch

``op`` records one forward+backward of ``moba_attn_varlen`` (and of full causal attention with
the same kernels) under ``torch.cuda.memory._record_memory_history`` and reports each. ``report``
reads a dumped snapshot. A report replays the allocator trace (allocations and frees in order),
finds the moment of the highest total, and lists what was alive then, by call site: the first
stack frame inside ``moba_dist``, then ``scripts/`` or ``transformers``, then any frame outside
torch. Allocations older than the recording show up as one "before recording" line.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PREFER = ("moba_dist/", "scripts/", "transformers/")


def _site(frames: list[dict]) -> str:
    """The most telling frame of an allocation's stack (innermost first)."""
    for key in _PREFER:
        for f in frames:
            if key in f["filename"]:
                name = f["filename"].split(key, 1)[1]
                return f"{key}{name}:{f['line']} {f['name']}"
    for f in frames:
        if "/torch/" not in f["filename"] and not f["filename"].startswith("??"):
            return f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}"
    return frames[0]["name"] if frames else "?"


def peak_report(snapshot: dict, base_bytes: int = 0, top: int = 15) -> str:
    """Markdown table of the live allocations at the trace's peak, by site."""
    lines = []
    for dev, trace in enumerate(snapshot["device_traces"]):
        if not trace:
            continue
        live: dict[int, tuple[int, str]] = {}
        total = peak = base_bytes
        peak_at = -1
        for i, ev in enumerate(trace):
            if ev["action"] == "alloc":
                live[ev["addr"]] = ev["size"]
                total += ev["size"]
            elif ev["action"] == "free_completed":
                # A block allocated before the recording leaves the "before" share when freed.
                total -= live.pop(ev["addr"], ev["size"])
            if total > peak:
                peak, peak_at = total, i
        # Replay to the peak again, keeping each live block's site.
        sites: dict[int, tuple[int, str]] = {}
        before = base_bytes
        for ev in trace[:peak_at + 1]:
            if ev["action"] == "alloc":
                sites[ev["addr"]] = (ev["size"], _site(ev.get("frames", [])))
            elif ev["action"] == "free_completed":
                if ev["addr"] in sites:
                    del sites[ev["addr"]]
                else:
                    before -= ev["size"]
        by_site: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for size, site in sites.values():
            by_site[site][0] += size
            by_site[site][1] += 1
        if before:
            by_site["(before recording, still live)"] = [before, 0]
        lines.append(f"device {dev}: peak {peak / 2**30:.2f} GiB at event {peak_at} of {len(trace)}\n")
        lines.append("| GiB at peak | blocks | site |\n|---:|---:|---|")
        for site, (size, count) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"| {size / 2**30:.3f} | {count} | `{site}` |")
    return "\n".join(lines)


def record(fn, max_entries: int = 2_000_000) -> tuple[dict, int, int]:
    """Run ``fn`` under allocation recording; returns (snapshot, bytes live before, peak)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    fn()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    return snap, base, torch.cuda.max_memory_allocated()


def _live_tensors(exclude=(), top: int = 8) -> str:
    """The largest CUDA tensors Python still references (what a call left behind)."""
    skip = {id(x) for x in exclude}
    found = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda and id(obj) not in skip:
                found.append((obj.untyped_storage().nbytes(), tuple(obj.shape), obj.dtype))
        except Exception:
            continue
    found.sort(key=lambda t: -t[0])
    return "live: " + ", ".join(f"{sh} {dt} {n / 2**20:.0f} MiB" for n, sh, dt in found[:top])


def _op(args) -> None:
    import moba_dist
    from moba_dist.moba import causal_attn_varlen

    dev = torch.device("cuda")
    t, hq, hkv, d = args.tokens, args.hq, args.hkv, args.head_dim
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(t, h, d, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, device=dev, dtype=torch.bfloat16, generator=g)
    inputs = sum(x.numel() * x.element_size() for x in (q, k, v, dout))
    runs = [("full causal", lambda: causal_attn_varlen(q, k, v, cu.cpu(), d ** -0.5, None))]
    for cfg in args.configs.split(","):
        c, kk = (int(x) for x in cfg.split(":"))
        runs.append((f"moba {c}/{kk}", lambda c=c, kk=kk: moba_dist.moba_attn_varlen(q, k, v, cu, t, c, kk)))
    mode = "forward only, no_grad" if args.forward_only else "fwd+bwd"
    out_md = [f"# op alone: {t} tokens, {hq} q / {hkv} kv heads, d {d}, bf16, {mode}\n",
              f"inputs q, k, v, dout: {inputs / 2**30:.2f} GiB\n"]
    for name, f in runs:
        def step(f=f):
            if args.forward_only:
                with torch.no_grad():
                    f()
                return
            out = f()
            out.backward(dout)
            q.grad = k.grad = v.grad = None
        step()  # warm-up: kernels compiled, caches filled
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        retained = torch.cuda.memory_allocated() - inputs
        snap, base, peak = record(step)
        out_md.append(f"## {name}: peak {peak / 2**30:.2f} GiB (extra over what was live before "
                      f"{(peak - base) / 2**30:.2f} GiB)\n")
        # Anything a call leaves allocated would stay alive into the next layer.
        out_md.append(f"left allocated after the call (besides inputs): {retained / 2**30:.3f} GiB"
                      + (f"; {_live_tensors(exclude=(q, k, v, dout))}" if retained > 2**26 else "") + "\n")
        out_md.append(peak_report(snap, base) + "\n")
        if args.dump:
            with open(os.path.join(args.dump, f"snap_{name.replace(' ', '_').replace('/', '_')}.pickle"),
                      "wb") as fh:
                pickle.dump(snap, fh)
    text = "\n".join(out_md)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    op = sub.add_parser("op", help="one fwd+bwd of the op alone, MoBA and full attention")
    op.add_argument("--tokens", type=int, default=262144)
    op.add_argument("--hq", type=int, default=8)
    op.add_argument("--hkv", type=int, default=2)
    op.add_argument("--head-dim", type=int, default=128)
    op.add_argument("--configs", default="4096:12,128:8")
    op.add_argument("--forward-only", action="store_true", help="one forward under no_grad (prefill)")
    op.add_argument("--out", default=None, help="write the markdown report here")
    op.add_argument("--dump", default=None, help="folder for the raw snapshots")
    rep = sub.add_parser("report", help="report a snapshot pickle")
    rep.add_argument("snapshot")
    rep.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    if args.cmd == "op":
        _op(args)
    else:
        with open(args.snapshot, "rb") as fh:
            snap = pickle.load(fh)
        print(peak_report(snap, snap.get("base_bytes", 0), args.top))


if __name__ == "__main__":
    main()
