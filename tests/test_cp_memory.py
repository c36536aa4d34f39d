"""Training-scale memory and planning of CP MoBA: re-fetch in backward vs keeping the fetched rows,
host syncs per call, planning reused across layers."""

import os

import torch
from dist_utils import run_distributed
from helpers import make_cu

from moba_dist import last_stats, moba_attn_varlen_cp
from moba_dist.parallel import plan as plan_mod
from moba_dist.reference import moba_attn_varlen_reference

# (sequence lengths, slice lengths per rank, chunk, topk, hq, hkv): slices cut inside blocks.
CASES = [
    ([41], [41], 4, 3, 4, 2),
    ([30, 34], [29, 35], 4, 3, 4, 2),
    ([64], [5, 27, 32], 8, 3, 4, 1),
    ([9, 0, 40, 15], [13, 22, 3, 26], 5, 4, 8, 2),
]


def _grads(local, cu, chunk, topk, go, keep):
    os.environ["MOBA_DIST_KEEP_FETCHED"] = "1" if keep else "0"
    xs = [t.clone().requires_grad_() for t in local]
    out = moba_attn_varlen_cp(*xs, cu, chunk, topk)
    st = last_stats()
    out.backward(go)
    return out.detach(), [x.grad for x in xs], st


def refetch_worker(rank, world):
    for lengths, slices, chunk, topk, hq, hkv in CASES:
        if len(slices) != world:
            continue
        cu = make_cu(lengths)
        total = int(cu[-1])
        g = torch.Generator().manual_seed(total + chunk)
        q, k, v, go = (torch.randn(total, h, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
        a = sum(slices[:rank])
        b = a + slices[rank]
        local = [t[a:b] for t in (q, k, v)]
        out_r, grads_r, st_r = _grads(local, cu, chunk, topk, go[a:b], keep=False)
        out_k, grads_k, st_k = _grads(local, cu, chunk, topk, go[a:b], keep=True)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        moba_attn_varlen_reference(*full, cu, chunk, topk).backward(go)
        tag = f"rank {rank} {lengths} {slices}"
        assert torch.equal(out_r, out_k), tag
        for name, gr, gk, ref in zip("qkv", grads_r, grads_k, full):
            # Same kernels on the same rows in the same order: bitwise equal, and exact.
            assert torch.equal(gr, gk), f"{tag}: d{name} differs between re-fetch and keep"
            err = (gr - ref.grad[a:b]).abs().max().item() if gr.numel() else 0.0
            assert err <= 1e-10, f"{tag}: d{name} error {err}"
        if world > 1:
            assert st_r.bytes_received.get("kv_fetch.refetch", 0) == st_r.bytes_received.get("kv_fetch", 0)
            assert "kv_fetch.refetch" not in st_k.bytes_received
        # Two host syncs per call: slice lengths + cu_seqlens, and the selection counts.
        assert st_r.host_syncs == 2 and st_k.host_syncs == 2, tag


def test_refetch_equals_keep_world_1_2():
    run_distributed(refetch_worker, 1)
    run_distributed(refetch_worker, 2)


def test_refetch_equals_keep_world_3_4():
    run_distributed(refetch_worker, 3)
    run_distributed(refetch_worker, 4)


def plan_reuse_worker(rank, world):
    """Layers of one step share cu_seqlens and slices: the layout plan is built once, and a
    cached plan equals a freshly built one."""
    cu = make_cu([50, 30])
    slices = [37, 43]
    a = sum(slices[:rank])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(80, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    plan_mod._STREAM_CACHE.clear()
    built = []
    real = plan_mod.local_plan

    def counting(*args):
        built.append(args[2])
        return real(*args)

    plan_mod.local_plan = counting
    try:
        outs = [moba_attn_varlen_cp(q[a:a + slices[rank]], k[a:a + slices[rank]], v[a:a + slices[rank]],
                                    cu, 4, 3) for _ in range(3)]
    finally:
        plan_mod.local_plan = real
    assert built == [0, 1], built  # one plan per rank, once, for three "layers"
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    offsets = torch.tensor([0, 37, 80])
    cached = plan_mod.stream_plan(cu.to(torch.int64), offsets, 4)
    for r in range(world):
        fresh = plan_mod.local_plan(cached.layout, offsets, r)
        got = cached.ranks[r]
        for f in ("part_block", "part_start", "part_len"):
            assert torch.equal(getattr(got, f), getattr(fresh, f))
        assert (got.prefix_block, got.prefix_len) == (fresh.prefix_block, fresh.prefix_len)


def test_plan_reused_across_layers():
    run_distributed(plan_reuse_worker, 2)
