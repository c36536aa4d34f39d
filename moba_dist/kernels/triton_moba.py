"""Attention of (query, head) pairs over their selected key segments, in Triton (gather-and-densify).

The selected part of MoBA: every query head reads ``topk - 1`` past blocks, each a different set
for each (query, head), so query tiles have almost nothing in common. The work is regrouped by key
segment instead: all (query, head) pairs that selected a segment form dense tiles of
``BLOCK_M`` gathered query rows against that segment's keys, read once per tile straight from the
pool (no copy of queries or keys). Query heads of one kv head share segments, so GQA needs no
repeated K/V.

Index format (all on the device; nothing is synchronised with the host):

  * ``k_pool, v_pool``: ``[R, D]`` row-strided views (e.g. ``pool[:, 0]`` and ``pool[:, 1]`` of a
    head-major ``[R, 2, D]`` pool). A row belongs to one kv head; the caller lays pools out so
    that each key segment is a contiguous run of rows.
  * ``seg_start [nseg]`` int64, ``seg_len [nseg]`` int32: segment ``g`` is pool rows
    ``[seg_start[g], seg_start[g] + seg_len[g])``, ``seg_len[g] <= chunk`` (a host int).
    Or, with ``seg_offset [nseg]`` int64, the ``seg_len[g]`` rows of stride ``k_pool.stride(0)``
    that begin ``seg_offset[g]`` elements after ``k_pool``'s (and ``v_pool``'s) first element:
    segments of different heads of a token-major ``k [n, Hkv, D]`` are then read in place
    (``k_pool = k[:, 0]``, offset ``t * k.stride(0) + g * k.stride(1)``), no head-major copy.
    Segments may overlap (e.g. a block and a prefix of it).
  * ``sel [n, Hq, S]`` int32: the segments (query ``i``, head ``h``) attends to, ``-1`` for
    none (or, with ``head_offset [Hq]``, ids that become ``sel + head_offset[h]`` where
    ``sel >= 0``, mapped one query window at a time: no full-size copy of the ids);
    none; a segment must hold keys of kv head ``h // (Hq // Hkv)`` (the kernel does not check).
    Slot order is free; a segment listed twice in one row would be counted twice.

Results: the selected part's output and log-sum-exp per (query, head), merged by LSE with the
query's own block either here (``self_out``/``self_lse``: one pass) or by the caller
(``kernels.merge_lse``). Each (query, head, slot) pair gets its own partial result ``(o, lse)``,
and one pass merges a row's slots in a fixed order, so every number is reproducible bit for bit
for the same inputs and configuration (no atomics anywhere; permuting slots or changing the query
windows only changes rounding). Backward takes the *merged* final output and LSE of each row
(see ``kernels/base.py``) and returns ``dq`` and the key/value gradients of every segment row,
segment-major by default (rows ``[grad_start[g], grad_start[g] + seg_len[g])``, ``grad_start`` the
exclusive cumsum of ``seg_len``); a caller whose segments are disjoint may pass
``grad_start=seg_start`` to receive them in pool rows directly.

Pairs are processed in windows of consecutive queries so the partial buffers stay within
``max_partial_bytes``.

Use: ``core.py`` runs MoBA's selected part here for chunk <= 512 on CUDA (bf16/fp16; see
``core.use_fused_selected``). Tested against dense float64 references in Triton's CPU interpreter
(CI) and on GPU (``-m gpu``); launch parameters measured with ``scripts/dev/tune_triton_moba.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import triton

from .triton_decode import _bf16_rne
from .triton_version import require_triton

require_triton(triton.__version__)

import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class SelConfig:
    """Launch parameters (speed and memory only; results do not depend on the windows, and on
    the tile sizes only through floating-point summation order of the dot products)."""

    block_m: int = 64  # gathered (query, head) rows per tile
    block_n: int = 64  # keys per inner step
    num_warps: int = 4
    num_stages: int = 2
    bwd_block_m: int = 32
    bwd_block_n: int = 128  # keys per backward program (a larger segment is split)
    bwd_num_warps: int = 8
    # Segments of at most this many backward key runs get dq from the dk/dv kernel (one dq part
    # per run); longer ones from a separate dq kernel (one part, attention recomputed).
    fused_dq_runs: int = 2
    partial_dtype: torch.dtype = torch.float32
    max_partial_bytes: int = 6 << 30


DEFAULT_CONFIG = SelConfig()  # what the pipeline uses (scripts/dev/tune_triton_moba.py measures others)


@dataclass(frozen=True)
class PairPlan:
    """Pairs of one window of queries grouped by segment (device tensors; ``max_tiles`` host).

    ``order [m * Hq * S]`` int32 lists pair ids ``(i * Hq + h) * S + s`` (``i`` local to the
    window) by segment, stably, unselected ones last; the pairs of segment ``g`` are
    ``order[seg_pairs[g]:seg_pairs[g + 1]]`` and its tiles of ``block_m`` are numbered
    ``[seg_tiles[g], seg_tiles[g + 1])``. ``heavy_first`` lists segments by descending pair count.
    """

    order: torch.Tensor
    seg_pairs: torch.Tensor
    seg_tiles: torch.Tensor
    heavy_first: torch.Tensor
    max_tiles: int
    block_m: int


def plan_pairs(sel: torch.Tensor, num_segments: int, block_m: int) -> PairPlan:
    """Group the pairs of ``sel [m, Hq, S]`` by segment (one stable device sort; the segment
    bounds by binary search in the sorted keys, no count of the data)."""
    # Segment ids fit 16 bits up to 32766 segments: a radix sort then makes half the passes.
    kdtype = torch.int16 if num_segments < 2**15 - 1 else torch.int32
    key = torch.where(sel >= 0, sel, num_segments).flatten().to(kdtype)
    sorted_key, order = torch.sort(key, stable=True)
    # seg_pairs[g] = pairs with a segment below g. (Not bincount: it sizes its output from the
    # data, a host sync on CUDA; nor a scatter_add of ones, millions of atomics on few counters.)
    bounds = torch.arange(num_segments + 1, dtype=kdtype, device=sel.device)
    seg_pairs = torch.searchsorted(sorted_key, bounds, out_int32=True)
    del sorted_key
    counts = seg_pairs.diff().long()
    tiles = (counts + block_m - 1) // block_m
    seg_tiles = torch.cat([counts.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)
    heavy_first = torch.argsort(counts, descending=True, stable=True).to(torch.int32)
    return PairPlan(order.to(torch.int32), seg_pairs, seg_tiles, heavy_first,
                    triton.cdiv(key.numel(), block_m) + num_segments, block_m)


@triton.jit
def _find_segment(seg_tiles_ptr, t, n_seg, LOG_SEG: tl.constexpr):
    """Largest ``g`` in ``[0, n_seg)`` with ``seg_tiles[g] <= t`` (binary search)."""
    lo = t * 0
    hi = lo + n_seg
    for _ in tl.static_range(LOG_SEG):
        mid = (lo + hi) // 2
        go_right = tl.load(seg_tiles_ptr + mid) <= t
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    return lo


@triton.jit
def _gather_tile(order_ptr, seg_pairs_ptr, seg_tiles_ptr, t, n_seg,
                 HQ: tl.constexpr, S: tl.constexpr, LOG_SEG: tl.constexpr, BLOCK_M: tl.constexpr):
    """The segment of pair tile ``t`` and its pairs: ``(seg, pair_id, query, head, valid)``."""
    seg = _find_segment(seg_tiles_ptr, t, n_seg, LOG_SEG)
    live = t < tl.load(seg_tiles_ptr + n_seg)
    p0 = tl.load(seg_pairs_ptr + seg) + (t - tl.load(seg_tiles_ptr + seg)) * BLOCK_M
    p1 = tl.load(seg_pairs_ptr + seg + 1)
    offs = p0 + tl.arange(0, BLOCK_M)
    # offs >= p0, so a dead tile is all invalid. (Not ``(offs < p1) & live``: Triton 3.9's
    # interpreter gives int32, not a mask, for a block & a scalar bool.)
    valid = offs < tl.where(live, p1, p0)
    pid = tl.load(order_ptr + offs, mask=valid, other=0)
    row = pid // S
    return seg, pid, row // HQ, row % HQ, valid


@triton.jit
def _sel_fwd_step(q, k_ptr, v_ptr, k_off, k_len, j0, m_i, l_i, acc, stride_k, stride_v, qk_scale,
                  D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """Online-softmax update of a tile of gathered rows with keys ``[j0, j0 + BLOCK_N)``."""
    d = tl.arange(0, DP)
    dm = d < D
    kr = j0 + tl.arange(0, BLOCK_N)
    km = kr < k_len
    kr64 = kr.to(tl.int64)
    k = tl.load(k_ptr + k_off + kr64[:, None] * stride_k + d[None, :], mask=km[:, None] & dm[None, :],
                other=0.0)
    v = tl.load(v_ptr + k_off + kr64[:, None] * stride_v + d[None, :], mask=km[:, None] & dm[None, :],
                other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(km[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _sel_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    order_ptr, seg_pairs_ptr, seg_tiles_ptr, seg_off_ptr, seg_len_ptr,
    n_seg, stride_qn, stride_qh, stride_k, stride_v, qk_scale,
    HQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    LOG_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
):
    t = tl.program_id(0)
    seg, pid, qi, qh, valid = _gather_tile(order_ptr, seg_pairs_ptr, seg_tiles_ptr, t, n_seg,
                                           HQ, S, LOG_SEG, BLOCK_M)
    d = tl.arange(0, DP)
    dm = d < D
    q = tl.load(q_ptr + qi.to(tl.int64)[:, None] * stride_qn + qh[:, None] * stride_qh + d[None, :],
                mask=valid[:, None] & dm[None, :], other=0.0)
    k_off = tl.load(seg_off_ptr + seg)
    # A program past the last tile (the grid is a host bound) skips the key loop.
    k_len = tl.where(tl.max(valid.to(tl.int32), 0) > 0, tl.load(seg_len_ptr + seg), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DP], tl.float32)
    if WHILE_LOOPS:
        j0 = k_len * 0
        while j0 < k_len:
            m_i, l_i, acc = _sel_fwd_step(q, k_ptr, v_ptr, k_off, k_len, j0, m_i, l_i, acc,
                                          stride_k, stride_v, qk_scale, D, DP, BLOCK_N, IEEE)
            j0 += BLOCK_N
    else:
        for j0 in range(0, k_len, BLOCK_N):
            m_i, l_i, acc = _sel_fwd_step(q, k_ptr, v_ptr, k_off, k_len, j0, m_i, l_i, acc,
                                          stride_k, stride_v, qk_scale, D, DP, BLOCK_N, IEEE)
    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    pid64 = pid.to(tl.int64)
    tl.store(o_ptr + pid64[:, None] * D + d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=valid[:, None] & dm[None, :])
    tl.store(lse_ptr + pid64, lse, mask=valid)


@triton.jit
def _sel_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
    order_ptr, seg_pairs_ptr, heavy_ptr, seg_off_ptr, seg_len_ptr, grad_start_ptr,
    n, stride_qn, stride_qh, stride_don, stride_doh, stride_k, stride_v, sm_scale,
    HQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, NSUB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
):
    """One program per (segment, run of ``BLOCK_N`` keys): ``dk, dv`` of those keys over every
    pair of the segment and, with ``COMPUTE_DQ``, each pair's ``dq`` contribution from them
    (part ``sub`` of the pair's ``NSUB`` parts in ``dq_part``)."""
    seg = tl.load(heavy_ptr + tl.program_id(0))
    sub = tl.program_id(1)
    d = tl.arange(0, DP)
    dm = d < D
    k_len = tl.load(seg_len_ptr + seg)
    kr = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    km = kr < k_len
    k_off = tl.load(seg_off_ptr + seg)
    kr64 = kr.to(tl.int64)
    kvm = km[:, None] & dm[None, :]
    k = tl.load(k_ptr + k_off + kr64[:, None] * stride_k + d[None, :], mask=kvm, other=0.0)
    v = tl.load(v_ptr + k_off + kr64[:, None] * stride_v + d[None, :], mask=kvm, other=0.0)
    dk = tl.zeros([BLOCK_N, DP], tl.float32)
    dv = tl.zeros([BLOCK_N, DP], tl.float32)
    p0 = tl.load(seg_pairs_ptr + seg)
    p1 = tl.load(seg_pairs_ptr + seg + 1)
    if sub * BLOCK_N < k_len:
        if WHILE_LOOPS:
            a = p0
            while a < p1:
                dk, dv = _sel_bwd_tile(q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, order_ptr, a, p1, n, sub,
                                       k, v, km, dk, dv, stride_qn, stride_qh, stride_don, stride_doh,
                                       sm_scale, HQ, S, D, DP, NSUB, BLOCK_M, IEEE, COMPUTE_DQ)
                a += BLOCK_M
        else:
            for a in range(p0, p1, BLOCK_M):
                dk, dv = _sel_bwd_tile(q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, order_ptr, a, p1, n, sub,
                                       k, v, km, dk, dv, stride_qn, stride_qh, stride_don, stride_doh,
                                       sm_scale, HQ, S, D, DP, NSUB, BLOCK_M, IEEE, COMPUTE_DQ)
    # Each gradient row has one owner program; windows of queries add up in launch order.
    grows = (tl.load(grad_start_ptr + seg) + kr).to(tl.int64)
    dk_ptrs = dk_ptr + grows[:, None] * D + d[None, :]
    dv_ptrs = dv_ptr + grows[:, None] * D + d[None, :]
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=kvm, other=0.0) + dk * sm_scale, mask=kvm)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=kvm, other=0.0) + dv, mask=kvm)


@triton.jit
def _sel_bwd_tile(q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, order_ptr, a, p1, n, sub,
                  k, v, km, dk, dv, stride_qn, stride_qh, stride_don, stride_doh, sm_scale,
                  HQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                  NSUB: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
                  COMPUTE_DQ: tl.constexpr):
    offs = a + tl.arange(0, BLOCK_M)
    valid = offs < p1
    pid = tl.load(order_ptr + offs, mask=valid, other=0)
    row = pid // S
    qi = (row // HQ).to(tl.int64)
    qh = row % HQ
    d = tl.arange(0, DP)
    qm = valid[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + qi[:, None] * stride_qn + qh[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    do = tl.load(do_ptr + qi[:, None] * stride_don + qh[:, None] * stride_doh + d[None, :], mask=qm,
                 other=0.0)
    stat = qh.to(tl.int64) * n + qi  # lse and delta are [Hq, n]
    lse = tl.load(lse_ptr + stat, mask=valid, other=0.0)
    delta = tl.load(delta_ptr + stat, mask=valid, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    # Final-LSE probabilities; a row whose LSE is -inf saw no key at all and gets none here.
    p = tl.exp2((s * sm_scale - lse[:, None]) * 1.4426950408889634)
    p = tl.where(valid[:, None] & km[None, :] & (lse[:, None] > float("-inf")), p, 0.0)
    if IEEE:
        dv += tl.dot(tl.trans(p), do, input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    if IEEE:
        dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
    else:
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    if COMPUTE_DQ:
        if IEEE:
            dq = tl.dot(ds, k, input_precision="ieee") * sm_scale
        else:
            dq = tl.dot(ds.to(k.dtype), k) * sm_scale
        dq_off = (pid.to(tl.int64) * NSUB + sub) * D
        tl.store(dq_ptr + dq_off[:, None] + d[None, :], dq, mask=qm)
    return dk, dv


@triton.jit
def _sel_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    order_ptr, seg_pairs_ptr, seg_tiles_ptr, seg_off_ptr, seg_len_ptr,
    n_seg, n, stride_qn, stride_qh, stride_don, stride_doh, stride_k, stride_v, sm_scale,
    HQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, LOG_SEG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    """``dq`` of one tile of pairs over all keys of their segment (segments longer than the
    backward's key runs): one part per pair in ``dq_part``."""
    t = tl.program_id(0)
    seg, pid, qi, qh, valid = _gather_tile(order_ptr, seg_pairs_ptr, seg_tiles_ptr, t, n_seg,
                                           HQ, S, LOG_SEG, BLOCK_M)
    d = tl.arange(0, DP)
    qm = valid[:, None] & (d < D)[None, :]
    qi64 = qi.to(tl.int64)
    q = tl.load(q_ptr + qi64[:, None] * stride_qn + qh[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    do = tl.load(do_ptr + qi64[:, None] * stride_don + qh[:, None] * stride_doh + d[None, :], mask=qm,
                 other=0.0)
    stat = qh.to(tl.int64) * n + qi64
    lse = tl.load(lse_ptr + stat, mask=valid, other=float("-inf"))
    delta = tl.load(delta_ptr + stat, mask=valid, other=0.0)
    k_off = tl.load(seg_off_ptr + seg)
    # A program past the last tile (the grid is a host bound) skips the key loop.
    k_len = tl.where(tl.max(valid.to(tl.int32), 0) > 0, tl.load(seg_len_ptr + seg), 0)
    dq = tl.zeros([BLOCK_M, DP], tl.float32)
    if WHILE_LOOPS:
        j0 = k_len * 0
        while j0 < k_len:
            dq = _dq_step(q, do, lse, delta, dq, k_ptr, v_ptr, k_off, k_len, j0, stride_k, stride_v,
                          sm_scale, D, DP, BLOCK_N, IEEE)
            j0 += BLOCK_N
    else:
        for j0 in range(0, k_len, BLOCK_N):
            dq = _dq_step(q, do, lse, delta, dq, k_ptr, v_ptr, k_off, k_len, j0, stride_k, stride_v,
                          sm_scale, D, DP, BLOCK_N, IEEE)
    tl.store(dq_ptr + pid.to(tl.int64)[:, None] * D + d[None, :], dq * sm_scale, mask=qm)


@triton.jit
def _dq_step(q, do, lse, delta, dq, k_ptr, v_ptr, k_off, k_len, j0, stride_k, stride_v, sm_scale,
             D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    d = tl.arange(0, DP)
    kr = j0 + tl.arange(0, BLOCK_N)
    km = kr < k_len
    kr64 = kr.to(tl.int64)
    kvm = km[:, None] & (d < D)[None, :]
    k = tl.load(k_ptr + k_off + kr64[:, None] * stride_k + d[None, :], mask=kvm, other=0.0)
    v = tl.load(v_ptr + k_off + kr64[:, None] * stride_v + d[None, :], mask=kvm, other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
        dp = tl.dot(do, tl.trans(v))
    p = tl.exp2((s * sm_scale - lse[:, None]) * 1.4426950408889634)
    p = tl.where(km[None, :] & (lse[:, None] > float("-inf")), p, 0.0)
    ds = p * (dp - delta[:, None])
    if IEEE:
        dq += tl.dot(ds, k, input_precision="ieee")
    else:
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _dq_sum_kernel(dq_part_ptr, sel_ptr, seg_len_ptr, base_ptr, dq_ptr, rows, S: tl.constexpr,
                   P: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, HAS_BASE: tl.constexpr):
    """``dq`` of ``BLOCK_R`` rows ``i * Hq + h``: the sum of their selected slots' parts, in slot
    then part order (a fixed order: deterministic), plus the row of ``base`` (another key set's
    ``dq``) when given, rounded once to ``dq``'s dtype. Parts that were never written (unselected
    slots; key runs ``p`` past a short segment's end) are not read."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = r < rows
    d = tl.arange(0, DP)
    dm = d < D
    acc = tl.zeros([BLOCK_R, DP], tl.float32)
    for s in tl.static_range(S):
        g = tl.load(sel_ptr + r * S + s, mask=rm, other=-1)
        live = rm & (g >= 0)
        if P > 1:  # one part per slot: every selected slot has it (no length to look up)
            g_len = tl.load(seg_len_ptr + g, mask=live, other=0)
        for p in tl.static_range(P):
            part = live if P == 1 else live & (p * BLOCK_N < g_len)
            acc += tl.load(dq_part_ptr + ((r * S + s) * P + p)[:, None] * D + d[None, :],
                           mask=part[:, None] & dm[None, :], other=0.0)
    if HAS_BASE:
        acc += tl.load(base_ptr + r[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :],
                       other=0.0).to(tl.float32)
    tl.store(dq_ptr + r[:, None] * D + d[None, :], acc.to(dq_ptr.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])


@triton.jit
def _row_tile(rows, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` flat rows ``i * H + h`` (of ``rows``) of an ``[n, H, D]``
    tensor: ``(i, h, d, row mask, [BLOCK_R, DP] mask)``, indices int64."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rm = r < rows
    d = tl.arange(0, DP)
    return r // H, r % H, d, rm, rm[:, None] & (d < D)[None, :]


@triton.jit
def _delta_kernel(do_ptr, o_ptr, delta_ptr, rows, n, stride_don, stride_doh, stride_on, stride_oh,
                  HQ: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr):
    """``delta[h, i] = sum_d dout[i, h, d] * out[i, h, d]`` in float32 for ``BLOCK_R`` rows
    ``i * Hq + h`` (FlashAttention's ``rowsum(dO * O)``; one pass over both, no float32 copies)."""
    i, h, d, rm, m = _row_tile(rows, HQ, D, DP, BLOCK_R)
    do = tl.load(do_ptr + (i * stride_don + h * stride_doh)[:, None] + d[None, :], mask=m, other=0.0)
    o = tl.load(o_ptr + (i * stride_on + h * stride_oh)[:, None] + d[None, :], mask=m, other=0.0)
    tl.store(delta_ptr + h * n + i, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=rm)


def row_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``[Hq, n]`` float32 ``sum(dout * out, -1)`` of ``[n, Hq, D]`` tensors (any float dtypes),
    the products and their sum in float32."""
    n, hq, d = out.shape
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    delta = torch.empty(hq, n, dtype=torch.float32, device=out.device)
    if n:
        block_r = 64
        _delta_kernel[(triton.cdiv(n * hq, block_r),)](
            dout, out, delta, n * hq, n, dout.stride(0), dout.stride(1), out.stride(0), out.stride(1),
            HQ=hq, D=d, DP=max(16, _next_pow2(d)), BLOCK_R=block_r, num_warps=4)
    return delta


@triton.jit
def _add_head_major_kernel(dst_ptr, src_ptr, rows, n, stride_dn, stride_dh, HKV: tl.constexpr,
                           D: tl.constexpr, DP: tl.constexpr, BLOCK_R: tl.constexpr,
                           BF16: tl.constexpr, INTERPRETED: tl.constexpr):
    """``dst[i, h] += src[h * n + i]`` for ``BLOCK_R`` rows ``i * Hkv + h`` of ``dst``, the sum
    in float32 and rounded once to ``dst``'s dtype (to nearest even, also in the interpreter)."""
    i, h, d, _, m = _row_tile(rows, HKV, D, DP, BLOCK_R)
    dst = dst_ptr + (i * stride_dn + h * stride_dh)[:, None] + d[None, :]
    acc = tl.load(dst, mask=m, other=0.0).to(tl.float32)
    acc += tl.load(src_ptr + (h * n + i)[:, None] * D + d[None, :], mask=m, other=0.0).to(tl.float32)
    if BF16:
        acc = _bf16_rne(acc, INTERPRETED)
    tl.store(dst, acc.to(dst_ptr.dtype.element_ty), mask=m)


def add_head_major_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst [n, Hkv, D] += src`` where ``src [Hkv * n, D]`` is head-major (row ``h * n + i``),
    in place, as ``dst.add_(src.view(Hkv, n, D).transpose(0, 1))`` computes it (float32 sum, one
    rounding) but in one pass of coalesced rows: PyTorch's mixed-dtype add over the transposed
    float32 rows took about 6 ms per 1M x 4 x 128 tensor on an H100 (2 x 512K, 128/8, profile);
    this pass moves 4 GB, about 1.5 ms at HBM speed (not yet measured on a GPU)."""
    n, hkv, d = dst.shape
    if src.shape != (hkv * n, d) or dst.stride(-1) != 1:
        raise ValueError(f"add_head_major_: dst {tuple(dst.shape)} (unit-stride rows), src "
                         f"{tuple(src.shape)}: expected src [{hkv * n}, {d}]")
    src = src if src.is_contiguous() else src.contiguous()
    if n:
        block_r = 32
        _add_head_major_kernel[(triton.cdiv(n * hkv, block_r),)](
            dst, src, n * hkv, n, dst.stride(0), dst.stride(1), HKV=hkv, D=d,
            DP=max(16, _next_pow2(d)), BLOCK_R=block_r, BF16=dst.dtype == torch.bfloat16,
            INTERPRETED=dst.device.type == "cpu", num_warps=4)
    return dst


@triton.jit
def _merge_kernel(
    o_part_ptr, lse_part_ptr, self_o_ptr, self_lse_ptr, out_ptr, lse_ptr,
    rows, n, row0, stride_so_r,
    HQ: tl.constexpr, S: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_SELF: tl.constexpr,
):
    """LSE merge of ``S`` slot partials (and the self part) of ``BLOCK_R`` rows ``i * Hq + h``
    (local to the window starting at row ``row0``), in slot order then the self part: each
    partial is read once; empty slots (``lse = -inf``) are not read at all. Slots are a loop
    of ``[BLOCK_R, D]`` tiles (a 3-D tile summed over its slot axis crossed warps: shared-memory
    round trips per program)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < rows
    d = tl.arange(0, DP)
    dm = d < D
    r64 = r.to(tl.int64)
    g = r64 + row0  # global row i * Hq + h
    stat = (g % HQ) * n + g // HQ  # lse is [Hq, n]
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in tl.static_range(S):
        m = tl.maximum(m, tl.load(lse_part_ptr + r64 * S + s, mask=rm, other=float("-inf")))
    if HAS_SELF:
        lse_self = tl.load(self_lse_ptr + stat, mask=rm, other=float("-inf"))
        m = tl.maximum(m, lse_self)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BLOCK_R, DP], tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    for s in tl.static_range(S):
        x = tl.load(lse_part_ptr + r64 * S + s, mask=rm, other=float("-inf"))
        w = tl.exp(x - m_safe)
        o = tl.load(o_part_ptr + (r64 * S + s)[:, None] * D + d[None, :],
                    mask=(x > float("-inf"))[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc += o * w[:, None]
        denom += w
    if HAS_SELF:
        w_self = tl.exp(lse_self - m_safe)
        o_self = tl.load(self_o_ptr + g[:, None] * stride_so_r + d[None, :],
                         mask=rm[:, None] & dm[None, :] & (lse_self > float("-inf"))[:, None],
                         other=0.0).to(tl.float32)
        acc += o_self * w_self[:, None]
        denom += w_self
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + g[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])
    safe = tl.where(denom > 0, denom, 1.0)
    tl.store(lse_ptr + stat, tl.where(denom > 0, m_safe + tl.log(safe), float("-inf")), mask=rm)


def _check(q, k_pool, v_pool, seg_start, seg_len, sel, chunk):
    if q.dim() != 3 or sel.dim() != 3 or sel.shape[:2] != q.shape[:2]:
        raise ValueError(f"sel: expected [n, Hq, S] for q {tuple(q.shape)}, got {tuple(sel.shape)}")
    d = q.shape[-1]
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 2 or t.shape[-1] != d or t.stride(-1) != 1:
            raise ValueError(f"{name}: expected [R, {d}] with contiguous rows, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"q: expected bfloat16, float16 or float32, got {q.dtype}")
    if seg_start.shape != seg_len.shape or seg_start.dim() != 1:
        raise ValueError("seg_start, seg_len: expected two [nseg] tensors")
    if k_pool.stride(0) != v_pool.stride(0):
        raise ValueError(f"k_pool, v_pool: row strides differ ({k_pool.stride(0)}, {v_pool.stride(0)}); "
                         "the kernels address both with one offset per segment")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if q.device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(f"q: on {q.device}; the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1")


def _tiles_for(q: torch.Tensor, cfg: SelConfig) -> SelConfig:
    """float32 on CUDA runs its dots on CUDA cores (exact fp32, no TF32), whose operands must
    fit in registers: small tiles. (A correctness path; bf16/fp16 is the fast one.)"""
    if q.dtype == torch.float32 and q.device.type == "cuda":
        return replace(cfg, block_m=32, block_n=32, num_warps=8, bwd_block_m=16, bwd_block_n=32,
                       bwd_num_warps=8)
    return cfg


def _windows(n: int, hq: int, slots: int, d: int, per_pair_bytes: int, budget: int):
    per_query = max(1, hq * slots * d * per_pair_bytes)
    step = max(1, min(n, budget // per_query))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _offsets(seg_start: torch.Tensor, seg_offset: torch.Tensor | None, k_pool: torch.Tensor) -> torch.Tensor:
    """int64 element offsets of every segment's first key from ``k_pool``'s first element."""
    if seg_offset is not None:
        if seg_offset.shape != seg_start.shape:
            raise ValueError(f"seg_offset: expected {tuple(seg_start.shape)}, got {tuple(seg_offset.shape)}")
        return seg_offset.to(torch.int64).contiguous()
    return (seg_start.to(torch.int64) * k_pool.stride(0)).contiguous()


def _window_ids(sel: torch.Tensor, a: int, b: int, head_offset: torch.Tensor | None) -> torch.Tensor:
    """Segment ids of queries ``[a, b)``: ``sel[a:b]``, or with ``head_offset`` the ids it maps to."""
    if head_offset is None:
        return sel[a:b]
    w = sel[a:b]
    return torch.where(w >= 0, w + head_offset.view(1, -1, 1).to(w.dtype), -1).to(torch.int32)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def selected_attn_fwd(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                      seg_start: torch.Tensor, seg_len: torch.Tensor, sel: torch.Tensor,
                      chunk: int, softmax_scale: float | None = None, *,
                      self_out: torch.Tensor | None = None, self_lse: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.float32,
                      config: SelConfig | None = None, in_place: bool = False,
                      seg_offset: torch.Tensor | None = None, head_offset: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of every (query, head) over the union of its selected segments,
    optionally merged with another key set's result (the query's own block).

    Args:
        q: ``[n, Hq, D]``; k_pool, v_pool: ``[R, D]`` (q's dtype); seg_start, seg_len, sel: the
            index format of the module docstring; chunk: host bound on ``seg_len``.
        softmax_scale: default ``D ** -0.5``.
        self_out, self_lse: optional ``[n, Hq, D]`` (any float dtype) and ``[Hq, n]`` float32
            result over a disjoint key set, folded into the same merge pass.
        out_dtype: dtype of the returned output.
        in_place: write the result over ``self_out, self_lse`` when their dtypes and layouts
            allow (saves an ``[n, Hq, D]`` output; the self part is consumed).
        seg_offset: optional int64 ``[nseg]`` element offsets of the segments (module
            docstring); default ``seg_start * k_pool.stride(0)``.
        head_offset: optional int ``[Hq]`` added to the non-negative ids of each head's slots
            (module docstring).

    Returns:
        ``out [n, Hq, D]`` and ``lse [Hq, n]`` float32 (natural log; ``-inf`` and output 0 for a
        row that sees no key).
    """
    _check(q, k_pool, v_pool, seg_start, seg_len, sel, chunk)
    cfg = _tiles_for(q, config or DEFAULT_CONFIG)
    n, hq, d = q.shape
    slots = sel.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    if (self_out is None) != (self_lse is None):
        raise ValueError("self_out, self_lse: pass both or neither")
    has_self = self_out is not None
    if has_self and (self_out.shape != q.shape or self_lse.shape != (hq, n)):
        raise ValueError(f"self_out, self_lse: expected {tuple(q.shape)} and {(hq, n)}, got "
                         f"{tuple(self_out.shape)} and {tuple(self_lse.shape)}")
    if in_place and has_self and self_out.dtype == out_dtype and self_out.is_contiguous() \
            and self_lse.dtype == torch.float32 and self_lse.is_contiguous():
        # Each merge program reads its rows of the self part before writing the same rows.
        out, lse = self_out, self_lse
    else:
        out = torch.empty(n, hq, d, dtype=out_dtype, device=q.device)
        lse = torch.empty(hq, n, dtype=torch.float32, device=q.device)
    if n == 0:
        return out, lse
    nseg = seg_start.numel()
    if slots == 0 or nseg == 0:
        slots = 0  # nothing selected: the merge below only copies the self part
    part_bytes = torch.empty(0, dtype=cfg.partial_dtype).element_size()
    seg_off = _offsets(seg_start, seg_offset, k_pool)
    seg_len = seg_len.to(torch.int32).contiguous()
    if has_self:
        self_out = self_out if self_out.stride(-1) == 1 and self_out.stride(0) == hq * self_out.stride(1) \
            else self_out.contiguous()
        self_lse = self_lse.float().contiguous()
    block_n = min(cfg.block_n, max(16, _next_pow2(chunk)))
    dp = max(16, _next_pow2(d))
    for a, b in _windows(n, hq, max(slots, 1), d, part_bytes, cfg.max_partial_bytes):
        m = b - a
        o_part = torch.empty(m * hq * max(slots, 1), d, dtype=cfg.partial_dtype, device=q.device)
        lse_part = torch.full((m * hq * max(slots, 1),), float("-inf"), dtype=torch.float32,
                              device=q.device)
        if slots:
            plan = plan_pairs(_window_ids(sel, a, b, head_offset), nseg, cfg.block_m)
            qw = q[a:b]
            _sel_fwd_kernel[(plan.max_tiles,)](
                qw, k_pool, v_pool, o_part, lse_part,
                plan.order, plan.seg_pairs, plan.seg_tiles, seg_off, seg_len,
                nseg, qw.stride(0), qw.stride(1), k_pool.stride(0), v_pool.stride(0), scale * _LOG2E,
                HQ=hq, S=slots, D=d, DP=dp, LOG_SEG=max(1, math.ceil(math.log2(nseg + 1))),
                BLOCK_M=cfg.block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
                WHILE_LOOPS=q.device.type == "cpu", num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        block_r = 16
        _merge_kernel[(triton.cdiv(m * hq, block_r),)](
            o_part, lse_part, self_out if has_self else o_part, self_lse if has_self else lse_part,
            out, lse, m * hq, n, a * hq, self_out.stride(1) if has_self else 0,
            HQ=hq, S=max(slots, 1), D=d, DP=dp, BLOCK_R=block_r, HAS_SELF=has_self,
            num_warps=8,
        )
        del o_part, lse_part  # before the next window's: one window's partials alive at a time
    return out, lse


def selected_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k_pool: torch.Tensor,
                      v_pool: torch.Tensor, seg_start: torch.Tensor, seg_len: torch.Tensor,
                      sel: torch.Tensor, chunk: int, out: torch.Tensor, lse: torch.Tensor,
                      softmax_scale: float | None = None, *, grad_start: torch.Tensor | None = None,
                      grad_rows: int | None = None, config: SelConfig | None = None,
                      dq_base: torch.Tensor | None = None, dq_dtype: torch.dtype = torch.float32,
                      seg_offset: torch.Tensor | None = None, head_offset: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the selected part given the row's *final* ``out [n, Hq, D]`` and
    ``lse [Hq, n]`` (after merging with every other key set of the row).

    Args:
        grad_start, grad_rows: where segment ``g``'s key/value gradients go: rows
            ``[grad_start[g], grad_start[g] + seg_len[g])`` of ``[grad_rows, D]`` outputs; these
            ranges must not overlap. Default: segment-major, ``grad_start`` the exclusive cumsum
            of ``seg_len`` and ``grad_rows`` its total (one host sync for the size; pass
            ``grad_rows`` to avoid it). ``grad_start=seg_start, grad_rows=R`` gives pool rows
            when segments are disjoint.

        dq_base: optional ``[n, Hq, D]`` gradient of another key set of the same rows (the own
            block), added to ``dq`` in the same pass (no float32 copy of either).
        dq_dtype: dtype of the returned ``dq`` (one rounding of the float32 sum).
        seg_offset: as in :func:`selected_attn_fwd` (reading only; gradients go by ``grad_start``).
        head_offset: as in :func:`selected_attn_fwd`.

    Returns ``dq [n, Hq, D]`` (``dq_dtype``) and ``dk, dv [grad_rows, D]`` float32 (rows outside
    every range get 0). Scratch: ``delta`` and the per-pair ``dq`` parts, in windows of
    ``config.max_partial_bytes``. Deterministic: per-pair ``dq`` parts summed in slot order;
    each ``dk, dv`` row accumulated by one program (key runs of one segment), windows in launch
    order.
    """
    _check(q, k_pool, v_pool, seg_start, seg_len, sel, chunk)
    cfg = _tiles_for(q, config or DEFAULT_CONFIG)
    n, hq, d = q.shape
    slots = sel.shape[-1]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    seg_len = seg_len.to(torch.int32).contiguous()
    if grad_start is None:
        csum = torch.cumsum(seg_len.to(torch.int64), 0)
        grad_start = csum - seg_len
        if grad_rows is None:
            grad_rows = int(csum[-1]) if csum.numel() else 0
    elif grad_rows is None:
        raise ValueError("grad_rows: required with grad_start")
    grad_start = grad_start.to(torch.int64).contiguous()
    dq = torch.empty(n, hq, d, dtype=dq_dtype, device=q.device)
    dk = torch.zeros(grad_rows, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(grad_rows, d, dtype=torch.float32, device=q.device)
    nseg = seg_start.numel()
    if dq_base is not None:
        if dq_base.shape != q.shape:
            raise ValueError(f"dq_base: expected {tuple(q.shape)}, got {tuple(dq_base.shape)}")
        dq_base = dq_base.contiguous()
    if n == 0 or slots == 0 or nseg == 0:
        return (dq.copy_(dq_base) if dq_base is not None else dq.zero_()), dk, dv
    delta = row_delta(dout, out)  # rowsum(dO * O) of the final output, as in FlashAttention
    lse = lse.float().contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    seg_off = _offsets(seg_start, seg_offset, k_pool)
    block_n = min(cfg.bwd_block_n, max(16, _next_pow2(chunk)))
    nsub = triton.cdiv(chunk, block_n)
    fused_dq = nsub <= cfg.fused_dq_runs
    parts = nsub if fused_dq else 1
    dp = max(16, _next_pow2(d))
    for a, b in _windows(n, hq, slots * parts, d, 4, cfg.max_partial_bytes):
        m = b - a
        # Parts of unselected slots are never written, and never read (see _dq_sum_kernel).
        dq_part = torch.empty(m * hq * slots * parts, d, dtype=torch.float32, device=q.device)
        qw, dow = q[a:b], dout[a:b]
        lse_w, delta_w = lse[:, a:b].contiguous(), delta[:, a:b].contiguous()
        sel_w = _window_ids(sel, a, b, head_offset)
        plan = plan_pairs(sel_w, nseg, cfg.bwd_block_m)
        _sel_bwd_kernel[(nseg, nsub)](
            qw, k_pool, v_pool, dow, lse_w, delta_w, dq_part, dk, dv,
            plan.order, plan.seg_pairs, plan.heavy_first, seg_off, seg_len, grad_start,
            m, qw.stride(0), qw.stride(1), dow.stride(0), dow.stride(1),
            k_pool.stride(0), v_pool.stride(0), scale,
            HQ=hq, S=slots, D=d, DP=dp, NSUB=nsub, BLOCK_M=cfg.bwd_block_m, BLOCK_N=block_n,
            IEEE=q.dtype == torch.float32, WHILE_LOOPS=q.device.type == "cpu", COMPUTE_DQ=fused_dq,
            num_warps=cfg.bwd_num_warps,
        )
        if not fused_dq:
            dq_plan = plan_pairs(sel_w, nseg, cfg.block_m)
            _sel_bwd_dq_kernel[(dq_plan.max_tiles,)](
                qw, k_pool, v_pool, dow, lse_w, delta_w, dq_part,
                dq_plan.order, dq_plan.seg_pairs, dq_plan.seg_tiles, seg_off, seg_len,
                nseg, m, qw.stride(0), qw.stride(1), dow.stride(0), dow.stride(1),
                k_pool.stride(0), v_pool.stride(0), scale,
                HQ=hq, S=slots, D=d, DP=dp, LOG_SEG=max(1, math.ceil(math.log2(nseg + 1))),
                BLOCK_M=cfg.block_m, BLOCK_N=min(cfg.block_n, max(16, _next_pow2(chunk))),
                IEEE=q.dtype == torch.float32, WHILE_LOOPS=q.device.type == "cpu",
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
            del dq_plan
        sel_w = sel_w if sel_w.is_contiguous() else sel_w.contiguous()
        # 64 rows per program: 1.13 ms against 1.75 with 16 for one 2 x 512K 128/8 window (H100,
        # scripts/dev/tune_sums.py, run O); the sum order per row does not depend on it.
        block_r = 64
        _dq_sum_kernel[(triton.cdiv(m * hq, block_r),)](
            dq_part, sel_w, seg_len, dq_base[a:b] if dq_base is not None else dq_part, dq[a:b],
            m * hq, S=slots, P=parts, D=d, DP=dp, BLOCK_N=block_n if fused_dq else chunk,
            BLOCK_R=block_r, HAS_BASE=dq_base is not None, num_warps=4)
        del dq_part, plan, lse_w, delta_w, sel_w  # before the next window's
    return dq, dk, dv
