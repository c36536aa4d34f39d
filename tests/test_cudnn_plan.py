"""The cuDNN backend's host-side planning, on CPU: shape buckets, cache keys, and the ragged
metadata (lengths and offsets) it hands cuDNN, checked by running an emulation of cuDNN's
documented ragged-SDPA semantics over that metadata against a dense float64 reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist.kernels.cudnn_backend import (
    CudnnBackend,
    ShapeClass,
    Variant,
    bucket,
    candidate_variants,
    gather_padded_stats,
    graph_key,
    parse_variant,
    ragged_metadata,
    row_positions,
    scatter_padded_stats,
    shape_class,
)
from moba_dist.reference import masked_attention


def cu_of(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()],
                        dtype=torch.int32, device=device)


def reference(q, k, v, lq, lk, scale, causal):
    """Per-segment dense attention and LSE ``[Hq, Tq]`` (bottom-right causal)."""
    outs, lses = [], []
    qa = ka = 0
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(lq, lk):
        mask = torch.ones(a, b, dtype=torch.bool)
        if causal:
            mask = torch.arange(b)[None, :] <= torch.arange(a)[:, None] + (b - a)
        qs, ks, vs = q[qa:qa + a], k[ka:ka + b], v[ka:ka + b]
        outs.append(masked_attention(qs, ks, vs, mask[None], scale))
        sc = torch.einsum("ihd,jhd->hij", qs, ks.repeat_interleave(rep, 1)) * scale
        lses.append(torch.logsumexp(sc.masked_fill(~mask[None], float("-inf")), -1))
        qa, ka = qa + a, ka + b
    return torch.cat(outs), torch.cat(lses, dim=1)


def emulate_cudnn(q, k, v, meta, scale, causal):
    """What cuDNN's ragged SDPA computes from ``meta``: batch ``b`` has ``seq_q[b]`` query rows at
    element offset ``off_q[b]`` and ``seq_k[b]`` key rows at ``off_kv[b]``, the causal diagonal is
    aligned bottom-right *within the batch*, stats go to ``off_stats[b]``; only those rows are
    written, into outputs pre-filled with 0 / -inf. Also checks what the backend relies on: causal
    batches never have more queries than keys, batches without keys get no queries, and no row is
    written twice."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    out = torch.zeros_like(q)
    stats = torch.full((tq * hq,), float("-inf"), dtype=q.dtype)
    written = torch.zeros(tq, dtype=torch.bool)
    rep = hq // hkv
    for b in range(meta.seq_q.shape[0]):
        lq, lk = int(meta.seq_q[b]), int(meta.seq_k[b])
        oq, ok, os_ = int(meta.off_q[b]), int(meta.off_kv[b]), int(meta.off_stats[b])
        assert oq % (hq * d) == 0 and ok % (hkv * d) == 0 and os_ == oq // d
        q0, k0 = oq // (hq * d), ok // (hkv * d)
        assert 0 <= q0 <= tq and 0 <= k0 <= k.shape[0] and q0 + lq <= tq and k0 + lk <= k.shape[0]
        if lq == 0:
            continue
        assert lk > 0 and (not causal or lq <= lk)
        assert not written[q0:q0 + lq].any()
        written[q0:q0 + lq] = True
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        qs = q[q0:q0 + lq]
        sc = torch.einsum("ihd,jhd->hij", qs, k[k0:k0 + lk].repeat_interleave(rep, 1)) * scale
        sc = sc.masked_fill(~mask[None], float("-inf"))
        lse = torch.logsumexp(sc, -1)  # [H, lq]
        p = torch.exp(sc - lse[..., None])
        out[q0:q0 + lq] = torch.einsum("hij,jhd->ihd", p, v[k0:k0 + lk].repeat_interleave(rep, 1))
        stats[os_:os_ + lq * hq] = lse.t().reshape(-1)
    return out, stats.view(tq, hq).t(), written


CASES = [
    # q lengths, k lengths, hq, hkv, causal
    ([5, 0, 17, 3], [5, 4, 17, 9], 4, 2, True),
    ([8, 300 % 37, 6], [3, 10, 0], 2, 1, True),  # more queries than keys; a segment with no keys
    ([5, 0, 17, 3], [9, 4, 0, 9], 2, 2, False),  # non-causal with an empty key segment
    ([70, 1], [130, 1], 4, 1, True),
    ([0, 0], [0, 3], 2, 2, True),  # nothing to compute at all
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_metadata_emulation_matches_reference(case):
    lq, lk, hq, hkv, causal = CASES[case]
    g = torch.Generator().manual_seed(case)
    d, scale = 8, 0.41
    q = torch.randn(sum(lq), hq, d, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), hkv, d, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), hkv, d, dtype=torch.float64, generator=g, requires_grad=True)
    cls = shape_class(len(lq), max(lq), max(lk))
    meta = ragged_metadata(cu_of(lq), cu_of(lk), cls.batch, hq, hkv, d, causal)
    assert all(t.dtype == torch.int64 for t in (meta.off_q, meta.off_kv, meta.off_stats))
    assert meta.seq_q.dtype == meta.seq_k.dtype == torch.int32
    assert meta.seq_q.shape == (cls.batch, 1, 1, 1) and meta.off_q.shape == (cls.batch + 1, 1, 1, 1)
    assert int(meta.seq_q.max()) <= cls.seqlen_q and int(meta.seq_k.max()) <= cls.seqlen_k
    out, lse, written = emulate_cudnn(q, k, v, meta, scale, causal)
    ref, ref_lse = reference(q, k, v, lq, lk, scale, causal)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    # Rows handed to cuDNN are exactly the rows that see a key.
    assert torch.equal(written, ~torch.isneginf(ref_lse[0]))
    if out.numel():
        go = torch.randn(out.shape, dtype=out.dtype, generator=g)
        got = torch.autograd.grad(out, (q, k, v), go, allow_unused=True)
        want = torch.autograd.grad(ref, (q, k, v), go, allow_unused=True)
        for a, b, x in zip(got, want, (q, k, v)):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=6),
       st.booleans(), st.integers(0, 3))
def test_metadata_emulation_random(lengths, causal, extra_batch):
    lq, lk = [a for a, _ in lengths], [b for _, b in lengths]
    g = torch.Generator().manual_seed(sum(lq) * 31 + sum(lk))
    hq, hkv, d, scale = 4, 2, 4, 0.7
    q = torch.randn(sum(lq), hq, d, dtype=torch.float64, generator=g)
    k = torch.randn(sum(lk), hkv, d, dtype=torch.float64, generator=g)
    v = torch.randn(sum(lk), hkv, d, dtype=torch.float64, generator=g)
    meta = ragged_metadata(cu_of(lq), cu_of(lk), len(lq) + extra_batch, hq, hkv, d, causal)
    out, lse, written = emulate_cudnn(q, k, v, meta, scale, causal)
    ref, ref_lse = reference(q, k, v, lq, lk, scale, causal)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    # The row positions (used by the padded-stats layout) agree with the rows cuDNN is given.
    seg, pos = row_positions(cu_of(lq), meta.q_start, sum(lq))
    assert torch.equal(pos >= 0, written)
    cq = cu_of(lq).long()
    rows = torch.arange(sum(lq))
    assert bool(((cq[seg] <= rows) & (rows < cq[seg + 1])).all())
    assert bool((pos < meta.seq_q.view(-1)[seg].long()).all())


def test_metadata_rejects_small_batch():
    with pytest.raises(ValueError, match="batch"):
        ragged_metadata(cu_of([1, 2, 3]), cu_of([1, 2, 3]), 2, 1, 1, 8, True)


def test_padded_stats_round_trip():
    lq, lk = [6, 0, 9, 2], [2, 5, 9, 0]
    cls = shape_class(len(lq), max(lq), max(lk))
    meta = ragged_metadata(cu_of(lq), cu_of(lk), cls.batch, 3, 3, 8, True)
    seg, pos = row_positions(cu_of(lq), meta.q_start, sum(lq))
    lse = torch.randn(sum(lq), 3, dtype=torch.float64)
    padded = scatter_padded_stats(lse, seg, pos, cls.batch, cls.seqlen_q)
    assert padded.shape == (cls.batch, 3, cls.seqlen_q, 1)
    back = gather_padded_stats(padded, seg, pos)
    live = pos >= 0
    assert torch.equal(back[live], lse[live])
    assert bool(torch.isneginf(back[~live]).all())
    # Every live row lands where cuDNN reads batch `seg`, row `pos`.
    for r in range(sum(lq)):
        if live[r]:
            assert torch.equal(padded[seg[r], :, pos[r], 0], lse[r])
    assert int((padded != 0).sum()) == int(live.sum()) * 3


def test_bucket_grid():
    for n in range(1, 5000, 7):
        p = bucket(n)
        assert p >= n and p & (p - 1) == 0 and p < 2 * n
        s = bucket(n, 4, 64)
        assert s >= n and s % 64 == 0 and (s - n < 64 or s < n * 1.25)
        t = bucket(n, 8, 64)
        assert t >= n and t % 64 == 0 and (t - n < 64 or t < n * 1.125)
    values = [bucket(n, 8, 64) for n in range(1, 100_000, 97)]
    assert values == sorted(values)
    assert bucket(1 << 20, 8, 64) == 1 << 20 and bucket((1 << 20) + 1, 8, 64) == (1 << 20) + (1 << 17)


def test_shape_class_and_key_are_stable_within_a_bucket():
    a = shape_class(3, 1000, 4100, 2500, 9000)
    b = shape_class(4, 1020, 4200, 2520, 9100)
    assert a == b == ShapeClass(4, 1024, 5120, 2560, 9216)
    assert shape_class(5, 1000, 4100) != a
    args = (torch.bfloat16, True, 0.125, 0)
    assert graph_key("fwd", a, 16, 4, 128, *args) == graph_key("fwd", b, 16, 4, 128, *args)
    assert graph_key("fwd", a, 16, 4, 128, *args) != graph_key("bwd", a, 16, 4, 128, *args)
    assert graph_key("fwd", a, 16, 4, 128, *args) != graph_key("fwd", a, 16, 4, 128, torch.bfloat16,
                                                               True, 0.1, 0)
    assert math.isclose(shape_class(1, 1, 1).seqlen_q, 64)


def test_variants():
    assert parse_variant("stats=padded,mask=legacy,share=0") == Variant("legacy", "padded", False)
    assert parse_variant("") == Variant()
    with pytest.raises(ValueError):
        parse_variant("color=red")
    with pytest.raises(ValueError):
        parse_variant("stats=sideways")
    causal = candidate_variants(True)
    assert len(causal) == len(set(causal)) == 8 and causal[0] == Variant("diagonal", "ragged", True)
    plain = candidate_variants(False)
    assert all(v.mask == "none" for v in plain) and len(plain) == 4
    pref = candidate_variants(True, Variant("legacy", "padded", False))
    assert pref[0] == Variant("legacy", "padded", False) and len(set(pref)) == 8
    assert candidate_variants(False, pinned=Variant("legacy", "padded", True)) == [
        Variant("none", "padded", True)]
    assert candidate_variants(True, pinned=Variant("none", "ragged", True)) == [
        Variant("diagonal", "ragged", True)]


def test_backend_on_cpu_declines_and_handles_empty_calls():
    be = CudnnBackend()
    assert be.name == "cudnn"
    assert not be.supports(torch.device("cpu"), torch.bfloat16, 128)
    assert not be.supports(torch.device("cuda"), torch.float32, 128)
    assert not be.supports(torch.device("cuda"), torch.bfloat16, 136)
    assert not be.supports(torch.device("cuda"), torch.bfloat16, 72)
    if not torch.cuda.is_available():
        assert not be.supports(torch.device("cuda"), torch.bfloat16, 128)
    # Calls with nothing to compute never reach cuDNN: zeros, -inf, zero gradients.
    q = torch.randn(5, 4, 16, dtype=torch.bfloat16)
    k = torch.randn(0, 2, 16, dtype=torch.bfloat16)
    cu_q = cu_of([5])
    cu_k = cu_of([0])
    out, lse = be.forward(q, k, k, cu_q, cu_k, 5, 0, 0.25, True)
    assert out.shape == (5, 4, 16) and bool((out == 0).all())
    assert lse.shape == (4, 5) and lse.dtype == torch.float32 and bool(torch.isneginf(lse).all())
    dq, dk, dv = be.backward(torch.randn_like(out), q, k, k, out, lse, cu_q, cu_k, 5, 0, 0.25, True)
    assert bool((dq == 0).all()) and dk.shape == k.shape and dv.shape == k.shape
    out, lse = be.forward(q[:0], q, q, cu_of([0]), cu_of([5]), 0, 5, 0.25, False)
    assert out.shape == (0, 4, 16) and lse.shape == (4, 0)
