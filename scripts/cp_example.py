"""Context-parallel MoBA, complete: every rank holds a contiguous slice of one packed stream.

    torchrun --nproc-per-node=2 scripts/cp_example.py          # CPU: gloo, float32
    torchrun --nproc-per-node=4 scripts/cp_example.py          # GPUs: NCCL, bf16

Each rank builds the same inputs from a seed, keeps its slice, runs ``moba_attn_varlen_cp``
forward and backward, and compares its output and gradients with the single-device
``moba_attn_varlen`` on the whole stream (which every rank also computes, for the check).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import moba_dist

T, HQ, HKV, D = 6000, 8, 2, 64
CHUNK, TOPK = 256, 3
CU_SEQLENS = [0, 2500, 4100, T]  # three packed sequences of 2500, 1600 and 1900 tokens


def main() -> None:
    cuda = torch.cuda.is_available()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if cuda else torch.float32

    g = torch.Generator().manual_seed(0)  # same inputs on every rank
    q, k, v, dout = (torch.randn(T, h, D, generator=g).to(device, dtype) for h in (HQ, HKV, HKV, HQ))
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32, device=device)

    # This rank's contiguous slice; slices need not be equal nor align with sequences or blocks.
    lo, hi = rank * T // world, (rank + 1) * T // world
    q_l, k_l, v_l = (t[lo:hi].clone().requires_grad_() for t in (q, k, v))
    out_l = moba_dist.moba_attn_varlen_cp(q_l, k_l, v_l, cu, moba_chunk_size=CHUNK, moba_topk=TOPK)
    out_l.backward(dout[lo:hi])
    stats = moba_dist.last_stats()

    # The single-device result on the whole stream, for comparison.
    q_f, k_f, v_f = (t.clone().requires_grad_() for t in (q, k, v))
    out_f = moba_dist.moba_attn_varlen(q_f, k_f, v_f, cu, max_seqlen=max(map(int, cu.diff())),
                                       moba_chunk_size=CHUNK, moba_topk=TOPK)
    out_f.backward(dout)

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    line = (f"rank {rank}/{world}: tokens [{lo}, {hi}), max |cp - single|: out {err(out_l, out_f[lo:hi]):.1e}, "  # noqa: E501
            f"dq {err(q_l.grad, q_f.grad[lo:hi]):.1e}, dk {err(k_l.grad, k_f.grad[lo:hi]):.1e}, "
            f"dv {err(v_l.grad, v_f.grad[lo:hi]):.1e}; received "
            f"{sum(stats.bytes_received.values()) / 2**10:.0f} KiB, all-gather of K and V would be "
            f"{stats.allgather_kv_bytes / 2**10:.0f} KiB")
    lines = [None] * world
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(f"MoBA chunk {CHUNK}, top-k {TOPK}, {T} tokens in {len(CU_SEQLENS) - 1} sequences, "
              f"{dtype}, {world} ranks", flush=True)
        print("\n".join(lines), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
