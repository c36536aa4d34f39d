"""Demo: MoBA on one device, then the same sequence sharded over 2 processes (gloo, CPU).

    python scripts/demo.py

Prints the largest difference between the context-parallel result and the one-device result,
and what each rank fetched compared with an all-gather of K and V.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moba_dist

T, HQ, HKV, D, CHUNK, TOPK = 4096, 8, 2, 64, 256, 3


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (HQ, HKV, HKV))
    cu = torch.tensor([0, 1500, T], dtype=torch.int32)  # two packed sequences
    return q, k, v, cu


def worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    q, k, v, cu = inputs()
    n = T // world
    sl = slice(rank * n, (rank + 1) * n)
    local = [t[sl].clone().requires_grad_() for t in (q, k, v)]
    out = moba_dist.moba_attn_varlen_cp(*local, cu, CHUNK, TOPK)
    out.sum().backward()
    st = moba_dist.last_stats()
    ref = moba_dist.moba_attn_varlen(q, k, v, cu, 2596, CHUNK, TOPK)
    print(f"rank {rank}: max |cp - single| = {(out - ref[sl]).abs().max():.2e}; fetched "
          f"{st.bytes_received.get('kv_fetch', 0) / 2**10:.0f} KiB ({st.fetched_pairs} (block, head) items) "
          f"vs all-gather {st.allgather_kv_bytes / 2**10:.0f} KiB; blocks/query "
          f"{st.selected_blocks_per_query:.2f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    q, k, v, cu = inputs()
    out = moba_dist.moba_attn_varlen(q, k, v, cu, 2596, CHUNK, TOPK)
    print(f"one device: out {tuple(out.shape)} {out.dtype}, "
          f"{moba_dist.last_stats().selected_blocks_per_query:.2f} blocks per query")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(2, os.path.join(tmp, "rdzv")), nprocs=2)


if __name__ == "__main__":
    main()
