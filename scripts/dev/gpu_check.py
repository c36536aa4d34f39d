"""GPU check of moba_attn_varlen: bf16 on CUDA with each CUDA backend vs the float64 dense
reference on the same inputs (issue: foundation GPU check).

    python scripts/dev/gpu_check.py [--total 16384] [--out FILE]
"""

from __future__ import annotations

import argparse

import torch

import moba_dist
from moba_dist.reference import moba_attn_varlen_reference


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--total", type=int, default=16384)
    ap.add_argument("--hq", type=int, default=16)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--head-dim", dest="d", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--backends", default="aten_flash,flash_attn")
    ap.add_argument("--grad-scale", type=float, default=1.0, help="upstream gradient = scale * randn")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    t = a.total
    lengths = [t // 3 + 517, t // 3 - 300]
    lengths.append(t - sum(lengths))  # three sequences, none a multiple of the chunk
    cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], t], dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda h: torch.randn(t, h, a.d, device=dev, generator=g, dtype=torch.float32)  # noqa: E731
    q32, k32, v32, go32 = mk(a.hq), mk(a.hkv), mk(a.hkv), mk(a.hq)
    bf = [x.to(torch.bfloat16) for x in (q32, k32, v32)]
    go = (a.grad_scale * go32).to(torch.bfloat16)
    # The reference runs in float64 on exactly the bf16 values the kernels see.
    ref_in = [x.double().requires_grad_() for x in bf]
    ref = moba_attn_varlen_reference(*ref_in, cu.cpu(), a.chunk, a.topk)
    ref.backward(go.double())
    ref_vals = [ref.detach(), *(x.grad for x in ref_in)]
    del ref
    # The floor no bf16 result can beat: the float64 reference rounded to bf16.
    floor = [(r.to(torch.bfloat16).double() - r).abs().max().item() for r in ref_vals]
    floor_cells = " | ".join(f"{f:.2e} / -" for f in floor)
    rows = [f"| float64 reference rounded to bf16 (floor) | {floor_cells} | |",
            "| max abs of reference | " + " | ".join(f"{r.abs().max():.2f}" for r in ref_vals) + " | |"]
    for name in a.backends.split(","):
        try:
            moba_dist.kernels.get_backend(dev, torch.bfloat16, a.d, name)
        except ValueError as e:
            rows.append(f"| {name} | n/a ({e}) | | | | |")
            continue
        xs = [x.clone().requires_grad_() for x in bf]
        out = moba_dist.moba_attn_varlen(*xs, cu, max(lengths), a.chunk, a.topk, backend=name)
        out.backward(go)
        got = [out.detach(), *(x.grad for x in xs)]
        errs = [((x.double() - r).abs().max().item(), (x.double() - r).abs().mean().item())
                for x, r in zip(got, ref_vals)]
        ok = all(m <= 2e-2 and mean <= 1e-3 for m, mean in errs)
        cells = " | ".join(f"{m:.2e} / {mean:.2e}" for m, mean in errs)
        rows.append(f"| {name} | {cells} | {'PASS' if ok else 'FAIL'} |")
    head = (f"T={t} ({lengths}), Hq={a.hq}, Hkv={a.hkv}, D={a.d}, chunk={a.chunk}, topk={a.topk}, bf16, "
            f"upstream gradient {a.grad_scale} * randn, "
            f"vs float64 reference; cells: max abs / mean abs error\n\n"
            "| backend | out | dq | dk | dv | within 2e-2 / 1e-3 |\n|---|---|---|---|---|---|")
    text = "\n".join([head, *rows])
    print(text)
    if a.out:
        open(a.out, "w").write(text + "\n")


if __name__ == "__main__":
    main()
