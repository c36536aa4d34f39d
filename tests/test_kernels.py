"""Kernel backends against a dense reference, including the LSE they return."""

import math

import pytest
import torch

from moba_dist.kernels import get_backend, merge_lse, varlen_attn_with_lse
from moba_dist.reference import masked_attention


def dense_varlen(q, k, v, cu_q, cu_k, scale, causal):
    """Per-segment dense attention and LSE, bottom-right causal."""
    outs, lses = [], []
    for s in range(cu_q.numel() - 1):
        qa, qb, ka, kb = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        lq, lk = qb - qa, kb - ka
        mask = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            mask = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        outs.append(masked_attention(q[qa:qb], k[ka:kb], v[ka:kb], mask[None], scale))
        rep = q.shape[1] // k.shape[1]
        sc = torch.einsum("ihd,jhd->hij", q[qa:qb], k[ka:kb].repeat_interleave(rep, 1)) * scale
        lses.append(torch.logsumexp(sc.masked_fill(~mask[None], float("-inf")), -1))
    return torch.cat(outs), torch.cat(lses, dim=1)


CASES = [
    # q lengths, k lengths, hq, hkv, causal
    ([5, 0, 17, 3], [5, 4, 17, 9], 4, 2, True),
    ([5, 0, 17, 3], [9, 4, 1, 9], 2, 2, False),
    ([70, 1], [130, 1], 4, 1, True),
    ([8, 6], [3, 0], 2, 1, True),  # more queries than keys: early queries see nothing
    ([33], [33], 8, 2, True),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_torch_backend_matches_dense(case, dtype):
    lq, lk, hq, hkv, causal = CASES[case]
    g = torch.Generator().manual_seed(case)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    d = 8
    q = torch.randn(sum(lq), hq, d, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(sum(lk), hkv, d, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(sum(lk), hkv, d, dtype=dtype, generator=g, requires_grad=True)
    scale = 0.37
    out, lse = varlen_attn_with_lse(q, k, v, cu_q, cu_k, max(lq), max(lk), softmax_scale=scale,
                                    causal=causal, backend="torch")
    ref, ref_lse = dense_varlen(q, k, v, cu_q, cu_k, scale, causal)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.to(ref_lse.dtype), ref_lse, atol=tol, rtol=tol)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_grads = torch.autograd.grad(ref, (q, k, v), go)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


def test_split_keys_merge_and_backward_with_final_lse_is_exact():
    """Attention over a key set split in two, merged by LSE, equals attention over all keys, and
    backward of each half with the merged (out, lse) gives the exact gradients."""
    g = torch.Generator().manual_seed(3)
    be = get_backend(torch.device("cpu"), torch.float64, 8, "torch")
    q = torch.randn(11, 4, 8, dtype=torch.float64, generator=g)
    k = torch.randn(20, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(20, 2, 8, dtype=torch.float64, generator=g, requires_grad=True)
    q.requires_grad_()
    cu_q = torch.tensor([0, 11], dtype=torch.int32)
    cu_a = torch.tensor([0, 7], dtype=torch.int32)
    cu_b = torch.tensor([0, 13], dtype=torch.int32)
    scale = 0.3
    oa, la = be.forward(q, k[:7], v[:7], cu_q, cu_a, 11, 7, scale, False)
    ob, lb = be.forward(q, k[7:], v[7:], cu_q, cu_b, 11, 13, scale, False)
    out, lse = merge_lse(oa.reshape(-1, 8), la.t().reshape(-1), ob.reshape(-1, 8), lb.t().reshape(-1))
    out = out.view(11, 4, 8)
    lse = lse.view(11, 4).t().contiguous()
    ref = masked_attention(q, k, v, torch.ones(1, 11, 20, dtype=torch.bool), scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    go = torch.randn_like(out)
    dqa, dka, dva = be.backward(go, q, k[:7], v[:7], out, lse, cu_q, cu_a, 11, 7, scale, False)
    dqb, dkb, dvb = be.backward(go, q, k[7:], v[7:], out, lse, cu_q, cu_b, 11, 13, scale, False)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), go)
    torch.testing.assert_close(dqa + dqb, rq, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.cat([dka, dkb]), rk, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.cat([dva, dvb]), rv, atol=1e-12, rtol=1e-12)


def test_merge_lse_indexed_and_empty_rows():
    out = torch.tensor([[1.0], [2.0], [0.0]], dtype=torch.float64)
    lse = torch.tensor([0.0, 1.0, float("-inf")], dtype=torch.float64)
    parts = torch.tensor([[3.0], [5.0]], dtype=torch.float64)
    plse = torch.tensor([0.0, 0.0], dtype=torch.float64)
    m, ml = merge_lse(out, lse, parts, plse, torch.tensor([0, 0]))
    # Row 0: three equal-weight parts (1, 3, 5) -> 3; LSE log(3). Row 2 saw nothing.
    torch.testing.assert_close(m[0], torch.tensor([3.0], dtype=torch.float64))
    assert abs(ml[0].item() - math.log(3.0)) < 1e-12
    assert m[2].item() == 0.0 and ml[2].item() == float("-inf")
    assert m[1].item() == 2.0 and ml[1].item() == 1.0


def test_backend_selection_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        get_backend(torch.device("cpu"), torch.float32, 8, "nope")
    with pytest.raises(ValueError, match="backend"):
        get_backend(torch.device("cpu"), torch.float32, 8, "aten_flash")
    monkeypatch.setenv("MOBA_DIST_ATTN_BACKEND", "torch")
    assert get_backend(torch.device("cpu"), torch.float32, 8).name == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["aten_flash", "flash_attn"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_backend_matches_torch_backend(name, causal):
    dev = torch.device("cuda")
    be = get_backend(dev, torch.bfloat16, 64, "torch")
    try:
        fast = get_backend(dev, torch.bfloat16, 64, name)
    except ValueError:
        pytest.skip(f"{name} not available")
    g = torch.Generator().manual_seed(0)
    cu_q = torch.tensor([0, 100, 100, 357], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, 130, 131, 400], dtype=torch.int32, device=dev)
    q = torch.randn(357, 8, 64, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(400, 2, 64, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(400, 2, 64, generator=g).to(dev, torch.bfloat16)
    o1, l1 = be.forward(q, k, v, cu_q, cu_k, 257, 269, 0.125, causal)
    o2, l2 = fast.forward(q, k, v, cu_q, cu_k, 257, 269, 0.125, causal)
    assert (o1.float() - o2.float()).abs().max() < 2e-2
    assert (l1 - l2).abs().max() < 1e-2
    go = torch.randn_like(o1)
    for a, b in zip(be.backward(go, q, k, v, o2, l2, cu_q, cu_k, 257, 269, 0.125, causal),
                    fast.backward(go, q, k, v, o2, l2, cu_q, cu_k, 257, 269, 0.125, causal)):
        assert (a.float() - b.float()).abs().max() < 5e-2
