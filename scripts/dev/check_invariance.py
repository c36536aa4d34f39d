"""GPU check of the invariance contract: CP over W GPUs, with slices cut inside blocks, selects
bitwise the blocks the single-GPU call selects on the same inputs, and two runs give bitwise
equal outputs and gradients.

    torchrun --nproc-per-node 2 scripts/dev/check_invariance.py --size 262144 --configs 128:8,4096:12

One sequence, Hq 16, Hkv 4, D 128, bf16, random inputs. Every rank runs the single-GPU
``moba_attn_varlen`` on the whole sequence and compares the selection of its own slice with what
``moba_attn_varlen_cp`` selected there (``MOBA_DIST_RECORD_SELECTION=1``). The slices are
``T/W`` tokens shifted by an odd offset so that every cut falls inside a block.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ["MOBA_DIST_RECORD_SELECTION"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moba_dist  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=262144)
    ap.add_argument("--configs", default="128:8,4096:12")
    ap.add_argument("--shift", type=int, default=1001, help="odd offset of every cut")
    ap.add_argument("--deterministic", action="store_true",
                    help="torch.use_deterministic_algorithms(True) for the repeat runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    t = a.size
    g = torch.Generator(device=dev).manual_seed(7)
    q, k, v, go = (torch.randn(t, h, 128, device=dev, generator=g, dtype=torch.bfloat16)
                   for h in (16, 4, 4, 16))
    cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
    cuts = [0] + [r * t // world + a.shift for r in range(1, world)] + [t]
    sl = slice(cuts[rank], cuts[rank + 1])
    lines = []
    for cfg in a.configs.split(","):
        chunk, topk = (int(x) for x in cfg.split(":"))
        moba_dist.moba_attn_varlen(q, k, v, cu, t, chunk, topk)
        want = moba_dist.last_stats().selection[sl]
        runs = []
        for _ in range(2):
            xs = [x[sl].clone().requires_grad_() for x in (q, k, v)]
            out = moba_dist.moba_attn_varlen_cp(*xs, cu, chunk, topk)
            got = moba_dist.last_stats().selection
            out.backward(go[sl])
            runs.append([out.detach()] + [x.grad for x in xs])
        rows_differ = (got != want).any(-1).sum()
        same = torch.tensor([int(all(torch.equal(x, y) for x, y in zip(*runs)))], device=dev)
        stats = torch.stack([rows_differ, torch.tensor(want.shape[0] * want.shape[1], device=dev)])
        dist.all_reduce(stats)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        line = (f"chunk {chunk} topk {topk}, T={t}, W={world}, cuts {cuts}: "
                f"{int(stats[0])} of {int(stats[1])} (query, head) rows select differently from the "
                f"single-GPU call; two CP runs bitwise equal (out, dq, dk, dv): {bool(same.item())}"
                f" (deterministic mode: {a.deterministic})")
        if rank == 0:
            print(line, flush=True)
        lines.append(line)
    if rank == 0 and a.out:
        open(a.out, "w").write("\n".join(lines) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
