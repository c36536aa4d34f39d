"""Selected-segment attention in Triton (moba_dist/kernels/triton_moba.py) against dense references.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported) on small float32 inputs; the references are float64 dense masked attention
and autograd through it. GPU cases (``-m gpu``) run bf16 and check determinism.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")


def _import_kernels(name: str, kernel: str):
    """Import ``name`` with its kernels decorated for this machine: on a CPU-only machine an
    earlier import in compiled mode (triton's language functions, or the kernel module itself) is
    dropped and redone for the interpreter."""
    module = importlib.import_module(name)
    if CUDA or type(getattr(module, kernel)).__name__ == "InterpretedFunction":
        return module
    if type(importlib.import_module("triton.language").max).__name__ != "InterpretedFunction":
        for m in [m for m in sys.modules if m.split(".")[0] == "triton" and not m.startswith("triton._C")]:
            del sys.modules[m]
    del sys.modules[name]
    return importlib.import_module(name)


tm = _import_kernels("moba_dist.kernels.triton_moba", "_sel_fwd_kernel")
from moba_dist.kernels import merge_lse  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SMALL = tm.SelConfig(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16)


def make_case(gen, n, hq, hkv, d, lens, slots, dtype=torch.float32, pick=None):
    """A head-major pool with the same blocks (lengths ``lens``) for each kv head, segment
    ``h * len(lens) + b`` = block ``b`` of kv head ``h``, and ``slots`` selected blocks (or fewer,
    ``-1`` padded) per (query, head) from its own kv head."""
    nb = len(lens)
    per_head = sum(lens)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    seg_start = torch.cat([h * per_head + starts for h in range(hkv)])
    seg_len = torch.tensor(lens * hkv, dtype=torch.int32)
    k_pool = torch.randn(hkv * per_head, d, generator=gen, dtype=torch.float64).to(dtype)
    v_pool = torch.randn(hkv * per_head, d, generator=gen, dtype=torch.float64).to(dtype)
    q = torch.randn(n, hq, d, generator=gen, dtype=torch.float64).to(dtype)
    sel = torch.full((n, hq, slots), -1, dtype=torch.int32)
    for i in range(n):
        for h in range(hq):
            count = int(torch.randint(0, slots + 1, (), generator=gen)) if pick is None else pick
            blocks = torch.randperm(nb, generator=gen)[:count]
            sel[i, h, :len(blocks)] = (h // (hq // hkv)) * nb + blocks.to(torch.int32)
    return q, k_pool, v_pool, seg_start, seg_len, sel


def row_mask(sel, seg_start, seg_len, rows):
    """``[n, Hq, R]``: pool rows each (query, head) reads."""
    n, hq, _ = sel.shape
    mask = torch.zeros(n, hq, rows, dtype=torch.bool)
    for i in range(n):
        for h in range(hq):
            for g in sel[i, h].tolist():
                if g >= 0:
                    a = int(seg_start[g])
                    mask[i, h, a:a + int(seg_len[g])] = True
    return mask


def dense(q, k_pool, v_pool, mask, scale):
    """float64 masked attention and its LSE ``[Hq, n]`` (-inf, output 0 where nothing is seen)."""
    s = torch.einsum("ihd,rd->ihr", q, k_pool) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("ihr,rd->ihd", p, v_pool), lse.t()


def to_dev(*xs):
    return [x.to(DEV) for x in xs]


def fwd(q, kp, vp, ss, sl, sel, chunk, scale, config=SMALL, **kw):
    kw = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out, lse = tm.selected_attn_fwd(*to_dev(q, kp, vp, ss, sl, sel), chunk, scale, config=config, **kw)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("d,lens,hq,hkv", [(16, [8, 8, 8, 5], 4, 2), (12, [20, 20, 3], 3, 1)])
def test_forward_matches_dense(d, lens, hq, hkv):
    gen = torch.Generator().manual_seed(d)
    q, kp, vp, ss, sl, sel = make_case(gen, 19, hq, hkv, d, lens, slots=3)
    scale = 0.37
    out, lse = fwd(q, kp, vp, ss, sl, sel, max(lens), scale)
    ref, ref_lse = dense(q.double(), kp.double(), vp.double(), row_mask(sel, ss, sl, kp.shape[0]), scale)
    assert (out.double() - ref).abs().max() < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = ~torch.isinf(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-5
    assert (out[torch.isinf(lse).t()] == 0).all()


@pytest.mark.parametrize("fused_dq_runs", [2, 0], ids=["dq-in-dkdv", "dq-kernel"])
def test_backward_with_final_lse_of_a_split_key_set(fused_dq_runs):
    """Selections split into two disjoint sets A and B: forward each, merge by LSE, backward
    each with the merged (out, lse); the sums equal autograd through dense attention over
    A and B together. Segments of 20 keys with backward runs of 16 keys exercise the split of a
    segment over programs (dq from each run, or from the separate dq kernel), and a tiny partial
    budget the query windows."""
    gen = torch.Generator().manual_seed(7)
    lens = [20, 20, 20, 11]
    n, hq, hkv, d, scale = 17, 4, 2, 16, 0.25
    q, kp, vp, ss, sl, sel = make_case(gen, n, hq, hkv, d, lens, slots=4, pick=4)
    sel_a, sel_b = sel[..., :2].contiguous(), sel[..., 2:].contiguous()
    sel_b[0, 0] = -1  # a row that reads only set A
    config = tm.SelConfig(block_m=16, block_n=16, bwd_block_m=16, bwd_block_n=16,
                          fused_dq_runs=fused_dq_runs, max_partial_bytes=9 * hq * 2 * 2 * d * 4)
    oa, la = fwd(q, kp, vp, ss, sl, sel_a, 20, scale, config)
    ob, lb = fwd(q, kp, vp, ss, sl, sel_b, 20, scale, config)
    out, lse = merge_lse(oa.reshape(-1, d), la.t().reshape(-1), ob.reshape(-1, d), lb.t().reshape(-1))
    out, lse = out.view(n, hq, d), lse.view(n, hq).t().contiguous()
    # The same merge folded into B's forward (the self-part path), output in q's dtype.
    fused, fused_lse = fwd(q, kp, vp, ss, sl, sel_b, 20, scale, config, self_out=oa, self_lse=la,
                           out_dtype=q.dtype)
    assert (fused - out).abs().max() < 1e-6 and (fused_lse - lse).abs().max() < 1e-6

    qd, kd, vd = (x.double().requires_grad_() for x in (q, kp, vp))
    mask = row_mask(sel_a, ss, sl, kp.shape[0]) | row_mask(sel_b, ss, sl, kp.shape[0])
    ref, ref_lse = dense(qd, kd, vd, mask, scale)
    assert (out.double() - ref.detach()).abs().max() < 1e-5
    assert (lse.double() - ref_lse.detach()).abs().max() < 1e-5
    go = torch.randn(n, hq, d, generator=gen, dtype=torch.float64)
    ref.backward(go)

    grads = [torch.zeros_like(x) for x in (q, kp, vp)]
    # Set A: gradients straight into pool rows (disjoint segments); set B: segment-major rows.
    got_a = tm.selected_attn_bwd(*to_dev(go.float(), q, kp, vp, ss, sl, sel_a), 20,
                                 *to_dev(out, lse), scale, grad_start=ss.to(DEV),
                                 grad_rows=kp.shape[0], config=config)
    got_b = tm.selected_attn_bwd(*to_dev(go.float(), q, kp, vp, ss, sl, sel_b), 20,
                                 *to_dev(out, lse), scale, config=config)
    seg_rows = torch.cat([torch.arange(int(a), int(a) + int(b)) for a, b in zip(ss, sl)])
    for acc, g in zip(grads, got_a):
        acc += g.cpu()
    grads[0] += got_b[0].cpu()
    for acc, g in zip(grads[1:], got_b[1:]):
        acc.index_add_(0, seg_rows, g.cpu())
    for name, got, want in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        err = (got.double() - want).abs().max().item()
        assert err < 2e-5 * max(1.0, want.abs().max().item()), f"{name}: max abs error {err}"


def test_overlapping_segments():
    """A segment that is a prefix of another (as a block's part held elsewhere and the whole
    block): rows reading either get the right output, and segment-major gradients scattered
    onto pool rows match autograd."""
    gen = torch.Generator().manual_seed(13)
    n, hq, d, scale = 12, 2, 16, 0.3
    q, kp, vp, ss, sl, _ = make_case(gen, n, hq, 1, d, [20, 20], slots=1)
    ss = torch.cat([ss, ss[:1]])
    sl = torch.cat([sl, torch.tensor([7], dtype=torch.int32)])  # segment 2: rows [0, 7)
    sel = torch.tensor([[[0, 1], [2, 1], [2, -1]][i % 3] for i in range(n * hq)],
                       dtype=torch.int32).view(n, hq, 2)
    out, lse = fwd(q, kp, vp, ss, sl, sel, 20, scale)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, kp, vp))
    ref, ref_lse = dense(qd, kd, vd, row_mask(sel, ss, sl, kp.shape[0]), scale)
    assert (out.double() - ref.detach()).abs().max() < 1e-5
    go = torch.randn(n, hq, d, generator=gen, dtype=torch.float64)
    ref.backward(go)
    dq, dk_seg, dv_seg = (g.cpu() for g in tm.selected_attn_bwd(
        *to_dev(go.float(), q, kp, vp, ss, sl, sel), 20, *to_dev(out, lse), scale, config=SMALL))
    seg_rows = torch.cat([torch.arange(int(a), int(a) + int(b)) for a, b in zip(ss, sl)])
    dk = torch.zeros_like(kp).index_add_(0, seg_rows, dk_seg)
    dv = torch.zeros_like(vp).index_add_(0, seg_rows, dv_seg)
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), (qd.grad, kd.grad, vd.grad)):
        err = (got.double() - want).abs().max().item()
        assert err < 2e-5 * max(1.0, want.abs().max().item()), f"{name}: max abs error {err}"


def test_configs_and_windows_agree_and_runs_repeat():
    gen = torch.Generator().manual_seed(9)
    q, kp, vp, ss, sl, sel = make_case(gen, 21, 2, 1, 16, [16, 16, 16, 7], slots=2)
    base = fwd(q, kp, vp, ss, sl, sel, 16, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(base, fwd(q, kp, vp, ss, sl, sel, 16, 0.5)))
    other = tm.SelConfig(block_m=32, block_n=16, max_partial_bytes=5 * 2 * 2 * 16 * 4)
    for a, b in zip(base, fwd(q, kp, vp, ss, sl, sel, 16, 0.5, other)):
        fin = ~torch.isinf(b)
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        assert (a[fin] - b[fin]).abs().max() < 1e-6


def test_empty_and_argument_errors():
    gen = torch.Generator().manual_seed(1)
    q, kp, vp, ss, sl, sel = make_case(gen, 3, 2, 1, 16, [4, 4], slots=1, pick=0)
    out, lse = fwd(q, kp, vp, ss, sl, sel, 4, 1.0)
    assert (out == 0).all() and torch.isinf(lse).all()
    out, lse = fwd(q[:0], kp, vp, ss, sl, sel[:0], 4, 1.0)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    with pytest.raises(ValueError, match="sel"):
        tm.selected_attn_fwd(*to_dev(q, kp, vp, ss, sl, sel[:, :1]), 4)
    with pytest.raises(TypeError, match="k_pool"):
        tm.selected_attn_fwd(*to_dev(q, kp.double(), vp, ss, sl, sel), 4)
    with pytest.raises(ValueError, match="chunk"):
        tm.selected_attn_fwd(*to_dev(q, kp, vp, ss, sl, sel), 0)


def test_merge_slots_kernel_equals_the_torch_merge():
    """kernels.merge_slots through the Triton kernel (what CUDA runs) equals its PyTorch twin,
    empty slots (NaN garbage behind lse = -inf) unread, rows outside the window untouched."""
    from moba_dist.kernels import merge_slots

    g = torch.Generator().manual_seed(5)
    n, hq, d, slots, t0, w = 13, 4, 24, 3, 5, 6
    out = torch.randn(n, hq, d, generator=g)
    lse = torch.randn(hq, n, generator=g) * 3
    plse = torch.randn(w * hq * slots, generator=g) * 3
    plse[torch.rand(plse.shape, generator=g) < 0.3] = float("-inf")
    pout = torch.randn(w * hq * slots, d, generator=g)
    pout[torch.isinf(plse)] = float("nan")
    got_o, got_l, want_o, want_l = out.clone(), lse.clone(), out.clone(), lse.clone()
    merge_slots(pout, plse, slots, got_o, got_l, t0, impl="triton")
    merge_slots(pout, plse, slots, want_o, want_l, t0, impl="torch")
    assert (got_o - want_o).abs().max() < 1e-5 and (got_l - want_l).abs().max() < 1e-5
    assert torch.equal(got_o[:t0], out[:t0]) and torch.equal(got_o[t0 + w:], out[t0 + w:])


# --- GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_bf16_against_float64_and_deterministic():
    gen = torch.Generator().manual_seed(11)
    lens = [128] * 20 + [77]
    n, hq, hkv, d, scale = 1000, 16, 4, 128, 128 ** -0.5
    q, kp, vp, ss, sl, sel = make_case(gen, n, hq, hkv, d, lens, slots=7, dtype=torch.bfloat16, pick=7)
    out, lse = fwd(q, kp, vp, ss, sl, sel, 128, scale, tm.SelConfig())
    mask = row_mask(sel, ss, sl, kp.shape[0])
    ref, ref_lse = dense(q.double(), kp.double(), vp.double(), mask, scale)
    assert (out.double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 2e-2
    again = fwd(q, kp, vp, ss, sl, sel, 128, scale, tm.SelConfig())
    assert torch.equal(out, again[0]) and torch.equal(lse, again[1])
    go = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    args = to_dev(go, q, kp, vp, ss, sl, sel)
    g1 = tm.selected_attn_bwd(*args, 128, *to_dev(out, lse), scale)
    g2 = tm.selected_attn_bwd(*args, 128, *to_dev(out, lse), scale)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    qd, kd, vd = (x.double().requires_grad_() for x in (q, kp, vp))
    dense(qd, kd, vd, mask, scale)[0].backward(go.double())
    for got, want in zip(g1, (qd.grad, kd.grad, vd.grad)):
        assert (got.double().cpu() - want).abs().max() < 5e-2 * max(1.0, want.abs().max().item())


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9), st.integers(1, 5),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_plan_pairs_groups_pairs_by_segment_stably(m, hq, s, num_segments, block_m, wide, seed):
    """``plan_pairs`` against a plain loop: pair ids by segment in id order, unselected last;
    the segment bounds, tile numbering and heaviest-first order. ``wide``: segment ids past
    16 bits (the int32 keys)."""
    g = torch.Generator().manual_seed(seed)
    nseg = num_segments + (40000 if wide else 0)
    sel = torch.randint(-1, num_segments, (m, hq, s), generator=g, dtype=torch.int32)
    if wide:
        sel = torch.where(sel >= 0, sel + 40000, sel)
    plan = tm.plan_pairs(sel.to(DEV), nseg, block_m)
    flat = sel.flatten().tolist()
    groups = [[] for _ in range(nseg + 1)]  # the last: unselected pairs
    for p, x in enumerate(flat):
        groups[x if x >= 0 else nseg].append(p)
    assert plan.order.dtype == torch.int32
    assert plan.order.tolist() == [p for grp in groups for p in grp]
    groups = groups[:nseg]
    counts = [len(grp) for grp in groups]
    bounds, tiles = [0], [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
        tiles.append(tiles[-1] + -(-c // block_m))
    assert plan.seg_pairs.tolist() == bounds and plan.seg_tiles.tolist() == tiles
    assert plan.heavy_first.tolist() == sorted(range(nseg), key=lambda x: (-counts[x], x))
    assert plan.max_tiles >= tiles[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_head_major_equals_torchs_add_of_the_transposed_rows(dtype):
    """Bitwise PyTorch's ``dst.add_(src.view(H, n, D).transpose(0, 1))`` (a float32 sum rounded
    once), on a ``dst`` with padded rows and a head dim that is not a power of two."""
    g = torch.Generator().manual_seed(3)
    n, hkv, d = 45, 3, 24
    dst = torch.randn(n, hkv, d + 8, generator=g).to(dtype).to(DEV)[..., :d]
    src = (torch.randn(hkv * n, d, generator=g) * 1e-2).to(DEV)
    want = dst.clone().add_(src.view(hkv, n, d).transpose(0, 1))
    got = tm.add_head_major_(dst, src)
    assert got.data_ptr() == dst.data_ptr() and torch.equal(got, want)
    with pytest.raises(ValueError, match="add_head_major_"):
        tm.add_head_major_(dst, src[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_delta_is_the_float32_rowsum_of_the_products(dtype):
    """``row_delta`` against a float64 sum of the products, on a strided (transposed) ``out``
    and a head dim that is not a power of two."""
    g = torch.Generator().manual_seed(7)
    n, hq, d = 37, 3, 24
    dout = torch.randn(n, hq, d, generator=g).to(dtype).to(DEV)
    out = torch.randn(hq, n, d, generator=g).to(dtype).to(DEV).transpose(0, 1)
    got = tm.row_delta(dout, out)
    want = (dout.double() * out.double()).sum(-1).t()
    assert got.dtype == torch.float32 and got.shape == (hq, n)
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
    assert tm.row_delta(dout[:0], out[:0]).shape == (hq, 0)
