"""Context-parallel MoBA (gloo, spawned processes) against the dense reference and the
single-device function, plus traffic accounting."""

import torch
from dist_utils import run_distributed
from helpers import moba_case

from moba_dist import last_stats, moba_attn_varlen, moba_attn_varlen_cp

# (lengths of sequences, slice lengths per rank, chunk, topk, hq, hkv)
CASES = [
    ([37], [37], 4, 3, 4, 2),  # W=1
    ([30, 34], [32, 32], 4, 2, 4, 4),  # equal slices, sequence crosses the boundary
    ([64], [5, 27, 32], 8, 3, 4, 1),  # unequal; rank 0 holds part of one block only
    ([10, 23, 27], [13, 1, 46], 4, 3, 2, 1),  # a one-token slice inside a block
    ([60], [2, 28, 0, 30], 7, 2, 4, 2),  # an empty slice; blocks span ranks
    ([50, 14], [16, 16, 16, 16], 20, 2, 4, 2),  # chunk larger than a slice
    ([64], [16, 16, 16, 16], 4, 1, 2, 2),  # topk 1: current block only, prefix still fetched
    ([33, 31], [11, 21, 17, 15], 3, 30, 4, 1),  # topk above the number of blocks
    ([9, 0, 40, 15], [20, 25, 19], 5, 4, 8, 2),  # several sequences, an empty one, GQA 4:1
]


def check_cases(rank, world, cases):
    for lengths, slices, chunk, topk, hq, hkv in cases:
        if len(slices) != world:
            continue
        cu, q, k, v, go, ref, (dq, dk, dv) = moba_case(lengths, chunk, topk, hq, hkv)
        single = moba_attn_varlen(q, k, v, cu, max(lengths), chunk, topk)

        a = sum(slices[:rank])
        b = a + slices[rank]
        local = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
        out = moba_attn_varlen_cp(*local, cu, chunk, topk)
        out.backward(go[a:b])
        tag = f"rank {rank} case {lengths} {slices} chunk={chunk} topk={topk}"
        for name, got, want in [("out", out, ref[a:b]), ("single", out, single[a:b]),
                                ("dq", local[0].grad, dq[a:b]),
                                ("dk", local[1].grad, dk[a:b]),
                                ("dv", local[2].grad, dv[a:b])]:
            err = (got - want).abs().max().item() if got.numel() else 0.0
            assert err <= 1e-10, f"{tag}: {name} max abs error {err}"
        st = last_stats()
        assert st.world_size == world and st.rank == rank and st.local_tokens == b - a
        if st.path == "moba":
            assert st.bytes_received.get("kv_fetch", 0) == st.planned_fetch_bytes, tag


def test_cp_world_1_and_2():
    run_distributed(check_cases, 1, CASES)
    run_distributed(check_cases, 2, CASES)


def test_cp_world_3():
    run_distributed(check_cases, 3, CASES)


def test_cp_world_4():
    run_distributed(check_cases, 4, CASES)


def traffic_worker(rank, world):
    """One sequence of 64 tokens, chunk 4 (16 blocks), 4 equal slices aligned to blocks. Block 1's
    keys stand out along x and every query leans along x, so with topk=2 every query past block 1
    selects exactly block 1: ranks 1-3 must fetch its 4 tokens x 2 kv heads from rank 0, nothing
    else, and backward returns exactly those gradients."""
    d, hkv, hq, chunk = 8, 2, 4, 4
    g = torch.Generator().manual_seed(5)
    k = 0.1 * torch.randn(64, hkv, d, generator=g, dtype=torch.float64)
    k[4:8, :, 0] += 5.0
    q = 0.1 * torch.randn(64, hq, d, generator=g, dtype=torch.float64)
    q[:, :, 0] += 1.0
    v = torch.randn(64, hkv, d, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    sl = slice(16 * rank, 16 * rank + 16)
    local = [t[sl].clone().requires_grad_() for t in (q, k, v)]
    out = moba_attn_varlen_cp(*local, cu, chunk, 2)
    st = last_stats()
    row = 2 * d * 8  # one token of one kv head: K and V rows, float64
    expect_in = 0 if rank == 0 else 4 * hkv * row
    assert st.planned_fetch_bytes == expect_in
    assert st.bytes_received["kv_fetch"] == expect_in
    assert st.bytes_sent["kv_fetch"] == (3 * 4 * hkv * row if rank == 0 else 0)
    assert st.fetched_pairs == (0 if rank == 0 else hkv)
    assert st.allgather_kv_bytes == 48 * hkv * row
    assert st.allgather_kv_pairs == 12 * hkv
    assert st.selected_blocks_per_query <= 2.0
    out.sum().backward()
    # Backward fetches the same rows again (nothing was kept), then returns their gradients.
    assert st.bytes_received["kv_fetch.refetch"] == expect_in
    assert st.bytes_sent["kv_fetch.backward"] == expect_in
    assert st.bytes_received["kv_fetch.backward"] == (3 * 4 * hkv * row if rank == 0 else 0)
    ref = moba_attn_varlen(q, k, v, cu, 64, chunk, 2)
    assert (out - ref[sl]).abs().max().item() <= 1e-10


def test_traffic_matches_the_selection():
    run_distributed(traffic_worker, 4)
