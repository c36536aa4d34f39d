"""The cuDNN backend on a GPU: output, LSE and gradients on bf16/fp16 inputs against a float64
dense reference on the same values (varlen with empty segments, GQA, key segments longer and
shorter than query segments, non-causal), backward with a merged LSE, the graph cache in steady
state, and no host sync. Skipped without CUDA, or when the backend cannot run here (no ``cudnn``
module, pre-Hopper GPU)."""

import pytest
import torch
from helpers import segment_attention_reference as reference

from moba_dist.kernels import merge_lse
from moba_dist.kernels.cudnn_backend import GQA_BWD_ENV, CudnnBackend

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def be():
    b = CudnnBackend(fallback=False)
    if not b.supports(torch.device("cuda"), torch.bfloat16, 128):
        pytest.skip(f"cuDNN backend unavailable here ({b.import_error or 'GPU older than Hopper'})")
    return b


def cu_of(lengths):
    c = [0]
    for n in lengths:
        c.append(c[-1] + n)
    return torch.tensor(c, dtype=torch.int32, device="cuda")


def inputs(lq, lk, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda n, h: torch.randn(n, h, d, device="cuda", generator=g).to(dtype)  # noqa: E731
    return mk(sum(lq), hq), mk(sum(lk), hkv), mk(sum(lk), hkv), mk(sum(lq), hq)


def assert_close_rel(got, ref, rel, what):
    got = got.double()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite values"
    err = (got - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-3)
    assert err <= rel * scale, f"{what}: max abs error {err:.3e} > {rel} * {scale:.3e}"


CASES = {
    "varlen_empty_gqa16_4_causal": ([300, 0, 1000, 77, 0, 129], [300, 0, 1000, 77, 5, 129], 16, 4, 128, True),
    "mha8_causal": ([513, 1024, 7], [513, 1024, 7], 8, 8, 128, True),
    "k_longer_than_q_causal": ([100, 256, 1, 0, 50], [300, 256, 700, 20, 50], 16, 4, 128, True),
    "q_longer_than_k_causal": ([8, 300, 64, 5], [3, 100, 0, 5], 16, 4, 128, True),
    "noncausal_empty_keys": ([128, 40, 64, 0], [200, 0, 3, 9], 16, 4, 128, False),
    "d64_gqa_causal": ([1000, 700], [1000, 700], 16, 4, 64, True),
    "one_head_many_segments": ([(7 * i) % 41 for i in range(600)], [1 + (13 * i) % 199 for i in range(600)],
                               1, 1, 128, False),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_cudnn_matches_float64_reference(be, name, dtype):
    lq, lk, hq, hkv, d, causal = CASES[name]
    q, k, v, go = inputs(lq, lk, hq, hkv, d, dtype, seed=len(name))
    scale = d ** -0.5
    cu_q, cu_k = cu_of(lq), cu_of(lk)
    out, lse = be.forward(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lq)) and lse.is_contiguous()
    dq, dk, dv = be.backward(go, q, k, v, out, lse, cu_q, cu_k, max(lq), max(lk), scale, causal)
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference(*xs, lq, lk, scale, causal)
    ref_grads = torch.autograd.grad(ref, xs, go.double(), allow_unused=True)
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead), "rows that see no key must have lse -inf, only they"
    assert bool((out[dead[0]] == 0).all()) and bool((dq[dead[0]] == 0).all())
    assert (lse[~dead].double() - ref_lse[~dead]).abs().max().item() < 1e-2
    assert_close_rel(out, ref.detach(), 2e-2, "out")
    for got, want, x, n in zip((dq, dk, dv), ref_grads, xs, ("dq", "dk", "dv")):
        assert got.dtype == dtype and got.shape == x.shape
        assert_close_rel(got, torch.zeros_like(x) if want is None else want, 2e-2, n)


def test_backward_with_merged_lse(be):
    """Keys split over two calls merged by LSE; backward of each with the merged out/LSE gives the
    gradients of attention over all keys."""
    lq, lk, hq, hkv, d = [300, 200, 64], [500, 256, 100], 16, 4, 128
    q, k, v, go = inputs(lq, lk, hq, hkv, d, torch.bfloat16, seed=5)
    scale = d ** -0.5
    ia, ib, la, lb, start = [], [], [], [], 0
    for n in lk:
        ia += range(start, start + n // 3)
        ib += range(start + n // 3, start + n)
        la.append(n // 3)
        lb.append(n - n // 3)
        start += n
    ia, ib = torch.tensor(ia, device="cuda"), torch.tensor(ib, device="cuda")
    cu_q, cu_a, cu_b = cu_of(lq), cu_of(la), cu_of(lb)
    oa, sa = be.forward(q, k[ia], v[ia], cu_q, cu_a, max(lq), max(la), scale, False)
    ob, sb = be.forward(q, k[ib], v[ib], cu_q, cu_b, max(lq), max(lb), scale, False)
    out, lse = merge_lse(oa.reshape(-1, d), sa.t().reshape(-1), ob.reshape(-1, d), sb.t().reshape(-1))
    out = out.to(q.dtype).view(-1, hq, d)
    lse = lse.view(-1, hq).t().contiguous()
    dqa, dka, dva = be.backward(go, q, k[ia], v[ia], out, lse, cu_q, cu_a, max(lq), max(la), scale, False)
    dqb, dkb, dvb = be.backward(go, q, k[ib], v[ib], out, lse, cu_q, cu_b, max(lq), max(lb), scale, False)
    dk = torch.zeros_like(k, dtype=torch.float64)
    dv = torch.zeros_like(v, dtype=torch.float64)
    dk[ia], dk[ib], dv[ia], dv[ib] = dka.double(), dkb.double(), dva.double(), dvb.double()
    xs = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference(*xs, lq, lk, scale, False)
    rq, rk, rv = torch.autograd.grad(ref, xs, go.double())
    assert_close_rel(out, ref.detach(), 2e-2, "merged out")
    assert_close_rel(dqa.double() + dqb.double(), rq, 2e-2, "dq")
    assert_close_rel(dk, rk, 2e-2, "dk")
    assert_close_rel(dv, rv, 2e-2, "dv")


def test_graph_cache_steady_state_and_no_host_sync(monkeypatch):
    monkeypatch.setenv(GQA_BWD_ENV, "cudnn")  # build the GQA backward graph too (default: FA2)
    b = CudnnBackend(fallback=False)
    if not b.supports(torch.device("cuda"), torch.bfloat16, 128):
        pytest.skip(f"cuDNN backend unavailable here ({b.import_error})")
    hq, hkv, d, scale = 16, 4, 128, 128 ** -0.5
    shapes = [[700, 900, 800], [1000, 600, 400, 400], [950, 1023, 425]]  # one shape class
    for i, lengths in enumerate(shapes):
        q, k, v, go = inputs(lengths, lengths, hq, hkv, d, torch.bfloat16, seed=i)
        cu = cu_of(lengths)
        out, lse = b.forward(q, k, v, cu, cu, max(lengths), max(lengths), scale, True)
        b.backward(go, q, k, v, out, lse, cu, cu, max(lengths), max(lengths), scale, True)
    info = b.cache_info()
    assert info["misses"] == 2 and info["builds"] == 2 and info["hits"] == 4, info
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, lse = b.forward(q, k, v, cu, cu, max(lengths), max(lengths), scale, True)
        b.backward(go, q, k, v, out, lse, cu, cu, max(lengths), max(lengths), scale, True)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "hf-view"])
def test_forward_reads_key_segments_in_place(be, strided):
    """``kv_offsets`` (the varlen MoBA forward's key segments read in place from ``k, v [n, Hkv,
    D]``, ragged offsets with a row stride of ``Hkv * D`` or ``D``) against the same segments
    gathered into packed rows, and against the float64 reference."""
    from moba_dist.core import kv_offsets

    g = torch.Generator(device="cuda").manual_seed(1)
    n, hkv, d = 5000, 4, 128
    shape = (hkv, n, d) if strided else (n, hkv, d)
    k, v = (torch.randn(*shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
    if strided:
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    assert be.kv_in_place_ok(k, v)
    segs = [(0, 0, 1024), (3, 1024, 1024), (1, 2048, 1024), (2, 4096, 904), (0, 3072, 1024)]
    lq = [700, 1, 130, 2000, 64]
    q = torch.randn(sum(lq), 1, d, device="cuda", generator=g).to(torch.bfloat16)
    cu_q, cu_k = cu_of(lq), cu_of([ln for *_, ln in segs])
    hm = torch.tensor([h * n + t for h, t, _ in segs], device="cuda")
    out, lse = be.forward(q, k, v, cu_q, cu_k, max(lq), 1024, 0.088, False, kv_offsets=kv_offsets(hm, k))
    kp = torch.cat([k[t:t + ln, h] for h, t, ln in segs])[:, None].contiguous()
    vp = torch.cat([v[t:t + ln, h] for h, t, ln in segs])[:, None].contiguous()
    want, want_lse = be.forward(q, kp, vp, cu_q, cu_k, max(lq), 1024, 0.088, False)
    assert_close_rel(out, want.double(), 1e-2, "out vs gathered")
    assert_close_rel(lse, want_lse.double(), 1e-4, "lse vs gathered")
    ref, ref_lse = reference(q.double(), kp.double(), vp.double(), lq, [ln for *_, ln in segs], 0.088, False)
    assert_close_rel(out, ref, 2e-2, "out vs reference")
    assert_close_rel(lse, ref_lse, 1e-3, "lse vs reference")


def test_moba_varlen_forward_in_place_matches_gather_and_reference(be, monkeypatch):
    """One device, varlen selected part on cuDNN: the forward with key segments read in place
    equals the per-batch gather (``MOBA_DIST_KV_IN_PLACE=0``) to rounding and the float64 dense
    reference, also on an HF-style strided view."""
    import moba_dist
    from moba_dist.reference import moba_attn_varlen_reference

    monkeypatch.setenv("MOBA_DIST_SELECTED_KERNEL", "varlen")
    g = torch.Generator(device="cuda").manual_seed(2)
    lens, hq, hkv, d, chunk, topk = [1500, 1200], 16, 4, 128, 128, 4
    t = sum(lens)
    cu = cu_of(lens)
    q, k, v = (torch.randn(t, h, d, device="cuda", generator=g).to(torch.bfloat16) for h in (hq, hkv, hkv))
    ref = moba_attn_varlen_reference(q.double(), k.double(), v.double(), cu, chunk, topk)
    hf = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in (q, k, v)]
    with torch.no_grad():
        for inputs in ((q, k, v), hf):
            monkeypatch.delenv("MOBA_DIST_KV_IN_PLACE", raising=False)
            got = moba_dist.moba_attn_varlen(*inputs, cu, max(lens), chunk, topk)
            monkeypatch.setenv("MOBA_DIST_KV_IN_PLACE", "0")
            gathered = moba_dist.moba_attn_varlen(*inputs, cu, max(lens), chunk, topk)
            assert_close_rel(got, gathered.double(), 1e-2, "in place vs gathered")
            assert_close_rel(got, ref, 2e-2, "in place vs reference")
