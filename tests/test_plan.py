"""The CP planner alone (pure functions): property tests with hypothesis.

Every rank's rows are labelled by a global id ``head * T + token``; the all-to-all is simulated
by slicing each sender's ``send_index`` by its splits. Then every needed row must arrive exactly
once, nothing else may arrive, and the assembled segments and prefix must be exactly the rows
their blocks define.
"""

import torch
from helpers import sharded_streams
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist.blocks import BlockLayout
from moba_dist.parallel.plan import expand_ranges, fetch_plan, local_plan


@st.composite
def scenarios(draw):
    lengths, offsets, world = draw(sharded_streams(30))
    chunk = draw(st.integers(1, 9))
    hkv = draw(st.integers(1, 3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    layout = BlockLayout.build(cu, chunk)
    # A rank may only have selected past blocks of sequences it holds queries in.
    need = torch.zeros(world, hkv, layout.num_blocks, dtype=torch.bool)
    for r in range(world):
        a, b = int(offsets[r]), int(offsets[r + 1])
        if b == a:
            continue
        blocks = layout.block_of(torch.arange(a, b))
        past = set()
        for j in blocks.unique().tolist():
            past.update(range(int(layout.first_block[j]), j))
        for j in sorted(past):
            for g in range(hkv):
                need[r, g, j] = draw(st.booleans())
    return layout, offsets, need, hkv


def rows_of(layout, j, g, lo, hi):
    """Global ids of block j's tokens in [lo, hi), head g."""
    total = int(layout.cu_seqlens[-1])
    s, e = int(layout.start[j]), int(layout.end[j])
    return [g * total + t for t in range(max(s, lo), min(e, hi))]


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_fetch_plan_moves_exactly_the_needed_rows(sc):
    layout, offsets, need, hkv = sc
    world = offsets.numel() - 1
    total = int(offsets[-1])
    plans = [fetch_plan(layout, offsets, need, r) for r in range(world)]
    local_ids = []
    for r in range(world):
        a, b = int(offsets[r]), int(offsets[r + 1])
        ids = torch.arange(hkv)[:, None] * total + torch.arange(a, b)[None, :]  # head-major rows
        local_ids.append(ids.flatten())

    for dst in range(world):
        lp = local_plan(layout, offsets, dst)
        a = int(offsets[dst])
        # Counts agree on both sides.
        for src in range(world):
            assert plans[src].send_splits[dst] == plans[dst].recv_splits[src]
        # Simulated receive buffer, in source order.
        recv = []
        for src in range(world):
            lo = sum(plans[src].send_splits[:dst])
            sent = plans[src].send_index[lo: lo + plans[src].send_splits[dst]]
            recv.append(local_ids[src][sent])
        recv = torch.cat(recv) if recv else torch.zeros(0, dtype=torch.int64)
        assert recv.numel() == recv.unique().numel(), "a row was requested twice"
        wanted = set()
        for g, j in torch.nonzero(need[dst]).tolist():
            wanted.update(rows_of(layout, j, g, 0, a))
        if lp.prefix_block >= 0:
            for g in range(hkv):
                wanted.update(rows_of(layout, lp.prefix_block, g, 0, a))
        assert set(recv.tolist()) == wanted, "received rows differ from the needed rows"

        # Segments assemble each selected block whole, in token order.
        pool = torch.cat([recv, local_ids[dst]])
        got = pool[plans[dst].seg_index].tolist()
        expect = []
        for g, j in torch.nonzero(need[dst]).tolist():
            expect += rows_of(layout, j, g, 0, total)
        assert got == expect
        assert plans[dst].seg_len.sum().item() == len(expect)
        # The causal prefix: tokens of the first block before this slice, head-major.
        pre = pool[plans[dst].prefix_index]
        assert pre.shape == (hkv, lp.prefix_len)
        for g in range(hkv):
            assert pre[g].tolist() == (rows_of(layout, lp.prefix_block, g, 0, a) if lp.prefix_len else [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 6)), max_size=8))
def test_expand_ranges(ranges):
    starts = torch.tensor([s for s, _ in ranges], dtype=torch.int64)
    lens = torch.tensor([n for _, n in ranges], dtype=torch.int64)
    want = [x for s, n in ranges for x in range(s, s + n)]
    assert expand_ranges(starts, lens).tolist() == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 25), min_size=1, max_size=5), st.integers(1, 8))
def test_block_layout(lengths, chunk):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    lay = BlockLayout.build(cu, chunk)
    expect = []
    for s, n in zip(cu[:-1].tolist(), lengths):
        first = len(expect)
        expect += [(s + i, min(chunk, n - i), first) for i in range(0, n, chunk)]
    assert list(zip(lay.start.tolist(), lay.length.tolist(), lay.first_block.tolist())) == expect
