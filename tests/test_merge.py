"""merge_slots (a window of rows, each with its own block's result and fixed slots of partial
results) against a direct softmax over all of a row's parts."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist.kernels import merge_slots


def _case(n, hq, d, slots, t0, w, seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, hq, d, generator=g, dtype=torch.float64)
    lse = torch.randn(hq, n, generator=g, dtype=torch.float64) * 3
    rows = w * hq
    m = rows * slots
    plse = torch.randn(m, generator=g, dtype=torch.float64) * 3
    plse += 20 * torch.rand(m, generator=g, dtype=torch.float64)
    plse[torch.rand(rows * slots, generator=g) < 0.3] = float("-inf")  # empty slots
    pout = torch.randn(rows * slots, d, generator=g, dtype=torch.float64)
    pout[torch.isinf(plse)] = float("nan")  # an empty slot's output must not be read
    lse_t = torch.float32 if dtype != torch.float64 else torch.float64
    return (out.to(device, dtype), lse.to(device, lse_t), pout.to(device, dtype), plse.to(device, lse_t))


def _want(out, lse, pout, plse, slots, t0, w):
    out, lse, pout, plse = (x.double().cpu() for x in (out, lse, pout, plse))
    n, hq, d = out.shape
    want_o, want_l = out.clone(), lse.clone()
    for t in range(t0, t0 + w):
        for h in range(hq):
            r = ((t - t0) * hq + h) * slots
            keep = ~torch.isinf(plse[r:r + slots])
            lses = torch.cat([lse[h, t:t + 1], plse[r:r + slots][keep]])
            outs = torch.cat([out[t, h][None], pout[r:r + slots][keep]])
            want_l[h, t] = torch.logsumexp(lses, 0)
            want_o[t, h] = (torch.exp(lses - want_l[h, t])[:, None] * outs).sum(0)
    return want_o, want_l


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_merge_slots_equals_one_softmax(n, hq, slots, seed):
    t0 = seed % n
    w = max(1, (n - t0) // 2)
    out, lse, pout, plse = _case(n, hq, 3, slots, t0, w, seed)
    want_o, want_l = _want(out, lse, pout, plse, slots, t0, w)
    merge_slots(pout, plse, slots, out, lse, t0)
    assert float((out - want_o).abs().max()) <= 1e-12  # rows outside the window unchanged too
    assert float((lse - want_l).abs().max()) <= 1e-12


def test_merge_slots_nan_in_a_part_gives_nan_in_its_row_only():
    out, lse, pout, plse = _case(4, 2, 3, 2, 1, 2, 7)
    plse[:2] = torch.tensor([0.5, float("-inf")], dtype=plse.dtype)  # row (t=1, h=0), slot 0 live
    pout[0] = float("nan")
    merge_slots(pout, plse, 2, out, lse, 1)
    assert torch.isnan(out[1, 0]).all()
    assert not torch.isnan(out[1, 1]).any() and not torch.isnan(out[2]).any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_slots_triton_matches_the_reference(dtype):
    n, hq, d, slots, t0, w = 300, 16, 128, 11, 37, 200
    out, lse, pout, plse = _case(n, hq, d, slots, t0, w, 3, dtype, "cuda")
    want_o, want_l = _want(out, lse, pout, plse, slots, t0, w)
    merge_slots(pout, plse, slots, out, lse, t0)
    # bf16: the merged row is rounded once to bf16 (within one ulp, 2**-7 relative).
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    err = (out.double().cpu() - want_o).abs() / want_o.abs().clamp_min(1.0)
    assert float(err.max()) <= tol
    assert float((lse.double().cpu() - want_l).abs().max()) <= 1e-5
