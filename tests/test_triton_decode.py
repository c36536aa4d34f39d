"""The Triton decode kernel (moba_dist/kernels/triton_decode.py) against ``moba_decode``.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set before
Triton is imported, as in tests/test_triton_moba.py) on small float32 inputs whose gate scores
are exact in float32 (integer-valued queries and block means), so every summation order gives
the same selection; the bf16 case checks the mma3 path's split arithmetic the same way.
GPU cases (``-m gpu``) compare bf16 selections with ``triton_gate.gate_topk``.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from test_triton_moba import _import_kernels  # noqa: E402

from moba_dist.decode import decode_selection, moba_decode, update_block_sums  # noqa: E402

td = _import_kernels("moba_dist.kernels.triton_decode", "_attn_kernel")
DEV = "cuda" if CUDA else "cpu"


def make_cache(lengths, lmax, hq, hkv, d, chunk, dtype, seed, exact=True):
    """Cache, block sums and one query per row. ``exact``: small integer keys and queries, and
    each block's keys summing to a multiple of ``chunk`` (means are integers), so float32 gate
    scores are exact and equal in every order."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(lengths)
    if exact:
        kc = torch.randint(-3, 4, (bsz, lmax, hkv, d), generator=g).double()
        # Make each block's sum a multiple of chunk: adjust its last key.
        nb = lmax // chunk
        blocks = kc[:, :nb * chunk].view(bsz, nb, chunk, hkv, d)
        rem = blocks[:, :, :-1].sum(2) % chunk
        blocks[:, :, -1] = torch.where(rem == 0, 0.0, chunk - rem) + blocks[:, :, -1] * chunk
        q = torch.randint(-3, 4, (bsz, hq, d), generator=g).double()
    else:
        kc = torch.randn(bsz, lmax, hkv, d, generator=g, dtype=torch.float64)
        q = torch.randn(bsz, hq, d, generator=g, dtype=torch.float64)
    vc = torch.randn(bsz, lmax, hkv, d, generator=g, dtype=torch.float64)
    kc, vc, q = kc.to(dtype), vc.to(dtype), q.to(dtype)
    pos = torch.stack([torch.where(torch.arange(lmax) < n, torch.arange(lmax), -1) for n in lengths])
    sums = torch.zeros(bsz, -(-lmax // chunk), hkv, d, dtype=torch.float64)
    update_block_sums(sums, kc, pos, chunk)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return q, kc, vc, seqlens, sums


CASES = [
    # lengths, lmax, hq, hkv, d, chunk, topk, config
    ([70, 33, 1, 16], 72, 4, 2, 16, 4, 3, None),  # GQA, rows of different lengths
    ([50, 17], 64, 2, 2, 16, 8, 4, None),  # Hq == Hkv
    ([40, 9], 48, 4, 2, 16, 5, 1, None),  # topk 1: own block only; chunk not a power of 2
    ([45], 48, 4, 2, 16, 16, 3, td.DecodeConfig(split_n=16, block_n=16, gate_programs=2)),
    ([61, 30], 64, 8, 2, 32, 2, 5, td.DecodeConfig(gate_programs=3)),  # G 4, many gate programs
    ([23], 24, 6, 2, 16, 4, 9, None),  # G 3 (padded to 4), topk covers the length
    ([70, 40], 72, 4, 2, 16, 6, 3, None),  # the gate with a chunk that is not a power of 2
    # 152 blocks = 5 gate tiles dealt to 2 programs (3 and 2 tiles), and to 5 programs.
    ([300, 150, 70], 304, 4, 2, 16, 2, 5, td.DecodeConfig(gate_programs=2)),
    ([300, 150, 70], 304, 4, 2, 16, 2, 5, None),
]


@pytest.mark.parametrize("case", CASES)
def test_triton_decode_equals_torch(case):
    lengths, lmax, hq, hkv, d, chunk, topk, cfg = case
    q, kc, vc, seqlens, sums = make_cache(lengths, lmax, hq, hkv, d, chunk, torch.float32, seed=lmax)
    ref = moba_decode(q, kc, vc, seqlens, sums, chunk, topk)
    dev = [t.to(DEV) for t in (q, kc, vc, seqlens, sums)]
    out, lse = td.moba_decode_triton(*dev, chunk, topk, config=cfg, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.cpu() - ref).abs().max().item()
    assert err < 1e-5, err
    sel_k = td.decode_selection_triton(dev[0], dev[3], dev[4], chunk, topk, config=cfg)
    sel_t = decode_selection(q, sums, (seqlens.long() - 1) // chunk, chunk, topk)
    assert torch.equal(sel_k.cpu().sort(-1).values, sel_t.sort(-1).values)
    # The LSE: float64 dense over the same selection.
    sel = decode_selection(q, sums, (seqlens.long() - 1) // chunk, chunk, topk)
    for b, n in enumerate(lengths):
        for h in range(hq):
            own = (n - 1) // chunk
            pos = [p for p in range(n) if p // chunk in sel[b, h].tolist() or p // chunk == own]
            s = (kc[b, pos, h // (hq // hkv)].double() @ q[b, h].double()) * d ** -0.5
            assert abs(torch.logsumexp(s, 0).item() - lse[b, h].item()) < 1e-4


def test_triton_decode_ties_to_the_lower_block():
    # Every block of a row has the same keys: all scores tie, the lowest blocks must be chosen.
    chunk, topk, lmax = 4, 3, 40
    q, kc, vc, seqlens, sums = make_cache([38], lmax, 4, 2, 16, chunk, torch.float32, seed=2)
    kc[:, chunk:36] = kc[:, :chunk].repeat(1, 8, 1, 1)
    sums.zero_()
    update_block_sums(sums, kc, torch.arange(lmax)[None].clone(), chunk)
    ref = moba_decode(q, kc, vc, seqlens, sums, chunk, topk)
    out = td.moba_decode_triton(*(t.to(DEV) for t in (q, kc, vc, seqlens, sums)), chunk, topk)
    assert (out.cpu() - ref).abs().max().item() < 1e-5


def test_triton_decode_bf16_split_path():
    # bf16 queries take the mma3 gate; exact scores make the selection order-free.
    lengths, lmax, chunk, topk = [60, 21], 64, 4, 4
    q, kc, vc, seqlens, sums = make_cache(lengths, lmax, 4, 2, 16, chunk, torch.bfloat16, seed=9)
    ref = moba_decode(q, kc, vc, seqlens, sums, chunk, topk)
    out = td.moba_decode_triton(*(t.to(DEV) for t in (q, kc, vc, seqlens, sums)), chunk, topk)
    assert out.dtype == torch.bfloat16
    assert (out.cpu().float() - ref.float()).abs().max().item() < 2e-2


@pytest.mark.parametrize("chunk", [1, 2, 6, 100, 128, 4096])
def test_block_means_equal_gating(chunk):
    """The kernel's block means (a product with ``1 / chunk`` for powers of two, a float64
    division otherwise) are ``gating.block_means``'s, bit for bit, on sums of any magnitude."""
    import triton
    import triton.language as tl

    from moba_dist.gating import block_means

    @triton.jit
    def mean_kernel(s_ptr, o_ptr, chunk, inv_chunk, N: tl.constexpr, POW2: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, td._mean(tl.load(s_ptr + i), chunk, inv_chunk, POW2))

    g = torch.Generator().manual_seed(chunk)
    sums = torch.randn(4096, generator=g, dtype=torch.float64) * torch.logspace(-300, 300, 4096,
                                                                               dtype=torch.float64)
    sums[:3] = torch.tensor([5e-324, -1e-310, 1.7e308], dtype=torch.float64)  # subnormal, huge
    o = torch.empty(4096, device=DEV)
    mean_kernel[(1,)](sums.to(DEV), o, chunk, 1.0 / chunk, N=4096, POW2=(chunk & (chunk - 1)) == 0)
    want = block_means(sums.view(-1, 1, 1), torch.full((4096,), chunk), torch.float32).view(-1)
    assert torch.equal(o.cpu(), want)


@pytest.mark.parametrize("integer_rounding", [True, pytest.param(False, marks=pytest.mark.gpu)])
def test_split3_matches_split_bf16x3(integer_rounding):
    """Both ways of rounding to bf16 in the kernel (integer arithmetic, which the interpreter
    needs, and the GPU's cast: a GPU test, the interpreter truncates casts) give
    ``split_bf16x3``'s split."""
    import triton
    import triton.language as tl

    from moba_dist.kernels.triton_gate import split_bf16x3

    @triton.jit
    def split_kernel(x_ptr, o_ptr, N: tl.constexpr, INTEGER: tl.constexpr):
        i = tl.arange(0, N)
        hi, mid, lo = td._split3(tl.load(x_ptr + i), INTEGER)
        tl.store(o_ptr + i, hi)
        tl.store(o_ptr + N + i, mid)
        tl.store(o_ptr + 2 * N + i, lo)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, generator=g) * torch.logspace(-30, 30, 1024)
    x[:4] = torch.tensor([3.4e38, -3.4e38, float("inf"), 0.0])
    xd = x.to(DEV)
    o = torch.empty(3 * 1024, device=DEV)
    split_kernel[(1,)](xd, o, N=1024, INTEGER=integer_rounding)
    want = split_bf16x3(x.view(1024, 1, 1)).float().view(3, 1024)
    assert torch.equal(o.cpu().view(3, 1024), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_selection_equals_gate_topk(dtype):
    from moba_dist.kernels.triton_gate import gate_topk

    chunk, topk, lmax, hq, hkv, d = 64, 8, 64 * 300, 16, 4, 128
    lengths = [lmax - 5, 64 * 200 + 7, 64 * 9]
    q, kc, vc, seqlens, sums = make_cache(lengths, lmax, hq, hkv, d, chunk, dtype, seed=4, exact=False)
    dev = [t.cuda() for t in (q, kc, vc, seqlens, sums)]
    out = td.moba_decode_triton(*dev, chunk, topk)
    ref = moba_decode(*dev, chunk, topk)  # selection through gating.select_blocks -> gate_topk
    assert (out.float() - ref.float()).abs().max().item() < 3e-2
    # The selections themselves: gate_topk on the flattened means.
    own = (seqlens.long() - 1) // chunk
    sel_ref = decode_selection(dev[0], dev[4], own, chunk, topk)
    sel = td.decode_selection_triton(dev[0], dev[3], dev[4], chunk, topk)
    assert torch.equal(sel, sel_ref)
    # And gate_topk called directly on the flattened means, as select_blocks would.
    n = int(own.max())
    means = (dev[4][:, :n].reshape(-1, hkv, d) / chunk).float()
    base = torch.arange(len(lengths), device="cuda") * n
    flat = gate_topk(dev[0], means, base + own.cuda(), base, topk)
    assert torch.equal(sel, torch.where(flat >= 0, flat - base[:, None, None], -1))


def test_cp_local_candidates_triton_equals_torch():
    # The CUDA gate of the context-parallel decode (the decode kernel's gate on the local sums)
    # against the CPU gate, on exact scores; candidates include the tie order of equal scores.
    from moba_dist.parallel.decode_cp import local_candidates

    chunk, topk = 4, 4
    q, kc, _, _, _ = make_cache([64, 64], 64, 4, 2, 16, chunk, torch.float32, seed=5)
    off = torch.tensor([6, 13])
    n = torch.tensor([50, 3])  # row 0 scores 13 local blocks, row 1 one (positions 13..15)
    first = off // chunk
    ar = torch.arange(64)
    rel = torch.where(ar < n[:, None], ar + off[:, None] - first[:, None] * chunk, -1)
    local_k = torch.stack([kc[b].roll(-int(off[b]), 0) for b in range(2)])
    sums = torch.zeros(2, 17, 2, 16, dtype=torch.float64)
    update_block_sums(sums, local_k, rel, chunk)
    want = local_candidates(q, sums, off, n, chunk, topk, gate="torch")
    got = local_candidates(q.to(DEV), sums.to(DEV), off, n, chunk, topk, gate="triton")
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_follows_the_cache():
    # Captured once; the cache length and the query change in place between replays.
    chunk, topk, lmax = 128, 8, 128 * 64
    q, kc, vc, seqlens, sums = make_cache([lmax], lmax, 16, 4, 128, chunk, torch.bfloat16, seed=6,
                                          exact=False)
    q, kc, vc, sums = q.cuda(), kc.cuda(), vc.cuda(), sums.cuda()
    lens = torch.tensor([100], dtype=torch.int32, device="cuda")
    static = {}

    def step():
        static["out"] = td.moba_decode_triton(q, kc, vc, lens, sums, chunk, topk)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for n in (100, 129, 4000, lmax):
        lens.fill_(n)
        q.copy_(torch.randn_like(q))
        g.replay()
        ref = moba_decode(q, kc, vc, lens, sums, chunk, topk)
        assert (static["out"].float() - ref.float()).abs().max().item() < 3e-2, n
