"""Efficient single-device MoBA against the dense mask-based reference (outputs and grads)."""

import random

import pytest
import torch
from helpers import assert_close, gate_margin, make_cu

from moba_dist import moba_attn_varlen
from moba_dist.reference import moba_attn_varlen_reference

N_CASES = 220


def draw_case(i: int):
    """A random configuration: seeded, so every case is reproducible by its index."""
    rng = random.Random(1000 + i)
    dtype = torch.float64 if i % 4 else torch.float32
    b = rng.randint(1, 4)
    lengths = [rng.choice([0, rng.randint(1, 8), rng.randint(9, 70)]) for _ in range(b)]
    if sum(lengths) == 0:
        lengths[0] = rng.randint(1, 40)
    chunk = rng.choice([1, 2, 3, 4, 5, 7, 8, 16, 50])
    longest = max(lengths)
    nblocks = -(-longest // chunk)
    topk = rng.randint(1, nblocks + 2)
    hkv = rng.choice([1, 2])
    hq = hkv * rng.choice([1, 2, 4])
    d = rng.choice([4, 8, 16])
    scale = rng.choice([None, 0.05, 1.3])
    return dict(lengths=lengths, chunk=chunk, topk=topk, hq=hq, hkv=hkv, d=d, scale=scale, dtype=dtype)


def make_inputs(c, seed):
    cu = make_cu(c["lengths"])
    total = int(cu[-1])
    for attempt in range(50):
        g = torch.Generator().manual_seed(seed * 100 + attempt)
        q = torch.randn(total, c["hq"], c["d"], generator=g, dtype=torch.float64)
        k = torch.randn(total, c["hkv"], c["d"], generator=g, dtype=torch.float64)
        v = torch.randn(total, c["hkv"], c["d"], generator=g, dtype=torch.float64)
        q, k, v = (t.to(c["dtype"]) for t in (q, k, v))
        # float32 gating is exact only up to rounding: draw inputs whose choices are unambiguous.
        if c["dtype"] == torch.float64 or gate_margin(q, k, cu, c["chunk"], c["topk"]) > 1e-3:
            return cu, q, k, v
    raise RuntimeError("could not draw well-separated gate scores")


@pytest.mark.parametrize("i", range(N_CASES))
def test_moba_matches_reference(i):
    c = draw_case(i)
    cu, q, k, v = make_inputs(c, i)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    longest = max(c["lengths"])
    out = moba_attn_varlen(q, k, v, cu, longest, c["chunk"], c["topk"], softmax_scale=c["scale"])
    ref = moba_attn_varlen_reference(q, k, v, cu, c["chunk"], c["topk"], softmax_scale=c["scale"])
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref, c["dtype"], f"out {c}")
    go = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(i))
    got = torch.autograd.grad(out, (q, k, v), go)
    want = torch.autograd.grad(ref, (q, k, v), go)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, c["dtype"], f"d{name} {c}")


def test_case_grid_covers_the_space():
    cases = [draw_case(i) for i in range(N_CASES)]
    assert sum(c["dtype"] == torch.float32 for c in cases) >= 50
    assert any(c["topk"] == 1 for c in cases)
    assert any(c["topk"] > -(-max(c["lengths"]) // c["chunk"]) for c in cases)
    assert any(0 in c["lengths"] for c in cases)
    assert {c["hq"] // c["hkv"] for c in cases} == {1, 2, 4}
    assert any(any(n % c["chunk"] for n in c["lengths"]) for c in cases)
    assert any(all(n % c["chunk"] == 0 for n in c["lengths"]) for c in cases)
