"""The selection is a function of the inputs alone: bitwise the same for any slicing across ranks,
any gate tiling and with or without work-balanced gating (float32, CPU, gloo)."""

import os

import torch
from dist_utils import run_distributed
from helpers import make_cu
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist import last_stats, moba_attn_varlen, moba_attn_varlen_cp
from moba_dist.blocks import BlockLayout
from moba_dist.gating import block_means, block_part_sums, gate_tiles, select_blocks
from moba_dist.parallel.balance import balanced_offsets, gate_work

LENGTHS, CHUNK, TOPK, HQ, HKV, D = [70, 3, 95], 6, 4, 4, 2, 16
# Slicings of the 168-token stream, cuts inside blocks, some slices empty.
SLICINGS = {1: [[168]], 2: [[31, 137], [100, 68]], 3: [[1, 80, 87], [56, 0, 112]],
            4: [[20, 41, 43, 64], [0, 77, 5, 86]]}


def _inputs():
    g = torch.Generator().manual_seed(11)
    total = sum(LENGTHS)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (HQ, HKV, HKV))
    k = k + 0.3 * torch.randn(1, HKV, D, generator=g)  # a shared offset: block means matter
    return make_cu(LENGTHS), q, k, v


def invariance_worker(rank, world):
    os.environ["MOBA_DIST_RECORD_SELECTION"] = "1"
    cu, q, k, v = _inputs()
    moba_attn_varlen(q, k, v, cu, max(LENGTHS), CHUNK, TOPK)
    want = last_stats().selection
    assert want is not None and (want >= 0).any()
    for slices in SLICINGS[world]:
        a = sum(slices[:rank])
        b = a + slices[rank]
        for balance in ("0", "1"):
            os.environ["MOBA_DIST_GATE_BALANCE"] = balance
            moba_attn_varlen_cp(q[a:b], k[a:b], v[a:b], cu, CHUNK, TOPK)
            got = last_stats().selection
            assert torch.equal(got, want[a:b]), f"rank {rank} slices {slices} balance {balance}"


def test_selection_invariant_world_1_2():
    run_distributed(invariance_worker, 1)
    run_distributed(invariance_worker, 2)


def test_selection_invariant_world_3_4():
    run_distributed(invariance_worker, 3)
    run_distributed(invariance_worker, 4)


def balanced_grads_worker(rank, world):
    """Gating on balanced slices changes where queries are gated, not what any rank computes."""
    cu, q, k, v = (t.double() if t.is_floating_point() else t for t in _inputs())
    slices = SLICINGS[world][0]
    a = sum(slices[:rank])
    b = a + slices[rank]
    results = []
    for balance in ("0", "1"):
        os.environ["MOBA_DIST_GATE_BALANCE"] = balance
        xs = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
        out = moba_attn_varlen_cp(*xs, cu, CHUNK, TOPK)
        out.sum().backward()
        results.append([out.detach()] + [x.grad for x in xs])
        if balance == "1":
            assert last_stats().bytes_sent.get("gate_balance", 0) >= 0
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_balanced_gating_same_result():
    run_distributed(balanced_grads_worker, 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 80), min_size=1, max_size=4), st.integers(1, 9), st.integers(1, 5))
def test_balanced_offsets_split_work_evenly(lengths, chunk, world):
    if sum(lengths) == 0:
        lengths[0] = 1
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    layout = BlockLayout.build(cu, chunk)
    cuts = balanced_offsets(layout, world)
    assert cuts[0] == 0 and cuts[-1] == cu[-1] and bool((cuts.diff() >= 0).all())
    work = gate_work(layout, cuts)
    per_token_max = int((torch.arange(layout.num_blocks) - layout.first_block + 1).max())
    # Every cut lands within one token of where the running work crosses r/W of the total.
    assert int(work.max()) <= int(work.sum()) / world + per_token_max


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.data())
def test_block_means_invariant_to_splits(chunk, total, data):
    """Summing a block's parts in float64 gives bitwise the same mean however it is cut."""
    g = torch.Generator().manual_seed(total * 13 + chunk)
    k = torch.randn(total, 2, 8, generator=g)
    layout = BlockLayout.build(torch.tensor([0, total]), chunk)
    whole = block_part_sums(k, layout.start, layout.length, chunk)
    cut = data.draw(st.integers(0, total))
    offsets = torch.tensor([0, cut, total])
    ov = layout.overlap(offsets)
    sums = torch.zeros_like(whole)
    for r in range(2):
        blocks = torch.nonzero(ov[r]).flatten()
        start = layout.start[blocks].clamp_min(offsets[r]) - offsets[r]
        sums.index_add_(0, blocks, block_part_sums(k[offsets[r]:offsets[r + 1]], start, ov[r, blocks], chunk))
    assert torch.equal(block_means(sums, layout.length, torch.float32),
                       block_means(whole, layout.length, torch.float32))


def test_gate_invariant_to_tiling():
    cu, q, k, _ = _inputs()
    layout = BlockLayout.build(cu, CHUNK)
    means = block_means(block_part_sums(k, layout.start, layout.length, CHUNK), layout.length, torch.float32)
    n = q.shape[0]
    q_block = layout.block_of(torch.arange(n))
    q_first = layout.first_block[q_block]
    sels = []
    for max_elems in (1, 500, 1 << 20):  # one query per tile ... everything in one tile
        tiles = gate_tiles(layout, 0, n, HQ, max_elems=max_elems)
        sels.append(select_blocks(q, means, q_block, q_first, TOPK, tiles).sort(-1).values)
    assert all(torch.equal(sels[0], s) for s in sels[1:])
