"""The workspace budget bounds every selected-part batch a plan makes (moba_dist.memory).

``sel_batches`` is checked against the budget's own accounting, recomputed here from the batch's
pieces: a batch holds ``pairs * pair_bytes + key_rows * key_bytes`` bytes of scratch, which may
exceed the budget only when one (query, head) row beside its segment's keys already does.
"""

import pytest
import torch
from helpers import make_cu
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist import memory, moba_attn_varlen
from moba_dist.core import pair_row_bytes, sel_batches
from moba_dist.reference import moba_attn_varlen_reference


def _check(seg_counts: list[int], seg_len: list[int], budget: int, pair_bytes: int, key_bytes: int):
    batches = sel_batches(torch.tensor(seg_counts), torch.tensor(seg_len), budget, pair_bytes, key_bytes)
    pair_starts = [0]
    for c in seg_counts:
        pair_starts.append(pair_starts[-1] + c)
    row_starts = [0]
    for n in seg_len:
        row_starts.append(row_starts[-1] + n)
    seg_of_pair = [s for s, c in enumerate(seg_counts) for _ in range(c)]

    covered = 0
    for b in batches:
        # Batches cover the pairs in order, without gaps or overlap.
        assert b.pairs.start == covered and b.pairs.stop > b.pairs.start
        covered = b.pairs.stop
        segs = sorted({seg_of_pair[p] for p in range(b.pairs.start, b.pairs.stop)})
        # The key rows are exactly those of the segments the pairs belong to.
        assert b.rows == slice(row_starts[segs[0]], row_starts[segs[-1] + 1])
        assert segs == list(range(segs[0], segs[-1] + 1))
        q_lens = [sum(1 for p in range(b.pairs.start, b.pairs.stop) if seg_of_pair[p] == s) for s in segs]
        assert b.cu_q.tolist() == [sum(q_lens[:i]) for i in range(len(segs) + 1)]
        assert b.cu_k.tolist() == [row_starts[s] - row_starts[segs[0]] for s in segs] + [
            row_starts[segs[-1] + 1] - row_starts[segs[0]]]
        assert b.max_q == max(q_lens)
        used = (b.pairs.stop - b.pairs.start) * pair_bytes + (b.rows.stop - b.rows.start) * key_bytes
        one_row_too_big = len(segs) == 1 and b.pairs.stop - b.pairs.start == 1
        assert used <= budget or one_row_too_big, (used, budget, segs, q_lens)
    assert covered == sum(seg_counts)
    return batches


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 64)), min_size=1, max_size=40),
       st.integers(1, 1 << 16), st.integers(1, 600), st.integers(1, 200))
def test_batches_never_exceed_the_budget(segs, budget, pair_bytes, key_bytes):
    _check([c for c, _ in segs], [n for _, n in segs], budget, pair_bytes, key_bytes)


def test_a_large_budget_makes_one_batch_and_a_small_one_splits_segments():
    counts, lens = [50, 7, 300], [16, 16, 9]
    assert len(_check(counts, lens, 1 << 30, 100, 10)) == 1
    small = _check(counts, lens, 16 * 10 + 20 * 100, 100, 10)
    assert max(b.pairs.stop - b.pairs.start for b in small) <= 20
    assert sum(1 for b in small if b.rows == slice(32, 41)) == 300 // 20  # segment 2 in 15 pieces


def test_pair_row_bytes_grow_with_head_dim_and_element_size():
    assert pair_row_bytes(128, 2) == (128 * (4 * 2 + 8) + 16, 6 * 128 * 2)
    assert pair_row_bytes(64, 4)[0] < pair_row_bytes(128, 4)[0] < pair_row_bytes(128, 8)[0]


def test_default_budget_is_the_calls_own_inputs_and_output():
    q = torch.empty(4096, 8, 64, dtype=torch.bfloat16)
    k = v = torch.empty(4096, 2, 64, dtype=torch.bfloat16)
    own = 2 * q.numel() * 2 + 2 * k.numel() * 2
    assert memory.workspace_bytes(q, k, v) == max(memory.MIN_WORKSPACE, own)
    with pytest.raises(ValueError, match="positive int"):
        memory.set_workspace_bytes(0)


@pytest.mark.parametrize("budget", [1 << 12, 1 << 15, None])
def test_results_do_not_depend_on_the_budget(budget, monkeypatch):
    """Any budget gives the reference result (float64); tiny budgets split every segment."""
    monkeypatch.setattr(memory, "_override", budget)
    g = torch.Generator().manual_seed(3)
    cu = make_cu([70, 45])
    q, k, v = (torch.randn(115, h, 16, dtype=torch.float64, generator=g, requires_grad=True)
               for h in (4, 2, 2))
    go = torch.randn(115, 4, 16, dtype=torch.float64, generator=g)
    out = moba_attn_varlen(q, k, v, cu, 70, 8, 3)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = moba_attn_varlen_reference(q, k, v, cu, 8, 3)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    assert (out - ref).abs().max() < 1e-12
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() < 1e-12


def test_plan_goes_through_saved_tensors_so_checkpointing_drops_it():
    """Every tensor the backward needs, the plan's index tensors included, is saved through
    autograd's saved-tensor mechanism (what activation checkpointing intercepts): nothing of a
    layer stays alive in Python attributes of the graph. Under non-reentrant checkpointing the
    gradients still equal the reference."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(5)
    cu = make_cu([40, 33])
    q, k, v = (torch.randn(73, h, 8, dtype=torch.float64, generator=g, requires_grad=True) for h in (4, 2, 2))
    go = torch.randn(73, 4, 8, dtype=torch.float64, generator=g)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = moba_attn_varlen(q, k, v, cu, 40, 4, 3)
    assert any(not t.is_floating_point() and t.numel() >= 73 for t in packed), \
        "the plan's index tensors are not saved through autograd"
    node = out.grad_fn
    big = [name for name in dir(node) if not name.startswith("_")
           and isinstance(getattr(node, name, None), torch.Tensor)]
    assert not big, big

    out = checkpoint(lambda *t: moba_attn_varlen(*t, cu, 40, 4, 3), q, k, v, use_reentrant=False)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref = moba_attn_varlen_reference(q, k, v, cu, 4, 3)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), go)):
        assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("budget", [1 << 14, 1 << 17, None])
def test_query_windows_bound_the_float32_accumulators(budget, monkeypatch):
    """The varlen path plans its pairs window by window: every batch's (query, head) pairs lie in
    that batch's query window, windows come in ascending order, and one window's accumulators
    take at most a quarter of the budget (or one block's rows when those alone need more)."""
    from moba_dist.core import window_bytes
    from moba_dist.parallel.moba_cp import moba_plan

    monkeypatch.setattr(memory, "_override", budget)
    g = torch.Generator().manual_seed(11)
    n, hq, hkv, d, chunk, topk = 300, 4, 2, 16, 16, 4
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 120, 300], dtype=torch.int64)
    meta, _, _ = moba_plan(q, k, v, cu, torch.tensor([0, n]), chunk, topk, d ** -0.5, None, None)
    window, spent = meta.window_rows, memory.workspace_bytes(q, k, v)
    assert window == chunk or window_bytes(window, hq, d, topk - 1, 4) <= spent // 4
    seen = [b.window for b in meta.sel_batches]
    assert seen == sorted(seen) and len(meta.sel_batches) > 0
    if budget == 1 << 14:
        assert len(set(seen)) > 1
    for b in meta.sel_batches:
        ids = meta.pair_ids.window_ids(meta.pair_sel, b.window)
        base = meta.pair_ids.base[b.window]
        tokens = ids[b.pairs.start - base:b.pairs.stop - base].long() // (hq * meta.pair_slots)
        assert ((tokens // window) == b.window).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=40), st.integers(1, 1 << 16))
def test_self_pieces_cover_the_parts_within_the_budget(part_len, budget):
    """The self part's backward pieces are consecutive runs of whole parts covering all tokens;
    each fits the budget unless it is a single part."""
    from moba_dist.core import self_backward_bytes, self_pieces

    lens = torch.tensor(part_len)
    pieces = self_pieces(lens, 4, 8, budget)
    if not pieces:
        assert self_backward_bytes(sum(part_len), 4, 8) <= budget or len(part_len) < 2
        return
    assert pieces[0][0] == 0 and pieces[-1][1] == len(part_len)
    assert all(a[1] == b[0] and a[3] == b[2] for a, b in zip(pieces, pieces[1:]))
    for a, b, ta, tb in pieces:
        assert tb - ta == sum(part_len[a:b]) and b > a


def test_forward_only_calls_plan_with_a_quarter_of_the_budget(monkeypatch):
    """Prefill (no gradient can be asked): a quarter of the budget sizes the scratch; results are
    still the reference's."""
    from moba_dist.parallel.moba_cp import moba_plan

    g = torch.Generator().manual_seed(5)
    n = 3000
    cu = torch.tensor([0, 1200, n], dtype=torch.int64)
    q, k, v = (torch.randn(n, h, 64, dtype=torch.float64, generator=g) for h in (8, 2, 2))
    offsets = torch.tensor([0, n])
    full = memory.workspace_bytes(q, k, v)
    with torch.no_grad():
        meta, _, _ = moba_plan(q, k, v, cu, offsets, 64, 4, 0.125, None, None)
        out = moba_attn_varlen(q, k, v, cu.to(torch.int32), 1800, 64, 4)
    assert meta.workspace == max(memory.MIN_WORKSPACE, full // 4) < full
    qg = q.clone().requires_grad_()
    meta_g, _, _ = moba_plan(qg, k, v, cu, offsets, 64, 4, 0.125, None, None)
    assert meta_g.workspace == full
    ref = moba_attn_varlen_reference(q, k, v, cu.to(torch.int32), 64, 4)
    assert (out - ref).abs().max() < 1e-12


def test_backward_keeps_the_selection_in_int16_not_the_pair_rows(monkeypatch):
    """The varlen path keeps the gate's selection in int16 for backward (half the bytes of the
    int32 pair rows, ``T x Hq x (topk - 1)`` at most) and rebuilds the pair rows from it; the
    gradients equal the float64 reference, also with the query windows and the causal-prefix
    pairs of a mid-sequence slice start."""
    g = torch.Generator().manual_seed(11)
    cu = make_cu([150, 97])
    n, hq, kk = 247, 4, 3
    q, k, v = (torch.randn(n, h, 8, dtype=torch.float64, generator=g, requires_grad=True) for h in (hq, 2, 2))
    go = torch.randn(n, hq, 8, dtype=torch.float64, generator=g)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    for budget in (1 << 12, None):  # many query windows, then one
        packed.clear()
        monkeypatch.setattr(memory, "_override", budget)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = moba_attn_varlen(q, k, v, cu, 150, 16, kk + 1)
        ints = [t for t in packed if not t.is_floating_point()]
        assert [t.shape for t in ints if t.dtype == torch.int16] == [torch.Size([n, hq, kk])]
        # (query, head) pairs: each token selects min(topk - 1, its complete past blocks).
        pairs = hq * sum(min(kk, p // 16) for length in (150, 97) for p in range(length))
        assert not [t for t in ints if t.numel() == pairs and t.dtype != torch.int16], \
            "pair rows saved for backward"
        grads = torch.autograd.grad(out, (q, k, v), go)
        ref = moba_attn_varlen_reference(q, k, v, cu, 16, kk + 1)
        for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), go)):
            assert (a - b).abs().max() < 1e-12


def test_strided_inputs_give_the_contiguous_result_and_are_not_flattened_per_batch(monkeypatch):
    """q, k, v as an HF layer hands them over (``[1, H, S, D]`` transposed: a strided view) give
    the result and gradients of contiguous copies (float64, to rounding), with many batches; the varlen path
    reads their rows in place instead of flattening (copying) the whole tensor per batch."""
    monkeypatch.setattr(memory, "_override", 1 << 13)  # many windows and batches
    g = torch.Generator().manual_seed(2)
    cu = make_cu([90, 70])
    views = [torch.randn(1, h, 160, 16, dtype=torch.float64, generator=g).transpose(1, 2)[0]
             for h in (4, 2, 2)]
    assert not views[0].is_contiguous()
    go = torch.randn(160, 4, 16, dtype=torch.float64, generator=g)
    leaves = [x.detach().requires_grad_() for x in views]
    flat_copies = []
    real_reshape = torch.Tensor.reshape

    def reshape(self, *shape):
        flat = shape in ((-1, self.shape[-1]), ((-1, self.shape[-1]),))
        if flat and self.data_ptr() in {x.data_ptr() for x in leaves} and not self.is_contiguous():
            flat_copies.append(shape)
        return real_reshape(self, *shape)

    monkeypatch.setattr(torch.Tensor, "reshape", reshape)
    out = moba_attn_varlen(*leaves, cu, 90, 8, 3)
    grads = torch.autograd.grad(out, leaves, go)
    monkeypatch.undo()
    assert not flat_copies, flat_copies
    dense = [x.detach().contiguous().requires_grad_() for x in views]
    want = moba_attn_varlen(*dense, cu, 90, 8, 3)
    assert (out - want).abs().max() < 1e-12
    for a, b in zip(grads, torch.autograd.grad(want, dense, go)):
        assert (a - b).abs().max() < 1e-12
