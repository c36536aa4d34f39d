"""MoBA decode (moba_dist/decode.py) against the training-time MoBA and the dense reference.

Every position ``t`` of every row is decoded as if the cache held exactly tokens ``0..t`` and
compared with row ``t`` of ``moba_attn_varlen`` on the whole packed batch and of the dense
mask-based reference (float64, 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from moba_dist import moba_attn_varlen, moba_decode
from moba_dist.decode import decode_selection, update_block_sums
from moba_dist.reference import moba_attn_varlen_reference, moba_selection_reference

TOL = 1e-12


def make_rows(lengths, hq, hkv, d, seed, repeat_keys=False):
    """Per-row float64 q, k, v; ``repeat_keys``: every block of a row gets the same keys (all
    gate scores tie), so the lower blocks must win."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        q = torch.randn(n, hq, d, generator=g, dtype=torch.float64)
        k = torch.randn(n, hkv, d, generator=g, dtype=torch.float64)
        v = torch.randn(n, hkv, d, generator=g, dtype=torch.float64)
        rows.append((q, k, v))
    return rows


def tie_keys(rows, chunk):
    """Same keys in every complete block of each row (so every past block scores the same)."""
    out = []
    for q, k, v in rows:
        k = k.clone()
        nfull = k.shape[0] // chunk
        for j in range(1, nfull):
            k[j * chunk:(j + 1) * chunk] = k[:chunk]
        out.append((q, k, v))
    return out


def cache_of(rows, lmax, chunk):
    """KV cache tensors and the block sums, built by update_block_sums from all positions."""
    bsz = len(rows)
    hkv, d = rows[0][1].shape[1:]
    kc = torch.zeros(bsz, lmax, hkv, d, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    pos = torch.full((bsz, lmax), -1, dtype=torch.int64)
    for b, (_, k, v) in enumerate(rows):
        kc[b, :k.shape[0]], vc[b, :k.shape[0]] = k, v
        pos[b, :k.shape[0]] = torch.arange(k.shape[0])
    sums = torch.zeros(bsz, -(-lmax // chunk), hkv, d, dtype=torch.float64)
    update_block_sums(sums, kc, pos, chunk)
    return kc, vc, sums


def check_all_positions(lengths, chunk, topk, hq, hkv, d=8, seed=0, repeat_keys=False, scale=None):
    rows = make_rows(lengths, hq, hkv, d, seed)
    if repeat_keys:
        rows = tie_keys(rows, chunk)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.cat([r[i] for r in rows]) for i in range(3))
    ref = moba_attn_varlen(q, k, v, cu, max(lengths), chunk, topk, softmax_scale=scale)
    dense = moba_attn_varlen_reference(q, k, v, cu, chunk, topk, softmax_scale=scale)
    lmax = max(lengths) + 3  # capacity beyond the longest row, and not a multiple of chunk
    kc, vc, sums = cache_of(rows, lmax, chunk)
    for t in range(max(lengths)):
        # Every row decodes position min(t, len - 1): rows of different lengths in one batch.
        pos = [min(t, n - 1) for n in lengths]
        qq = torch.stack([rows[b][0][p] for b, p in enumerate(pos)])
        seqlens = torch.tensor([p + 1 for p in pos], dtype=torch.int32)
        out = moba_decode(qq, kc, vc, seqlens, sums, chunk, topk, softmax_scale=scale)
        assert out.shape == qq.shape and out.dtype == qq.dtype
        for b, p in enumerate(pos):
            row = int(cu[b]) + p
            err = (out[b] - ref[row]).abs().max().item()
            err_dense = (out[b] - dense[row]).abs().max().item()
            assert err <= TOL and err_dense <= TOL, (b, p, err, err_dense)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("chunk,topk", [(4, 3), (3, 2), (5, 4), (4, 1)])
def test_decode_equals_training_rows(hq, hkv, chunk, topk):
    # Lengths 37 and 23 with topk * chunk < 37: the gate chooses; 1: a lone token; 6: a
    # partial second block.
    check_all_positions([37, 23, 1, 6], chunk, topk, hq, hkv, seed=chunk * 10 + topk)


@pytest.mark.parametrize("chunk,topk", [(8, 5), (16, 3)])
def test_decode_when_topk_covers_the_length(chunk, topk):
    # topk * chunk >= every length: the training path runs full causal attention.
    check_all_positions([29, 12], chunk, topk, 4, 2, seed=3)


def test_decode_softmax_scale():
    check_all_positions([20, 9], 4, 2, 4, 2, seed=5, scale=0.3)


def test_decode_ties_go_to_the_lower_block():
    lengths, chunk, topk = [26, 19], 3, 3
    check_all_positions(lengths, chunk, topk, 4, 2, seed=7, repeat_keys=True)
    rows = tie_keys(make_rows(lengths, 4, 2, 8, seed=7), chunk)
    kc, vc, sums = cache_of(rows, 26, chunk)
    own = torch.tensor([25 // chunk, 18 // chunk])
    q = torch.stack([rows[0][0][25], rows[1][0][18]])
    sel = decode_selection(q, sums, own, chunk, topk)
    # Every past block ties: the topk - 1 lowest blocks win, for every head.
    assert (sel.sort(-1).values == torch.arange(topk - 1)).all()
    # The dense reference's stable sort agrees.
    ref = moba_selection_reference(rows[0][0], rows[0][1], chunk, topk)[:, 25, :own[0]]
    assert (ref.nonzero()[:, 1].view(4, -1) == torch.arange(topk - 1)).all()


def test_decode_float32_matches_training():
    lengths, chunk, topk = [33, 17], 4, 3
    rows = [tuple(t.float() for t in r) for r in make_rows(lengths, 4, 2, 16, seed=11)]
    cu = torch.tensor([0, 33, 50], dtype=torch.int32)
    q, k, v = (torch.cat([r[i] for r in rows]) for i in range(3))
    ref = moba_attn_varlen(q, k, v, cu, 33, chunk, topk)
    kc = torch.zeros(2, 40, 2, 16)
    vc = torch.zeros_like(kc)
    pos = torch.full((2, 40), -1, dtype=torch.int64)
    for b, (_, kk, vv) in enumerate(rows):
        kc[b, :kk.shape[0]], vc[b, :kk.shape[0]] = kk, vv
        pos[b, :kk.shape[0]] = torch.arange(kk.shape[0])
    sums = torch.zeros(2, 10, 2, 16, dtype=torch.float64)
    update_block_sums(sums, kc, pos, chunk)
    out = moba_decode(torch.stack([rows[0][0][32], rows[1][0][16]]), kc, vc,
                      torch.tensor([33, 17], dtype=torch.int32), sums, chunk, topk)
    assert out.dtype == torch.float32
    assert (out[0] - ref[32]).abs().max() < 1e-5 and (out[1] - ref[49]).abs().max() < 1e-5


def test_update_block_sums_incremental_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    k = torch.randn(2, 20, 2, 4, generator=g).to(torch.bfloat16)
    one = torch.zeros(2, 5, 2, 4, dtype=torch.float64)
    pos = torch.arange(20).expand(2, 20).clone()
    pos[1, 15:] = -1  # padding
    update_block_sums(one, k, pos, 4)
    inc = torch.zeros_like(one)
    for s in range(0, 20, 3):
        update_block_sums(inc, k[:, s:s + 3], pos[:, s:s + 3], 4)
    assert torch.equal(one, inc)
    expect = k.double().view(2, 5, 4, 2, 4).sum(2)
    expect[1, 3:] = 0
    expect[1, 3] = k[1, 12:15].double().sum(0)
    assert torch.equal(one, expect)


def test_decode_rejects_bad_inputs():
    q = torch.randn(1, 4, 8, dtype=torch.float64)
    kc = torch.zeros(1, 8, 2, 8, dtype=torch.float64)
    sums = torch.zeros(1, 2, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError):
        moba_decode(q, kc, kc, torch.tensor([0], dtype=torch.int32), sums, 4, 2)
    with pytest.raises(TypeError):
        moba_decode(q, kc, kc, torch.tensor([3], dtype=torch.int32), sums.float(), 4, 2)
    with pytest.raises(ValueError):
        moba_decode(q, kc[:, :, :1].expand(1, 8, 3, 8), kc, torch.tensor([3], dtype=torch.int32), sums, 4, 2)
