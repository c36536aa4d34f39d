"""LSEAccumulator (sparse-row merging of many parts) against a direct softmax over all parts."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist.kernels import LSEAccumulator


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(0, 40), st.integers(1, 4), st.integers(0, 10_000))
def test_accumulator_equals_one_softmax(rows, parts, batches, seed):
    g = torch.Generator().manual_seed(seed)
    d = 3
    # Rows start with a first part, or with nothing (lse -inf, out 0): empty own blocks exist.
    lse0 = torch.randn(rows, generator=g, dtype=torch.float64) * 3
    lse0[torch.rand(rows, generator=g) < 0.3] = float("-inf")
    out0 = torch.randn(rows, d, generator=g, dtype=torch.float64)
    out0[torch.isinf(lse0)] = 0
    idx = torch.randint(0, rows, (parts,), generator=g)
    plse = torch.randn(parts, generator=g, dtype=torch.float64) * 3 + 20 * torch.rand(parts, generator=g,
                                                                                    dtype=torch.float64)
    pout = torch.randn(parts, d, generator=g, dtype=torch.float64)
    acc = LSEAccumulator(out0, lse0)
    cuts = sorted(torch.randint(0, parts + 1, (batches - 1,), generator=g).tolist())
    for a, b in zip([0, *cuts], [*cuts, parts]):
        acc.add(pout[a:b], plse[a:b], idx[a:b])
    got_out, got_lse = acc.result()
    for r in range(rows):
        lses = torch.cat([lse0[r:r + 1], plse[idx == r]])
        outs = torch.cat([out0[r:r + 1], pout[idx == r]])
        want_lse = torch.logsumexp(lses, 0)
        if torch.isinf(want_lse):
            assert torch.isinf(got_lse[r]) and bool((got_out[r] == 0).all())
            continue
        w = torch.exp(lses - want_lse)
        want = (w[:, None] * outs).sum(0)
        assert abs(float(got_lse[r] - want_lse)) <= 1e-12
        assert float((got_out[r] - want).abs().max()) <= 1e-12
