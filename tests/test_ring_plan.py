"""The ring planner alone (pure host functions), checked against brute-force definitions.

Layouts are checked by listing the global tokens each rank holds; relayouts by simulating the
all-to-all on labelled rows; ring plans by expanding every kernel call into the (query, key)
token pairs it computes and comparing with the causal same-sequence pairs of the stream: each
pair must be computed exactly once over all steps, and nothing else.
"""

import pytest
import torch
from helpers import make_cu, sharded_streams
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist.parallel.ring_plan import (
    contiguous_layout,
    normalize,
    relayout_plan,
    ring_plan,
    same_layout,
    seq_zigzag_layout,
    step_calls,
    zigzag_layout,
)


def tokens(ranges: torch.Tensor) -> list[int]:
    return [t for a, b in ranges.tolist() for t in range(a, b)]


def causal_pairs(cu: list[int]) -> set[tuple[int, int]]:
    return {(i, j) for s, e in zip(cu[:-1], cu[1:]) for i in range(s, e) for j in range(s, i + 1)}


def computed_pairs(cu, layout, rank) -> list[tuple[int, int]]:
    """Every (query token, key token) pair the plan of ``rank`` computes, with repetitions."""
    plan = ring_plan(torch.tensor(cu), layout, rank)
    q_tok = tokens(layout[rank])
    pairs = []
    for s in range(plan.world):
        k_tok = tokens(layout[plan.source[s]])
        assert len(k_tok) == plan.rows_at(s)
        for c in plan.calls[s]:
            cq, ck = c.cu_q.tolist(), c.cu_k.tolist()
            assert cq[0] == 0 and cq[-1] == c.q_end - c.q_begin and ck[-1] == c.k_end - c.k_begin
            assert c.max_q == max(b - a for a, b in zip(cq[:-1], cq[1:]))
            assert c.max_k == max(b - a for a, b in zip(ck[:-1], ck[1:]))
            for i in range(len(cq) - 1):
                lq, lk = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
                for a in range(lq):
                    for b in range(lk):
                        if c.causal and b > a + lk - lq:
                            continue
                        pairs.append((q_tok[c.q_begin + cq[i] + a], k_tok[c.k_begin + ck[i] + b]))
    return pairs


def test_normalize_drops_empty_and_merges_touching():
    r = torch.tensor([[0, 0], [0, 3], [3, 5], [7, 7], [8, 9]])
    assert normalize(r).tolist() == [[0, 5], [8, 9]]
    assert normalize(torch.zeros(0, 2, dtype=torch.int64)).shape == (0, 2)


def test_zigzag_layout_chunks():
    lay = zigzag_layout(16, 4)  # chunks of 2
    assert [x.tolist() for x in lay] == [[[0, 2], [14, 16]], [[2, 4], [12, 14]], [[4, 6], [10, 12]],
                                         [[6, 10]]]  # the two middle chunks touch and merge
    lay = zigzag_layout(5, 4)  # most chunks empty
    assert sorted(t for x in lay for t in tokens(x)) == list(range(5))
    assert same_layout(zigzag_layout(11, 1), contiguous_layout(torch.tensor([0, 11])))


def test_seq_zigzag_layout():
    lay = seq_zigzag_layout(torch.tensor([0, 8, 12]), 2)  # pieces of 2 and 1; touching ranges merge
    assert [x.tolist() for x in lay] == [[[0, 2], [6, 9], [11, 12]], [[2, 6], [9, 11]]]
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_zigzag_layout(torch.tensor([0, 6]), 2)


def test_zigzag_balances_one_sequence():
    """Rank r holds chunks r and 2W-1-r: every rank computes the same number of causal pairs."""
    for world in (2, 3, 4):
        total = 2 * world * 3
        work = [len(computed_pairs([0, total], zigzag_layout(total, world), r)) for r in range(world)]
        assert len(set(work)) == 1, work


def test_step_calls_single_segment_across_ranges():
    # One sequence [0, 16), W=2 zigzag: rank 0 holds [0,4) and [12,16), rank 1 holds [4,12).
    cu = torch.tensor([0, 16])
    lay = zigzag_layout(16, 2)
    (diag,) = step_calls(cu, lay[0], lay[0], True)
    assert diag.causal and diag.cu_q.tolist() == [0, 8] and (diag.q_begin, diag.q_end) == (0, 8)
    (late,) = step_calls(cu, lay[0], lay[1], False)  # only [12,16) sees rank 1's keys, all of them
    assert not late.causal and (late.q_begin, late.q_end, late.k_begin, late.k_end) == (4, 8, 0, 8)
    (early,) = step_calls(cu, lay[1], lay[0], False)  # all of [4,12) sees [0,4) only
    assert (early.q_begin, early.q_end, early.k_begin, early.k_end) == (0, 8, 0, 4)


def test_step_calls_drop_calls_without_work():
    cu = torch.tensor([0, 4, 8])  # rank 1's sequence never meets rank 0's
    lay = contiguous_layout(torch.tensor([0, 4, 8]))
    assert step_calls(cu, lay[1], lay[0], False) == []
    assert step_calls(cu, lay[0], lay[1], False) == []
    with pytest.raises(ValueError, match="overlap"):
        step_calls(cu, lay[0], lay[0], False)


@st.composite
def streams(draw):
    lengths, offsets, world = draw(sharded_streams(12))
    return make_cu(lengths).tolist(), offsets, world


@settings(max_examples=60, deadline=None)
@given(streams(), st.sampled_from(["zigzag", "contiguous"]))
def test_ring_plan_computes_each_causal_pair_once(stream, kind):
    cu, offsets, world = stream
    total = cu[-1]
    layout = zigzag_layout(total, world) if kind == "zigzag" else contiguous_layout(offsets)
    assert sorted(t for x in layout for t in tokens(x)) == list(range(total))
    got = [p for r in range(world) for p in computed_pairs(cu, layout, r)]
    assert len(got) == len(set(got)), "a pair is computed twice"
    assert set(got) == causal_pairs(cu)


@settings(max_examples=60, deadline=None)
@given(streams(), st.sampled_from(["zigzag", "seq_zigzag", "equal"]))
def test_relayout_moves_every_row_to_its_place(stream, kind):
    cu, offsets, world = stream
    total = cu[-1]
    src = contiguous_layout(offsets)
    if kind == "zigzag":
        dst = zigzag_layout(total, world)
    elif kind == "seq_zigzag":
        cu = [c * 2 * world for c in cu]  # make every length a multiple of 2W
        total = cu[-1]
        src = contiguous_layout(offsets * 2 * world)
        dst = seq_zigzag_layout(torch.tensor(cu), world)
    else:
        dst = contiguous_layout(torch.arange(world + 1) * total // world)
    for a, b in ((src, dst), (dst, src)):
        plans = [relayout_plan(a, b, r) for r in range(world)]
        data = [torch.tensor(tokens(x), dtype=torch.int64) for x in a]  # row label = global token
        for r, p in enumerate(plans):
            received = []
            for p_src, ps in enumerate(plans):
                start = sum(ps.send_splits[:r])
                received.append(data[p_src][ps.send_index][start:start + ps.send_splits[r]])
                assert p.recv_splits[p_src] == ps.send_splits[r]
            got = torch.cat(received)
            if p.recv_order is not None:
                got = got[p.recv_order]
            assert got.tolist() == tokens(b[r])
