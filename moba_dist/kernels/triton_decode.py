"""MoBA single-token decode in Triton: gate, split-KV attention over the selected blocks read in
place from the KV cache, and an LSE merge. Three launches, no host sync, no gather copies, fixed
grid sizes (from ``Lmax``, the block count and ``topk``): CUDA-graph capturable.

Semantics: those of :func:`moba_dist.decode.moba_decode` (docs/semantics.md, "Decoding"), of
which this is the GPU twin. Tested on the CPU under ``TRITON_INTERPRET=1`` against it
(tests/test_triton_decode.py); ``scripts/bench_decode.py`` times it on a GPU and checks it.

Shapes: ``q [B, Hq, D]`` (bf16/fp16/fp32), ``k_cache, v_cache [B, Lmax, Hkv, D]`` (last dim
contiguous), ``cache_seqlens`` int32 ``[B]`` on the device, ``block_sums [B, Nmax, Hkv, D]``
float64 (last dim contiguous). ``G = Hq / Hkv`` query heads share a kv head.

1. Gate (``_gate_kernel``, grid ``(B * Hkv, NG)``): program ``(b, kv head, s)`` scores the
   tiles ``s, s + NG, s + 2 NG, ...`` of ``BLOCK_N`` blocks among the complete blocks
   ``[0, own)`` of row ``b`` (``own = (seqlen - 1) // chunk``), for the ``G`` query heads of
   the kv head, and writes its local top-``(topk - 1)`` as
   packed int64 keys (score bits, reversed block id: the key order is the selection order, ties
   to the lower block). The block mean is computed in the kernel from the float64 sum exactly as
   :func:`moba_dist.gating.block_means` does (one IEEE float64 division, PTX ``div.rn.f64``, one
   rounding to float32), and the score is computed with the arithmetic of the training path's
   Triton gate (:func:`moba_dist.kernels.triton_gate.gate_topk`, its default configuration for
   the query dtype):

     * bf16 queries, ``"mma3"``: the float32 mean is split into bf16 ``hi + mid + lo`` (the same
       split as ``triton_gate.split_bf16x3``; under the interpreter, which truncates float-to-bf16
       casts, with integer round-to-nearest-even), and ``acc = q.lo; acc += q.mid;
       acc += q.hi`` run as ``tl.dot`` on tiles of the **same shape** as ``gate_topk``'s
       (``BLOCK_M * next_pow2(G)`` rows, of which row 0's ``G`` heads are live, ``BLOCK_N``
       blocks, ``BLOCK_D`` head-dim chunks, same warps), so the same MMA instruction sequence
       reduces each score: an MMA output element depends on its own row and column only.
     * fp16/fp32 queries, ``"fma"``: ``tl.dot(input_precision="ieee")``, a sequential fp32 FMA
       chain over ``d`` whatever the tile shape (as in ``gate_topk``).

   This replicates ``gate_topk`` rather than calling it (which would need the means of all
   blocks, their bf16 split, and more launches per token). ``scripts/bench_decode.py`` checks
   on the GPU that the selections equal ``gate_topk``'s on the same inputs.
2. Attention (``_attn_kernel``, grid ``(B * Hkv, G * (topk - 1) + 1, NSPLIT)``): program
   ``(b, kv head, slot, split)`` first merges the ``NG * (topk - 1)`` candidate keys of each of
   its ``G`` heads into the final selection (``topk - 1`` max-reductions over a few hundred keys,
   done redundantly per program: at a 1M cache on an H100 this costs 3-6 us of attention time,
   a separate ``torch.topk`` and its decode 14-16 us, run M). Slot ``c < G * (topk - 1)`` is the
   ``c % (topk - 1)``-th selected block of head ``c // (topk - 1)``; it runs only if no earlier
   slot of the group holds the same block (a block is read once per kv head, with a mask of the
   heads that chose it). The last slot is the own block, keys ``[own * chunk, t]``. Split ``p``
   covers keys ``[p * SPLIT_N, (p + 1) * SPLIT_N)`` of the block. All ``G`` heads are one tile
   (padded to 16 rows for ``tl.dot``); keys and values are read in place from the cache by
   position. Output: float32 partial ``(out, lse)`` per (slot, split, head); ``lse = -inf``
   where a head reads nothing.
3. Merge (``_merge_kernel``, grid ``(B * Hq, D / merge_d)``): log-sum-exp merge of the partials
   into ``[B, Hq, D]`` in q's dtype (and, optionally, the natural-log LSE ``[B, Hq]`` float32),
   each program one chunk of ``d`` (at 4096/12 a head has 360 partials: one program per head
   took 11.5 us of 151 at a 1M cache on an H100).

Workspace (allocated per call unless passed in): candidates ``B * Hq * NG * (topk - 1)`` int64,
partials ``B * Hkv * E * next_pow2(G) * (D + 1)`` float32 with ``E = (G * (topk - 1) + 1) *
NSPLIT``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_gate import _insert_round, _ordered, _unordered, default_config

_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)
_VALID_FLOOR = tl.constexpr(-(2**63) + 2**29)  # keys above it are real blocks (triton_gate)
_BF16_MAX = tl.constexpr(3.3895313892515355e38)
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the attention and merge kernels (the gate's arithmetic follows
    ``triton_gate.default_config``; ``gate_programs`` only sets how the blocks are shared out).

    ``split_n``: keys per attention program (a block of ``chunk`` keys is cut into
    ``ceil(chunk / split_n)`` programs); ``block_n``: keys per tile inside a program;
    ``gate_programs``: target number of gate programs per (row, kv head) (fewer for short
    caches; each scans a contiguous run of blocks). 64: at a 1M cache, 128/8 decodes in 49.1 us
    against 61.2 with 32 (H100, ``bench_decode.py --sweep``); 4096/12 (256 blocks) is unchanged."""

    split_n: int = 512
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    gate_programs: int = 64
    merge_block: int = 64
    merge_d: int = 32


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@triton.jit
def _bf16_rne(x, INTERPRETED: tl.constexpr):
    """float32 -> the nearest bf16 value (ties to even), as float32. On the GPU the cast itself
    (``cvt.rn.bf16.f32``, one instruction); in the interpreter, which truncates
    ``.to(tl.bfloat16)``, integer arithmetic giving the same value. NaN stays NaN."""
    if not INTERPRETED:
        return x.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def _split3(m, INTERPRETED: tl.constexpr):
    """float32 ``m`` -> bf16-valued float32 ``(hi, mid, lo)`` with ``hi + mid + lo == m``, the
    split of ``triton_gate.split_bf16x3`` (overflow clamped to bf16's largest finite value)."""
    hi = _bf16_rne(m, INTERPRETED)
    m_finite = (m == m) & (tl.abs(m) < float("inf"))
    hi_inf = tl.abs(hi) == float("inf")
    hi = tl.where(hi_inf & m_finite, tl.where(hi > 0, _BF16_MAX, -_BF16_MAX), hi)
    r = tl.where((hi == hi) & (tl.abs(hi) < float("inf")), m - hi, 0.0)
    mid = _bf16_rne(r, INTERPRETED)
    lo = _bf16_rne(r - mid, INTERPRETED)
    return hi, mid, lo


@triton.jit
def _mean(sm, chunk, inv_chunk, POW2: tl.constexpr):
    """float64 block sums -> float32 means, as ``gating.block_means``: ``sum / chunk`` rounded
    once to float64, then to float32. For a power-of-two ``chunk`` the product with
    ``inv_chunk = 1 / chunk`` (a power of two: exact in float32 and float64) is that same correctly
    rounded quotient, without a float64 division per element (about 25 instructions each)."""
    if POW2:
        return (sm * inv_chunk).to(tl.float32)
    return (sm / chunk).to(tl.float32)


@triton.jit
def _mma(qt, part, acc, INTERPRETED: tl.constexpr):
    if INTERPRETED:
        # As in triton_gate: the interpreter mis-multiplies bf16 in tl.dot; fp32 holds the values.
        return tl.dot(qt.to(tl.float32), part, acc)
    return tl.dot(qt, part.to(tl.bfloat16), acc)


@triton.jit
def _gate_scores(q_row, sum_col, live, j_in, chunk, inv_chunk,
                 R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 MMA3: tl.constexpr, INTERPRETED: tl.constexpr, POW2: tl.constexpr):
    """``[R, BLOCK_N]`` float32 scores: the reduction of ``triton_gate._scores`` on means computed
    here from the float64 sums (``sum_col``: pointers of each block's d = 0)."""
    acc = tl.zeros([R, BLOCK_N], tl.float32)
    if MMA3:
        if BLOCK_D >= D:
            # One chunk of d: load and split once, then the three passes lo, mid, hi.
            d = tl.arange(0, BLOCK_D)
            d_in = d < D
            qt = tl.load(q_row[:, None] + d[None, :], mask=live[:, None] & d_in[None, :], other=0.0)
            sm = tl.load(sum_col[None, :] + d[:, None], mask=j_in[None, :] & d_in[:, None], other=0.0)
            hi, mid, lo = _split3(_mean(sm, chunk, inv_chunk, POW2), INTERPRETED)
            acc = _mma(qt, lo, acc, INTERPRETED)
            acc = _mma(qt, mid, acc, INTERPRETED)
            acc = _mma(qt, hi, acc, INTERPRETED)
        else:
            for p in tl.static_range(3):
                for d0 in tl.static_range(0, D, BLOCK_D):
                    d = d0 + tl.arange(0, BLOCK_D)
                    d_in = d < D
                    qt = tl.load(q_row[:, None] + d[None, :], mask=live[:, None] & d_in[None, :],
                                 other=0.0)
                    sm = tl.load(sum_col[None, :] + d[:, None], mask=j_in[None, :] & d_in[:, None],
                                 other=0.0)
                    hi, mid, lo = _split3(_mean(sm, chunk, inv_chunk, POW2), INTERPRETED)
                    if p == 0:
                        acc = _mma(qt, lo, acc, INTERPRETED)
                    elif p == 1:
                        acc = _mma(qt, mid, acc, INTERPRETED)
                    else:
                        acc = _mma(qt, hi, acc, INTERPRETED)
    else:
        for d0 in tl.static_range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            qt = tl.load(q_row[:, None] + d[None, :], mask=live[:, None] & d_in[None, :],
                         other=0.0).to(tl.float32)
            sm = tl.load(sum_col[None, :] + d[:, None], mask=j_in[None, :] & d_in[:, None], other=0.0)
            acc = tl.dot(qt, _mean(sm, chunk, inv_chunk, POW2), acc, input_precision="ieee")
    return acc


@triton.jit
def _first_rows(acc, BLOCK_M: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``[0, GP)`` of ``acc [BLOCK_M * GP, BLOCK_N]`` (the live query's heads), bit for bit
    (an integer sum with zeros: no float arithmetic touches a score, NaN payloads included)."""
    bits = tl.reshape(acc.to(tl.int32, bitcast=True), [BLOCK_M, GP, BLOCK_N])
    m = tl.arange(0, BLOCK_M)[:, None, None]
    return tl.sum(tl.where(m == 0, bits, 0), 0).to(tl.float32, bitcast=True)


@triton.jit
def _gate_tile(q_row, sums_ptr, b64, hk, live, live_g, top, start, hi, chunk, inv_chunk,
               stride_sb, stride_sn, stride_sh, BLOCK_M: tl.constexpr, GP: tl.constexpr,
               BLOCK_N: tl.constexpr, D: tl.constexpr,
               BLOCK_D: tl.constexpr, TOPK1: tl.constexpr, MMA3: tl.constexpr,
               INTERPRETED: tl.constexpr, WHILE_LOOPS: tl.constexpr, POW2: tl.constexpr):
    """Scores of blocks ``[start, start + BLOCK_N) ∩ [.., hi)`` merged into the kept keys
    (``top [GP, KP]``, one row per head of the group)."""
    j = start + tl.arange(0, BLOCK_N)
    j_in = j < hi
    sum_col = sums_ptr + b64 * stride_sb + hk * stride_sh + j.to(tl.int64) * stride_sn
    acc = _gate_scores(q_row, sum_col, live, j_in, chunk, inv_chunk, BLOCK_M * GP, BLOCK_N, D,
                       BLOCK_D, MMA3, INTERPRETED, POW2)
    if BLOCK_M > 1:
        # The MMA needs gate_topk's tile of BLOCK_M * GP rows, of which only the first GP are
        # live: the filter and the insertion rounds run on those alone (1/BLOCK_M of the work).
        acc = _first_rows(acc, BLOCK_M, GP, BLOCK_N)
    valid = live_g[:, None] & j_in[None, :]
    # The insertion merge of triton_gate._gate_tile: tiles come in increasing block order, so a
    # candidate enters only with a score strictly above the row's worst kept one.
    t = _unordered((tl.min(top, 1) >> 32).to(tl.int32))
    surv = valid & ~(acc <= t[:, None])
    rounds = tl.minimum(tl.max(tl.sum(surv.to(tl.int32), 1), 0), TOPK1)
    if rounds > 0:
        o = _ordered(acc)
        if WHILE_LOOPS:
            it = rounds * 0
            while it < rounds:
                top, surv = _insert_round(top, o, surv, j)
                it += 1
        else:
            for _ in range(rounds):
                top, surv = _insert_round(top, o, surv, j)
    return top


@triton.jit
def _gate_kernel(
    q_ptr, sums_ptr, seqlens_ptr, cand_ptr,
    chunk, inv_chunk, step,
    stride_qb, stride_qh, stride_sb, stride_sn, stride_sh, stride_cb, stride_ch, stride_cs,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TOPK1: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MMA3: tl.constexpr, INTERPRETED: tl.constexpr, WHILE_LOOPS: tl.constexpr,
    POW2: tl.constexpr,
):
    pid = tl.program_id(0)
    part = tl.program_id(1)
    b = pid // HKV
    hk = pid % HKV
    R: tl.constexpr = BLOCK_M * GP
    r = tl.arange(0, R)
    g = r % GP
    live = (r < GP) & (g < G)  # row 0 of a gate_topk tile: the one query, its G heads
    head = hk * G + g
    gl = tl.arange(0, GP)
    live_g = gl < G
    b64 = b.to(tl.int64)
    own = (tl.load(seqlens_ptr + b) - 1) // chunk
    # Program `part` takes tiles part, part + NG, part + 2 NG, ... (increasing, as the insertion
    # merge needs): short caches still spread over all programs.
    lo = part * BLOCK_N
    hi = own
    q_row = q_ptr + b64 * stride_qb + head.to(tl.int64) * stride_qh

    slot = tl.arange(0, KP)
    init = tl.where(slot < TOPK1, _KEY_MIN + slot.to(tl.int64), _KEY_MAX - slot.to(tl.int64))
    top = tl.zeros([GP, KP], tl.int64) + init[None, :]
    if WHILE_LOOPS:
        # Triton's interpreter cannot take tensors as range() bounds (as in triton_gate).
        start = lo
        while start < hi:
            top = _gate_tile(q_row, sums_ptr, b64, hk, live, live_g, top, start, hi, chunk,
                             inv_chunk, stride_sb, stride_sn, stride_sh, BLOCK_M, GP, BLOCK_N, D,
                             BLOCK_D, TOPK1, MMA3, INTERPRETED, WHILE_LOOPS, POW2)
            start += step
    else:
        for start in range(lo, hi, step):
            top = _gate_tile(q_row, sums_ptr, b64, hk, live, live_g, top, start, hi, chunk,
                             inv_chunk, stride_sb, stride_sn, stride_sh, BLOCK_M, GP, BLOCK_N, D,
                             BLOCK_D, TOPK1, MMA3, INTERPRETED, WHILE_LOOPS, POW2)
    out = cand_ptr + b64 * stride_cb + (hk * G + gl).to(tl.int64) * stride_ch + part * stride_cs
    tl.store(out[:, None] + slot[None, :], top, mask=live_g[:, None] & (slot < TOPK1)[None, :])


@triton.jit
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, cand_ptr, wo_ptr, wl_ptr,
    chunk, qk_scale,
    stride_qb, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    stride_cb, stride_ch,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, MP: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, TOPK1: tl.constexpr, KP: tl.constexpr,
    NCAND: tl.constexpr, CP: tl.constexpr, NSPLIT: tl.constexpr,
    SPLIT_N: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    b = pid // HKV
    hk = pid % HKV
    b64 = b.to(tl.int64)
    t = tl.load(seqlens_ptr + b) - 1
    own = t // chunk
    m_rows = tl.arange(0, MP)

    if TOPK1 > 0:
        # The final selection of the group's heads from the gate programs' candidate keys
        # (distinct per head, so repeatedly taking the largest is an exact top-k).
        gr = tl.arange(0, GP)
        c = tl.arange(0, CP)
        keys = tl.load(cand_ptr + b64 * stride_cb + (hk * G + gr).to(tl.int64)[:, None] * stride_ch
                       + c[None, :], mask=(gr < G)[:, None] & (c < NCAND)[None, :], other=_KEY_MIN)
        col = tl.arange(0, KP)
        sel = tl.full([GP, KP], -1, tl.int32)
        for i in tl.static_range(TOPK1):
            best = tl.max(keys, 1)
            blk = tl.where(best > _VALID_FLOOR, 2147483647 - best.to(tl.int32), -1)
            sel = tl.where(col[None, :] == i, blk[:, None], sel)
            keys = tl.where(keys == best[:, None], _KEY_MIN, keys)
        flat = gr[:, None] * TOPK1 + col[None, :]
        real = (gr < G)[:, None] & (col < TOPK1)[None, :]
        is_sel = slot < G * TOPK1
        blk = tl.max(tl.max(tl.where(real & (flat == slot), sel, -1), 1), 0)
        hit = real & (sel == blk)
        dup = tl.max(tl.max((hit & (flat < slot)).to(tl.int32), 1), 0) > 0
        heads_gp = tl.max(hit.to(tl.int32), 1)  # [GP]: heads that chose blk
        # The same per-head flags on the MP rows of the attention tile.
        heads = tl.sum(tl.where(m_rows[:, None] == gr[None, :], heads_gp[None, :], 0), 1) > 0
        read = is_sel & (blk >= 0) & ~dup
        heads = tl.where(is_sel, heads, m_rows < G)
        blk = tl.where(is_sel, blk, own)
        read = read | ~is_sel
    else:
        heads = m_rows < G
        blk = own
        read = own >= 0
    k_lo = blk * chunk + split * SPLIT_N
    k_hi = tl.minimum(k_lo + SPLIT_N, tl.where(blk == own, t + 1, blk * chunk + chunk))
    k_hi = tl.where(read, k_hi, k_lo)

    d = tl.arange(0, BLOCK_D)
    d_in = d < D
    q_live = m_rows < G
    qt = tl.load(q_ptr + b64 * stride_qb + (hk * G + m_rows).to(tl.int64)[:, None] * stride_qh
                 + d[None, :], mask=q_live[:, None] & d_in[None, :], other=0.0)
    k_base = k_ptr + b64 * stride_kb + hk * stride_kh
    v_base = v_ptr + b64 * stride_vb + hk * stride_vh
    m_i = tl.full([MP], -1.0e30, tl.float32)
    l_i = tl.zeros([MP], tl.float32)
    acc = tl.zeros([MP, BLOCK_D], tl.float32)
    if k_lo < k_hi:
        for it in range(0, SPLIT_N, BLOCK_N):
            pos = k_lo + it + tl.arange(0, BLOCK_N)
            kin = pos < k_hi
            pos64 = pos.to(tl.int64)
            kt = tl.load(k_base + pos64[None, :] * stride_kl + d[:, None],
                         mask=kin[None, :] & d_in[:, None], other=0.0)
            if IEEE:
                s = tl.dot(qt, kt, input_precision="ieee")
            elif INTERPRETED:
                s = tl.dot(qt.to(tl.float32), kt.to(tl.float32))  # bf16 dot is wrong there
            else:
                s = tl.dot(qt, kt)
            s = tl.where(kin[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_base + pos64[:, None] * stride_vl + d[None, :],
                         mask=kin[:, None] & d_in[None, :], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="ieee")
            elif INTERPRETED:
                pv = p.to(vt.dtype).to(tl.float32)
                acc = acc * alpha[:, None] + tl.dot(pv, vt.to(tl.float32))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
            m_i = m_new
    seen = heads & (l_i > 0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))  # log2 units
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    entry = (b64 * HKV + hk) * (NSPLIT * (G * TOPK1 + 1)) + slot * NSPLIT + split
    store_rows = m_rows < GP
    tl.store(wl_ptr + entry * GP + m_rows, lse, mask=store_rows)
    tl.store(wo_ptr + (entry * GP + m_rows)[:, None] * D + d[None, :], o,
             mask=(store_rows & seen)[:, None] & d_in[None, :])


@triton.jit
def _merge_kernel(wo_ptr, wl_ptr, out_ptr, lse_ptr, stride_ob, stride_oh,
                  HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
                  WRITE_LSE: tl.constexpr):
    # Program (row x head, d chunk): every chunk recomputes the (cheap) LSE maximum and weights.
    pid = tl.program_id(0)
    dc = tl.program_id(1)
    b = pid // HQ
    h = pid % HQ
    hk = h // G
    g = h % G
    base = (b.to(tl.int64) * HKV + hk) * E
    e = tl.arange(0, EB)
    m = tl.full([EB], float("-inf"), tl.float32)
    for e0 in range(0, E, EB):
        x = tl.load(wl_ptr + (base + e0 + e) * GP + g, mask=e0 + e < E, other=float("-inf"))
        m = tl.maximum(m, x)
    mx = tl.max(m, 0)
    d = dc * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    wsum = tl.zeros([EB], tl.float32)
    for e0 in range(0, E, EB):
        x = tl.load(wl_ptr + (base + e0 + e) * GP + g, mask=e0 + e < E, other=float("-inf"))
        live = x > float("-inf")
        w = tl.where(live, tl.exp2(x - mx), 0.0)
        o = tl.load(wo_ptr + ((base + e0 + e) * GP + g)[:, None] * D + d[None, :],
                    mask=live[:, None] & d_in[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
        wsum += w
    total = tl.sum(wsum, 0)
    res = acc / total
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d,
             res.to(out_ptr.dtype.element_ty), mask=d_in)
    if WRITE_LSE:
        if dc == 0:
            tl.store(lse_ptr + pid, (mx + tl.log2(total)) * 0.6931471805599453)


def _plan(nmax: int, bsz: int, hkv: int, topk1: int, chunk: int, block_n: int, cfg: DecodeConfig):
    """Static launch sizes: gate programs per (row, kv head) and the most blocks one scans
    (tiles of ``block_n`` blocks dealt round-robin), and the attention splits per block."""
    ng = max(1, min(cfg.gate_programs, triton.cdiv(max(nmax, 1), block_n)))
    bpp = triton.cdiv(triton.cdiv(max(nmax, 1), block_n), ng) * block_n
    split_n = max(16, min(cfg.split_n, _next_pow2(chunk)))  # tl.dot needs 16 or more keys
    nsplit = triton.cdiv(chunk, split_n)
    return bpp, ng, split_n, nsplit


class _Shapes:
    """Static sizes of one call (host ints only: from shapes, ``chunk``, ``topk``, the config)."""

    def __init__(self, q, lmax: int, block_sums, chunk: int, topk: int, cfg: DecodeConfig):
        self.bsz, self.hq, self.d = q.shape
        self.lmax, self.hkv = lmax, block_sums.shape[2]
        self.nmax = min(block_sums.shape[1], triton.cdiv(self.lmax, chunk))
        self.topk1 = topk - 1
        self.group = self.hq // self.hkv
        self.gp = _next_pow2(self.group)
        self.kp = _next_pow2(max(self.topk1, 1))
        self.gcfg = default_config(q.dtype)
        self.mma3 = q.dtype == torch.bfloat16
        self.gate_block_n = max(self.gcfg.block_n, self.kp, 16)
        self.bpp, self.ng, self.split_n, self.nsplit = _plan(
            self.nmax, self.bsz, self.hkv, self.topk1, chunk, self.gate_block_n, cfg)
        self.ncand = self.ng * self.topk1
        self.interpreted = q.device.type == "cpu"


def _check(q, k_cache, v_cache, cache_seqlens, block_sums, chunk, topk) -> None:
    bsz, hq, d = q.shape
    _, _, hkv, dk = k_cache.shape
    if v_cache.shape != k_cache.shape or dk != d or k_cache.shape[0] != bsz or hq % hkv:
        raise ValueError(f"shapes: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if block_sums.shape[0] != bsz or block_sums.shape[2:] != (hkv, d) or block_sums.dtype != torch.float64:
        raise ValueError(f"block_sums: expected float64 [{bsz}, Nmax, {hkv}, {d}], got "
                         f"{block_sums.dtype} {tuple(block_sums.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache: one of bf16/fp16/fp32, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if cache_seqlens.shape != (bsz,) or cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens: expected int32 [{bsz}], got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    for name, val in (("moba_chunk_size", chunk), ("moba_topk", topk)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: must be a positive int, got {val!r}")
    for t in (q, k_cache, v_cache, block_sums):
        if t.stride(-1) != 1:
            raise ValueError("q, k_cache, v_cache, block_sums: the last dim must be contiguous")
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"q: on {q.device}; the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1")


def _launch_gate(q, seqlens, block_sums, chunk: int, sz: _Shapes) -> torch.Tensor:
    """Launch 1: candidate keys ``[B, Hq, NG * (topk - 1)]`` int64."""
    cand = torch.empty(sz.bsz, sz.hq, max(sz.ncand, 1), dtype=torch.int64, device=q.device)
    if sz.topk1 == 0:
        return cand
    # mma3 keeps gate_topk's tile shape exactly (BLOCK_M rows per tile, row 0 live); fma is
    # shape-independent, so one query row padded to 16 is enough.
    block_m = sz.gcfg.block_m if sz.mma3 else max(1, 16 // sz.gp)
    _gate_kernel[(sz.bsz * sz.hkv, sz.ng)](
        q, block_sums, seqlens, cand, chunk, 1.0 / chunk, sz.ng * sz.gate_block_n,
        q.stride(0), q.stride(1), block_sums.stride(0), block_sums.stride(1),
        block_sums.stride(2), cand.stride(0), cand.stride(1), sz.topk1,
        HKV=sz.hkv, G=sz.group, GP=sz.gp, D=sz.d, TOPK1=sz.topk1, KP=sz.kp,
        BLOCK_M=block_m, BLOCK_N=sz.gate_block_n,
        BLOCK_D=max(16, min(sz.gcfg.block_d, _next_pow2(sz.d))),
        MMA3=sz.mma3, INTERPRETED=sz.interpreted, WHILE_LOOPS=sz.interpreted,
        POW2=(chunk & (chunk - 1)) == 0,
        num_warps=sz.gcfg.num_warps, num_stages=sz.gcfg.num_stages,
    )
    return cand


def top_keys(cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k`` of each head's packed candidate keys ``[B, Hq, C]`` (distinct, so the order
    is exact): ``(keys int64, block ids int64 with -1 where a key is a slot sentinel)``, each
    ``[B, Hq, k]``, best first."""
    top = cand.topk(k, dim=-1).values
    blocks = torch.where(top > -(2**63) + 2**29, 2**31 - 1 - (top & 0xFFFFFFFF), -1)
    return top, blocks


def decode_selection_triton(q: torch.Tensor, cache_seqlens: torch.Tensor, block_sums: torch.Tensor,
                            moba_chunk_size: int, moba_topk: int, *,
                            config: DecodeConfig | None = None) -> torch.Tensor:
    """The blocks the kernel's gate selects, ``[B, Hq, topk - 1]`` int64 (by descending score,
    ties lower block first, ``-1`` padded): its candidates merged here in PyTorch, as the
    attention kernel merges them. For checks against ``gate_topk`` / ``decode_selection``."""
    cfg = config or DecodeConfig()
    bsz, _, d = q.shape
    # The checks of a cache of Nmax blocks (a zero-stride view: nothing is allocated).
    kc = q.new_zeros(d).as_strided((bsz, block_sums.shape[1] * moba_chunk_size, block_sums.shape[2], d),
                                   (0, 0, 0, 1))
    _check(q, kc, kc, cache_seqlens, block_sums, moba_chunk_size, moba_topk)
    sz = _Shapes(q, kc.shape[1], block_sums, moba_chunk_size, moba_topk, cfg)
    if sz.topk1 == 0:
        return torch.empty(sz.bsz, sz.hq, 0, dtype=torch.int64, device=q.device)
    cand = _launch_gate(q, cache_seqlens.contiguous(), block_sums, moba_chunk_size, sz)
    return top_keys(cand, sz.topk1)[1]


def moba_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       cache_seqlens: torch.Tensor, block_sums: torch.Tensor,
                       moba_chunk_size: int, moba_topk: int, *, softmax_scale: float | None = None,
                       config: DecodeConfig | None = None, return_lse: bool = False):
    """The GPU twin of :func:`moba_dist.decode.moba_decode` (same arguments and result).

    Returns ``out [B, Hq, D]`` in q's dtype, or ``(out, lse)`` with ``lse [B, Hq]`` float32
    (natural log) when ``return_lse``. Three kernel launches and three ``torch.empty``; never
    reads ``cache_seqlens`` on the host. Validated: shapes, dtypes, strides
    (``1 <= cache_seqlens[b] <= Lmax`` is the caller's promise: it lives on the device).
    """
    cfg = config or DecodeConfig()
    _check(q, k_cache, v_cache, cache_seqlens, block_sums, moba_chunk_size, moba_topk)
    chunk = moba_chunk_size
    sz = _Shapes(q, k_cache.shape[1], block_sums, chunk, moba_topk, cfg)
    scale = softmax_scale if softmax_scale is not None else sz.d ** -0.5
    dev = q.device
    seqlens = cache_seqlens.contiguous()
    block_d = max(16, _next_pow2(sz.d))
    cand = _launch_gate(q, seqlens, block_sums, chunk, sz)
    slots = sz.group * sz.topk1 + 1
    entries = slots * sz.nsplit
    wo = torch.empty(sz.bsz * sz.hkv * entries * sz.gp, sz.d, dtype=torch.float32, device=dev)
    wl = torch.empty(sz.bsz * sz.hkv * entries * sz.gp, dtype=torch.float32, device=dev)
    _attn_kernel[(sz.bsz * sz.hkv, slots, sz.nsplit)](
        q, k_cache, v_cache, seqlens, cand, wo, wl, chunk, scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cand.stride(0), cand.stride(1),
        HKV=sz.hkv, G=sz.group, GP=sz.gp, MP=max(16, sz.gp), D=sz.d, BLOCK_D=block_d,
        TOPK1=sz.topk1, KP=sz.kp, NCAND=sz.ncand, CP=_next_pow2(max(sz.ncand, 1)),
        NSPLIT=sz.nsplit, SPLIT_N=sz.split_n, BLOCK_N=max(16, min(cfg.block_n, sz.split_n)),
        IEEE=q.dtype == torch.float32, INTERPRETED=sz.interpreted,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    out = torch.empty_like(q)
    lse = torch.empty(sz.bsz, sz.hq, dtype=torch.float32, device=dev) if return_lse else wl
    merge_d = max(16, min(cfg.merge_d, block_d))
    _merge_kernel[(sz.bsz * sz.hq, triton.cdiv(sz.d, merge_d))](
        wo, wl, out, lse, out.stride(0), out.stride(1),
        HQ=sz.hq, HKV=sz.hkv, G=sz.group, GP=sz.gp, D=sz.d, BLOCK_D=merge_d, E=entries,
        EB=min(cfg.merge_block, _next_pow2(entries)), WRITE_LSE=return_lse,
        num_warps=4,
    )
    return (out, lse) if return_lse else out


def launch_sizes(lmax: int, chunk: int, topk: int, bsz: int, hq: int, hkv: int,
                 config: DecodeConfig | None = None) -> dict:
    """The grids :func:`moba_decode_triton` launches (for the benchmark's report)."""
    cfg = config or DecodeConfig()
    nmax = math.ceil(lmax / chunk)
    bpp, ng, split_n, nsplit = _plan(nmax, bsz, hkv, topk - 1, chunk, 32, cfg)
    g = hq // hkv
    return {"gate": (bsz * hkv, ng), "attn": (bsz * hkv, g * (topk - 1) + 1, nsplit),
            "merge": (bsz * hq,), "blocks_per_gate_program": bpp, "split_n": split_n}
