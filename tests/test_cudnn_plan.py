"""The cuDNN backend's host-side planning, on CPU: shape buckets, cache keys, and the ragged
metadata (lengths and offsets) it hands cuDNN, checked by running an emulation of cuDNN's
documented ragged-SDPA semantics over that metadata against a dense float64 reference."""

import math

import pytest
import torch
from helpers import segment_attention_reference as reference
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
    a = shape_class(3, 1000, 4100, 2500, 9000, 256, 256, 128)
    b = shape_class(4, 1020, 4200, 2520, 9100, 256, 256, 128)
    assert a == b == ShapeClass(4, 1024, 5120, 2560, 9216)
    assert shape_class(5, 1000, 4100) != a
    args = (torch.bfloat16, True, 0.125, 0)
    assert graph_key("fwd", a, 16, 4, 128, *args) == graph_key("fwd", b, 16, 4, 128, *args)
    assert graph_key("fwd", a, 16, 4, 128, *args) != graph_key("bwd", a, 16, 4, 128, *args)
    assert graph_key("fwd", a, 16, 4, 128, *args) != graph_key("fwd", a, 16, 4, 128, torch.bfloat16,
                                                               True, 0.1, 0)
    assert math.isclose(shape_class(1, 1, 1).seqlen_q, 64)


@pytest.mark.parametrize("heads,head_dim", [(1, 64), (1, 128), (4, 128), (16, 128), (32, 256)])
def test_shape_class_totals_bound_the_accumulator_overshoot(heads, head_dim):
    # A total's class may size a float32 [rows, heads, head_dim] accumulator above the total by
    # at most 1/8 of it or 32 MiB, whichever is more; every total up to 32 MiB shares one class.
    row = 4 * heads * head_dim
    totals = range(1, (32 << 20) // row + 1, 97)
    small = {shape_class(1, 64, 64, t, t, heads, heads, head_dim) for t in totals}
    assert len(small) == 1
    for t in list(range(1, 1 << 22, 4099)) + [1 << 20, (1 << 20) + 1, 3 << 21, 10**7]:
        cls = shape_class(1, 64, 64, t, t, heads, heads, head_dim)
        assert cls.total_q == cls.total_k >= t
        assert (cls.total_q - t) * row <= max(32 << 20, t * row / 8)


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


# --------------------------------------------------------------------------------------------
# The backend end to end on CPU, against a stand-in for the ``cudnn`` module that implements
# cuDNN's documented ragged SDPA semantics (padded batch [B, H, S, D] addressed through per-batch
# element offsets, per-batch lengths, bottom-right diagonal within each batch's lengths, stats =
# natural-log LSE of the scaled scores, the backward reading the given O and stats).
# --------------------------------------------------------------------------------------------


class _Names:
    def __init__(self, *names):
        for n in names:
            setattr(self, n, n)


class FakeTensor:
    def __init__(self, name, dim=None, stride=None, data_type=None, uid=None):
        self.name, self.dim, self.stride, self.data_type, self.uid = name, dim, stride, data_type, uid
        self.ragged, self.is_output = None, False

    def set_uid(self, uid):
        self.uid = uid
        return self

    def set_output(self, value):
        self.is_output = value
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dt):
        self.data_type = dt
        return self

    def set_ragged_offset(self, t):
        self.ragged = t
        return self


class FakeGraph:
    def __init__(self, fake, io_data_type=None, intermediate_data_type=None, compute_data_type=None,
                 handle=None):
        self.fake, self.node, self.tensors = fake, None, []

    def tensor(self, name, dim, stride, data_type, uid):
        t = FakeTensor(name, list(dim), list(stride), data_type, uid)
        self.tensors.append(t)
        return t

    def _node(self, kind, kw, outputs):
        for k in kw:
            if k in self.fake.reject_kwargs:
                raise TypeError(f"unexpected keyword {k}")
        assert kw["use_padding_mask"] and kw["seq_len_q"] is not None and kw["seq_len_kv"] is not None
        self.node = (kind, kw)
        outs = [FakeTensor(f"{kind}::{o}") for o in outputs]
        self.tensors += outs
        return outs

    def sdpa(self, name, q, k, v, attn_scale, generate_stats, **kw):
        assert generate_stats
        kw.update(q=q, k=k, v=v, attn_scale=attn_scale)
        return self._node("fwd", kw, ("O", "Stats"))

    def sdpa_backward(self, name, q, k, v, o, dO, stats, attn_scale, **kw):
        kw.update(q=q, k=k, v=v, o=o, dO=dO, stats=stats, attn_scale=attn_scale)
        if "bwd_ragged_stats" in self.fake.reject and stats.ragged is not None:
            raise RuntimeError("Packed/ragged LSE is not supported")
        return self._node("bwd", kw, ("dQ", "dK", "dV"))

    def validate(self):
        for t in self.tensors:
            assert t.uid is not None and t.dim and t.stride, t.name
        uids = [t.uid for t in self.tensors]
        assert len(uids) == len(set(uids)), "duplicate uid"
        if "shared_offsets" in self.fake.reject:
            users = [t.ragged.uid for t in self.tensors if t.ragged is not None]
            if len(users) != len(set(users)):
                raise RuntimeError("a ragged offset tensor is shared")

    def build_operation_graph(self):
        pass

    def deselect_engines(self, names):
        self.fake.deselected.update(names)

    def create_execution_plans(self, modes):
        pass

    def check_support(self):
        pass

    def build_plans(self):
        self.fake.builds += 1

    def get_workspace_size(self):
        return 64

    # -- emulation ----------------------------------------------------------------------------

    def _rows(self, pack, t, b, n):
        """View ``[H, n, D]`` of batch ``b``'s first ``n`` rows of tensor ``t`` in its buffer."""
        buf = pack[t.uid]
        assert buf.stride(-1) == 1
        base = int(pack[t.ragged.uid].reshape(-1)[b]) if t.ragged is not None else b * t.stride[0]
        h, d = t.dim[1], t.dim[3]
        if n:
            last = base + (h - 1) * t.stride[1] + (n - 1) * t.stride[2] + (d - 1) * t.stride[3]
            assert 0 <= base and last < buf.numel(), f"{t.name}: batch {b} out of bounds"
        return torch.as_strided(buf, (h, n, d), tuple(t.stride[1:]), buf.storage_offset() + base)

    def execute(self, pack, workspace, handle=None):
        assert workspace.numel() >= 64 and handle is not None
        kind, kw = self.node
        q, k = kw["q"], kw["k"]
        causal = kw.get("diagonal_band_right_bound") == 0 or kw.get("use_causal_mask_bottom_right")
        if kw.get("diagonal_band_right_bound") == 0:
            assert kw["diagonal_alignment"] == "BOTTOM_RIGHT"
        scale = kw["attn_scale"]
        seq_q = pack[kw["seq_len_q"].uid].reshape(-1)
        seq_k = pack[kw["seq_len_kv"].uid].reshape(-1)
        hq, hkv = q.dim[1], k.dim[1]
        outs = {t.name.split("::")[1]: t for t in self.tensors if "::" in t.name}
        for b in range(q.dim[0]):
            lq, lk = int(seq_q[b]), int(seq_k[b])
            assert lq <= q.dim[2] and lk <= k.dim[2]
            if lq == 0:
                continue  # nothing written for this batch
            Q = self._rows(pack, q, b, lq).double()
            K = self._rows(pack, k, b, lk).double().repeat_interleave(hq // hkv, 0)
            V = self._rows(pack, kw["v"], b, lk).double().repeat_interleave(hq // hkv, 0)
            S = Q @ K.transpose(1, 2) * scale
            if causal:
                allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
                S = S.masked_fill(~allowed, float("-inf"))
            # Unspecified in cuDNN: rows without keys, or causal batches with more queries than
            # keys; the stand-in writes NaN there so that relying on it shows up.
            undefined = lk == 0 or (causal and lq > lk)
            if kind == "fwd":
                lse = torch.logsumexp(S, -1)
                Ov = torch.softmax(S, -1) @ V
                if undefined:
                    Ov, lse = torch.full_like(Ov, float("nan")), torch.full_like(lse, float("nan"))
                self._rows(pack, outs["O"], b, lq).copy_(Ov)
                stats = outs["Stats"]
                self._rows(pack, stats, b, lq)[..., 0].copy_(lse)
                continue
            lse = self._rows(pack, kw["stats"], b, lq)[..., 0].double()
            Ov = self._rows(pack, kw["o"], b, lq).double()
            dO = self._rows(pack, kw["dO"], b, lq).double()
            P = torch.exp(S - lse[..., None])
            dP = dO @ V.transpose(1, 2)
            dS = P * (dP - (dO * Ov).sum(-1, keepdim=True))
            dQ = dS @ K * scale
            dK = (dS.transpose(1, 2) @ Q * scale).view(hkv, hq // hkv, lk, -1).sum(1)
            dV = (P.transpose(1, 2) @ dO).view(hkv, hq // hkv, lk, -1).sum(1)
            if undefined:
                dQ, dK, dV = (torch.full_like(x, float("nan")) for x in (dQ, dK, dV))
            self._rows(pack, outs["dQ"], b, lq).copy_(dQ)
            self._rows(pack, outs["dK"], b, lk).copy_(dK)
            self._rows(pack, outs["dV"], b, lk).copy_(dV)


class FakeCudnn:
    """What the backend uses of ``cudnn``; ``reject`` / ``reject_kwargs`` make some spellings fail
    to build, the way an older or different cuDNN declines them."""

    def __init__(self, reject=(), reject_kwargs=()):
        self.reject, self.reject_kwargs, self.builds = set(reject), set(reject_kwargs), 0
        self.deselected = set()
        self.data_type = _Names("HALF", "BFLOAT16", "FLOAT", "INT32", "INT64")
        self.diagonal_alignment = _Names("TOP_LEFT", "BOTTOM_RIGHT")
        self.heur_mode = _Names("A", "B", "FALLBACK")

    def backend_version(self):
        return 91900

    def create_handle(self):
        return object()

    def set_stream(self, handle, stream):
        pass

    def pygraph(self, **kw):
        return FakeGraph(self, **kw)


def fake_backend(monkeypatch, fake, **kw):
    import sys

    monkeypatch.setitem(sys.modules, "cudnn", fake)
    be = CudnnBackend(fallback=False, **kw)
    assert be.module() is fake
    return be


def check_against_reference(be, lq, lk, hq, hkv, causal, seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(sum(lk), hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(sum(lk), hkv, d, generator=g).to(torch.bfloat16)
    go = torch.randn(sum(lq), hq, d, generator=g).to(torch.bfloat16)
    scale = 0.3
    cu_q, cu_k = cu_of(lq), cu_of(lk)
    out, lse = be.forward(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and lse.shape == (hq, sum(lq))
    assert lse.is_contiguous()
    grads = be.backward(go, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), scale, causal)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference(*xs, lq, lk, scale, causal)
    ref_grads = torch.autograd.grad(ref, xs, go.double(), allow_unused=True)
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead)
    assert bool((out[dead[0]] == 0).all()) and bool((grads[0][dead[0]] == 0).all())
    torch.testing.assert_close(lse[~dead].double(), ref_lse[~dead], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    for a, b, x in zip(grads, ref_grads, xs):
        assert a.dtype == torch.bfloat16 and a.shape == x.shape
        torch.testing.assert_close(a.double(), torch.zeros_like(x) if b is None else b, atol=3e-2, rtol=3e-2)


FAKE_CASES = [
    ([5, 0, 17, 3], [5, 4, 17, 9], 4, 2, True),
    ([8, 4, 6], [3, 10, 0], 2, 1, True),
    ([5, 0, 17, 3], [9, 4, 0, 9], 2, 2, False),
    ([70, 1], [130, 1], 4, 1, True),
]


@pytest.mark.parametrize("variant", candidate_variants(True) + candidate_variants(False)[:2],
                         ids=str)
def test_backend_end_to_end_on_fake_cudnn(monkeypatch, variant):
    fake = FakeCudnn()
    be = fake_backend(monkeypatch, fake, variant=variant)
    for i, (lq, lk, hq, hkv, causal) in enumerate(FAKE_CASES):
        check_against_reference(be, lq, lk, hq, hkv, causal, seed=i)
    assert be.cache_info()["failed_builds"] == 0


def test_backend_falls_through_declined_variants(monkeypatch):
    fake = FakeCudnn(reject={"bwd_ragged_stats", "shared_offsets"}, reject_kwargs={"diagonal_alignment"})
    be = fake_backend(monkeypatch, fake)
    check_against_reference(be, [8, 30, 6], [3, 40, 6], 4, 2, True)
    info = be.cache_info()
    assert info["variants"]["fwd"] == "mask=legacy,stats=ragged,share=0"
    assert info["variants"]["bwd"] == "mask=legacy,stats=padded,share=0"
    assert info["builds"] == 2 and info["failed_builds"] > 0 and info["misses"] == 2
    # Same shape class, other lengths: cached graphs serve it, nothing is built or tried again.
    builds = fake.builds
    check_against_reference(be, [7, 31, 5], [2, 41, 6], 4, 2, True, seed=5)
    assert fake.builds == builds and be.cache_info()["hits"] == 2
    # A non-causal graph of a new key starts from the variant that worked (no mask to adapt).
    check_against_reference(be, [8, 30], [3, 40], 4, 2, False, seed=6)
    assert be.cache_info()["variants"]["fwd"] == "mask=none,stats=ragged,share=0"


def test_backend_only_deselects_python_engines(monkeypatch):
    fake = FakeCudnn()
    be = fake_backend(monkeypatch, fake)
    check_against_reference(be, [5], [7], 2, 1, True)
    assert not fake.deselected
    fake = FakeCudnn()
    monkeypatch.setenv("MOBA_DIST_CUDNN_BACKEND_ONLY", "1")
    be = fake_backend(monkeypatch, fake)
    check_against_reference(be, [5], [7], 2, 1, True)
    assert fake.deselected == {"sdpa_fwd_prefill", "sdpa_bwd_"}


def test_backend_raises_when_nothing_builds(monkeypatch):
    fake = FakeCudnn(reject_kwargs={"use_padding_mask"})
    be = fake_backend(monkeypatch, fake)
    q = torch.randn(4, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="could not build"):
        be.forward(q, q, q, cu_of([4]), cu_of([4]), 4, 4, 0.25, True)
    assert be.cache_info()["failed_builds"] == 8


def test_backward_uses_the_given_merged_lse(monkeypatch):
    """Keys split over two calls and merged by LSE: each call's backward with the merged out/LSE
    gives the gradients of attention over all keys (so the given LSE is what the backward uses)."""
    from moba_dist.kernels import merge_lse

    be = fake_backend(monkeypatch, FakeCudnn())
    g = torch.Generator().manual_seed(9)
    hq, hkv, d, scale = 4, 2, 16, 0.3
    lq, la, lb = [6, 9], [4, 3], [5, 0]
    q = torch.randn(sum(lq), hq, d, generator=g).to(torch.bfloat16)
    ka = torch.randn(sum(la), hkv, d, generator=g).to(torch.bfloat16)
    kb = torch.randn(sum(lb), hkv, d, generator=g).to(torch.bfloat16)
    va = torch.randn(sum(la), hkv, d, generator=g).to(torch.bfloat16)
    vb = torch.randn(sum(lb), hkv, d, generator=g).to(torch.bfloat16)
    go = torch.randn(sum(lq), hq, d, generator=g).to(torch.bfloat16)
    cu_q, cu_a, cu_b = cu_of(lq), cu_of(la), cu_of(lb)
    oa, sa = be.forward(q, ka, va, cu_q, cu_a, 9, 4, scale, False)
    ob, sb = be.forward(q, kb, vb, cu_q, cu_b, 9, 5, scale, False)
    out, lse = merge_lse(oa.reshape(-1, d), sa.t().reshape(-1), ob.reshape(-1, d), sb.t().reshape(-1))
    out = out.to(torch.bfloat16).view(-1, hq, d)
    lse = lse.view(-1, hq).t().contiguous()
    dqa, dka, dva = be.backward(go, q, ka, va, out, lse, cu_q, cu_a, 9, 4, scale, False)
    dqb, dkb, dvb = be.backward(go, q, kb, vb, out, lse, cu_q, cu_b, 9, 5, scale, False)
    # Reference over the union of both key sets, per segment.
    xs = [x.double().requires_grad_() for x in (q, ka, kb, va, vb)]
    outs = []
    for s in range(2):
        ks = torch.cat([xs[1][cu_a[s]:cu_a[s + 1]], xs[2][cu_b[s]:cu_b[s + 1]]])
        vs = torch.cat([xs[3][cu_a[s]:cu_a[s + 1]], xs[4][cu_b[s]:cu_b[s + 1]]])
        mask = torch.ones(1, lq[s], ks.shape[0], dtype=torch.bool)
        outs.append(masked_attention(xs[0][cu_q[s]:cu_q[s + 1]], ks, vs, mask, scale))
    ref_grads = torch.autograd.grad(torch.cat(outs), xs, go.double())
    got = (dqa.double() + dqb.double(), dka, dkb, dva, dvb)
    for a, b in zip(got, ref_grads):
        torch.testing.assert_close(a.double(), b, atol=3e-2, rtol=3e-2)


def test_graph_cache_evicts_the_least_recently_used():
    from moba_dist.kernels.cudnn_backend import CudnnBackend

    be = CudnnBackend(max_graphs=2)
    built = []

    def get(key):
        return be._plan("fwd", key, True, lambda variant: built.append(key) or key)

    for key in ("a", "b", "a", "c", "a", "b"):
        get(key)
    # "a" was used again before "c" came, so "b" (not "a") made room; "b" is built a second time.
    assert built == ["a", "b", "c", "b"]
    assert set(be._graphs) == {"a", "b"}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "head-major-view"])
def test_forward_reads_key_segments_in_place(monkeypatch, strided):
    """``kv_offsets``: segments of ``k, v [n, Hkv, D]`` addressed in place give what the same
    segments gathered into packed rows give (on the fake cuDNN, which reads the offsets and
    strides it is handed), and the graph is keyed by the row stride."""
    from moba_dist.core import kv_offsets

    fake = FakeCudnn()
    be = fake_backend(monkeypatch, fake)
    g = torch.Generator().manual_seed(3)
    n, hkv, d = 40, 3, 16
    shape = (hkv, n, d) if strided else (n, hkv, d)
    k, v = (torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(2))
    if strided:  # an HF layer's [B, H, S, D] transposed: token rows D apart, heads n * D apart
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    assert be.kv_in_place_ok(k, v)
    # (kv head, first token, length) of each segment, and queries per segment.
    segs = [(0, 0, 8), (2, 8, 8), (1, 24, 16), (2, 32, 5)]
    lq = [3, 5, 1, 4]
    q = torch.randn(sum(lq), 1, d, generator=g).to(torch.bfloat16)
    cu_q = cu_of(lq)
    cu_k = cu_of([ln for _, _, ln in segs])
    hm = torch.tensor([h * n + t for h, t, _ in segs])
    offsets = kv_offsets(hm, k)
    out, lse = be.forward(q, k, v, cu_q, cu_k, max(lq), 16, 0.25, False, kv_offsets=offsets)
    kp = torch.cat([k[t:t + ln, h] for h, t, ln in segs])[:, None]
    vp = torch.cat([v[t:t + ln, h] for h, t, ln in segs])[:, None]
    want, want_lse = be.forward(q, kp, vp, cu_q, cu_k, max(lq), 16, 0.25, False)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    keys = list(be._graphs)
    assert len(keys) == 2 and keys[0][-1] == k.stride(0) and keys[1][-1] == 0


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "hf-view"])
def test_moba_varlen_forward_with_segments_in_place(monkeypatch, strided):
    """The varlen selected part on one device hands the backend its key segments in place
    (``CoreMeta.kv_in_place``): the same outputs as with the per-batch gather
    (``MOBA_DIST_KV_IN_PLACE=0``), bitwise, and as the dense reference, on the fake cuDNN."""
    import moba_dist
    import moba_dist.parallel.moba_cp as moba_cp
    from moba_dist.reference import moba_attn_varlen_reference

    fake = FakeCudnn()
    be = fake_backend(monkeypatch, fake)
    monkeypatch.setattr(moba_cp, "get_backend", lambda *a, **kw: be)
    # float32 (the CPU dtypes): the stand-in computes in float64 whatever the declared dtype.
    monkeypatch.setattr("moba_dist.kernels.cudnn_backend._cudnn_dtype", lambda cudnn, dtype: "FLOAT")
    calls = []
    real_forward = be.forward

    def spy(*args, **kw):
        calls.append(kw.get("kv_offsets") is not None)
        return real_forward(*args, **kw)

    monkeypatch.setattr(be, "forward", spy)
    g = torch.Generator().manual_seed(0)
    lens, hq, hkv, d, chunk, topk = [70, 45], 4, 2, 16, 8, 3
    t = sum(lens)
    cu = cu_of(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))  # float32: CPU dtypes
    if strided:  # HF's [1, H, S, D] transposed: token rows are not (token, head)-contiguous
        q, k, v = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v))
    with torch.no_grad():
        out = moba_dist.moba_attn_varlen(q, k, v, cu, max(lens), chunk, topk)
        assert any(calls)
        calls.clear()
        monkeypatch.setenv("MOBA_DIST_KV_IN_PLACE", "0")
        gathered = moba_dist.moba_attn_varlen(q, k, v, cu, max(lens), chunk, topk)
        assert calls and not any(calls)
    assert torch.equal(out, gathered)
    ref = moba_attn_varlen_reference(q.double(), k.double(), v.double(), cu, chunk, topk)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_segments_of_gathers_what_the_offsets_address():
    """The fallback of an in-place forward (no cuDNN graph builds): ``_segments_of`` gathers the
    rows that ``kv_offsets`` address, also from a strided view."""
    from moba_dist.core import kv_offsets
    from moba_dist.kernels.cudnn_backend import _segments_of

    n, hkv, d = 30, 3, 8
    base = torch.randn(hkv, n, d)
    k = base.transpose(0, 1)  # [n, Hkv, D], heads n * D apart
    v = (base * 2).transpose(0, 1)
    segs = [(2, 5, 7), (0, 0, 4), (1, 20, 10)]
    hm = torch.tensor([h * n + t for h, t, _ in segs])
    cu = cu_of([ln for *_, ln in segs])
    kp, vp = _segments_of(k, v, kv_offsets(hm, k), cu)
    assert torch.equal(kp[:, 0], torch.cat([k[t:t + ln, h] for h, t, ln in segs]))
    assert torch.equal(vp[:, 0], torch.cat([v[t:t + ln, h] for h, t, ln in segs]))
