"""CPU memory: the pure-PyTorch kernels and a whole MoBA call stay within the workspace budget.

Two checks. The tile plan of ``kernels/torch_backend.py`` is recounted here from its tiles:
every query row that sees a key is in exactly one tile, each tile's keys are what its rows may
see, and each tile fits the budget by the backend's own accounting unless it is a single row.
Then the bytes PyTorch's CPU allocator actually hands out are measured (the profiler's memory
events, replayed in order): what a backend call or a MoBA forward+backward holds at its peak,
less its outputs, must stay within the budget, plus, for MoBA, its integer plan.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_cu
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from moba_dist import memory, moba_attn_varlen
from moba_dist.kernels.torch_backend import TorchBackend, plan_tiles, tile_bytes


def allocator_peak(fn):
    """``(result, peak, end)``: the most bytes the CPU allocator had handed out at once while
    ``fn()`` ran, and at its end, both counted from its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak, live


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 90)), min_size=1, max_size=6),
       st.booleans(), st.integers(1, 1 << 16), st.sampled_from([1, 8, 64]))
def test_tile_plan_covers_each_row_once_within_the_budget(segs, causal, budget, tile_q):
    lq, lk = [a for a, _ in segs], [b for _, b in segs]
    cu_q, cu_k = make_cu(lq), make_cu(lk)
    hq, hkv, d = 4, 2, 8

    def cost(rows, keys):
        return tile_bytes(rows, keys, hq, hkv, d, d, 4, 4, causal, True)

    def fits(keys):
        return max(1, max(r for r in range(1, 200) if r == 1 or cost(r, keys) <= budget))

    tiles = plan_tiles(cu_q, cu_k, causal, tile_q, fits)
    seen = {}
    for q0, rows, k0, keys, shift in tiles:
        assert rows >= 1 and keys >= 1
        assert rows == 1 or cost(rows, keys) <= budget, (rows, keys, budget)
        s = max(i for i in range(len(lq)) if cu_q[i] <= q0)
        assert cu_q[s] <= q0 and q0 + rows <= cu_q[s + 1] and k0 == cu_k[s]
        a = q0 - int(cu_q[s])  # first row's position in its segment
        if causal:
            assert shift == a + lk[s] - lq[s]
            assert keys == min(lk[s], a + rows + lk[s] - lq[s])  # up to the last row's diagonal
            assert rows <= tile_q
        else:
            assert keys == lk[s]
        for r in range(q0, q0 + rows):
            assert r not in seen
            seen[r] = s
    for s in range(len(lq)):
        for i in range(lq[s]):
            sees = lk[s] > 0 and (not causal or i + lk[s] - lq[s] >= 0)
            assert int(cu_q[s]) + i in seen or not sees  # a tile may also hold rows that see nothing


CALLS = [
    # q lengths, k lengths, hq, hkv, causal
    ([300, 40], [300, 40], 4, 2, True),
    ([257, 3], [500, 31], 4, 1, False),
    ([200], [350], 2, 2, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(len(CALLS)))
def test_torch_backend_holds_no_more_than_the_budget(case, dtype):
    """A forward and a backward of the torch backend whose whole score matrix would be several
    times the budget: what the allocator hands out beyond the call's outputs stays within it."""
    lq, lk, hq, hkv, causal = CALLS[case]
    g = torch.Generator().manual_seed(case)
    d = 16
    q = torch.randn(sum(lq), hq, d, dtype=dtype, generator=g)
    k = torch.randn(sum(lk), hkv, d, dtype=dtype, generator=g)
    v = torch.randn(sum(lk), hkv, d, dtype=dtype, generator=g)
    cu_q, cu_k = make_cu(lq), make_cu(lk)
    budget = 1 << 17
    scores = max(lq) * max(lk) * hq * q.element_size()
    assert scores > 4 * budget  # untiled, a single segment's scores would not fit
    be = TorchBackend()
    with memory.workspace_limit(budget):
        (out, lse), peak, _ = allocator_peak(
            lambda: be.forward(q, k, v, cu_q, cu_k, max(lq), max(lk), 0.3, causal))
        assert peak - _nbytes(out, lse) <= budget, (peak, _nbytes(out, lse), budget)
        go = torch.randn(out.shape, dtype=dtype, generator=g)
        grads, peak, _ = allocator_peak(
            lambda: be.backward(go, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), 0.3, causal))
        assert peak - _nbytes(*grads) <= budget, (peak, _nbytes(*grads), budget)


@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_moba_forward_backward_peak_is_outputs_plus_budget(budget, monkeypatch):
    """One MoBA forward+backward on the CPU (the varlen path, torch kernels): the allocator's
    peak beyond the inputs is at most the outputs and gradients, the workspace budget, and the
    integer plan (a few int64 per selected (query, head, block))."""
    monkeypatch.setattr(memory, "_override", budget)
    t, hq, hkv, d, chunk, topk = 2048, 8, 2, 32, 128, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=g, requires_grad=True) for h in (hq, hkv, hkv))
    go = torch.randn(t, hq, d, generator=g)
    cu = make_cu([t])

    def step():
        out = moba_attn_varlen(q, k, v, cu, t, chunk, topk)
        return out, torch.autograd.grad(out, (q, k, v), go)

    (out, grads), peak, end = allocator_peak(step)
    kept = _nbytes(out, *grads)
    assert end <= kept + (1 << 16)  # nothing but the output and the gradients outlives the call
    own = memory.workspace_bytes(q, k, v)
    plan = 6 * 8 * t * hq * topk
    assert peak <= kept + own + plan, (peak, kept, own, plan)
