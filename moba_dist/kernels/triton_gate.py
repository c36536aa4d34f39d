"""Fused MoBA gate and top-k in Triton: block scores are reduced to each query's best past blocks
inside the kernel, so the ``[n, Hq, N]`` score matrix never reaches memory.

Semantics (those of :func:`moba_dist.gating.select_blocks`): query ``i`` and query head ``h``
score every block ``j`` in ``[q_first_block[i], q_block[i])`` by

    s(i, h, j) = <q[i, h], summaries[j, h // (Hq // Hkv)]>

as a float32-class dot product, and keep the ``topk - 1`` highest, ties going to the lower block.

Scores, two ways (``GateConfig.scores``):

  * ``"fma"`` (float16/float32 queries, and an option for bfloat16): one sequential fp32 fused
    multiply-add chain over the head dimension, ``acc = 0; for d in 0..D-1: acc = fma(q[d],
    s[d], acc)``: ``tl.dot`` with ``input_precision="ieee"`` lowers to that chain on CUDA cores
    (never TF32, whatever ``torch.backends.cuda.matmul.allow_tf32`` says), and chunks of
    ``BLOCK_D`` columns pass the accumulator on, so not even the launch configuration changes a
    score.
  * ``"mma3"`` (bfloat16 queries, the default for them): each float32 summary is split once,
    outside the kernel, into three bfloat16 terms with ``hi + mid + lo == m`` exactly
    (:func:`split_bf16x3`), and ``acc = q.lo; acc += q.mid; acc += q.hi`` runs on tensor cores
    with fp32 accumulation. A bf16 x bf16 product is exact in fp32, so the score is the exact dot
    product up to the MMA's fp32-class accumulation rounding, at tensor-core speed; TF32 is not
    involved (bf16 inputs). Invariance: one compiled kernel issues the same MMA instruction
    sequence for every tile (same shape, same chunks of ``d`` in the same order, same three
    passes), and an MMA output element is a function of its own row of A and column of B only, not
    of their positions in the tile; so each (query, block) score is a fixed function of the
    query row and the summary, whatever ``n``, the slicing, the row a query sits in or the TF32
    switch. A different ``GateConfig`` may pick another MMA shape and so other low bits: the
    selection is a function of the inputs for a fixed configuration, and :func:`gate_topk` uses
    one fixed default per query dtype (never autotuned per shape), the same on every rank.

Triton's CPU interpreter evaluates ``tl.dot`` with numpy, whose order differs; tests there use
inputs whose every partial sum is exact in float32, for which every order gives the same scores.

Top-k. A score and its block index are packed into one int64 key, ``(ordered_bits << 32) |
(2**31 - 1 - j)``, where ``ordered_bits`` is the float32 bit pattern with negative values' magnitude
bits flipped (so signed integer order is float order; ``-0.0`` is first turned into ``+0.0``).
Keys are distinct per row and the largest key is the best score with the lowest block index, so
every comparison below is exact, ties included. NaN scores: a NaN with the sign bit clear ranks
above ``+inf``, one with the sign bit set below ``-inf`` (as in ``gating._topk_packed``).

Per program: ``BLOCK_M`` consecutive query rows times all ``G = Hq / Hkv`` query heads of one kv
head (``R = BLOCK_M * next_pow2(G)`` rows), streaming the union of its rows' candidate ranges in
tiles of ``BLOCK_N`` blocks in increasing block order; each summary tile is loaded once for the
``G`` heads, the query rows once for all tiles when ``BLOCK_D >= D``. The running
top-``(topk - 1)`` of each row lives in registers as ``KP = next_pow2(topk - 1)`` int64 keys.
Merge strategies (``merge``):

  * ``"insert"``: a float32 filter keeps a tile's candidates whose score is strictly above the
    row's worst kept score (kept blocks all have lower indices, so an equal score never enters);
    usually no row, or a few, has any. Then, as many times as the most survivors in any row (at
    most ``topk - 1``), every row moves its best survivor (int32 ordered score, then lowest index)
    into the slot of its worst kept key if that key is larger. Int64 work is per row, not per
    score.
  * ``"bitonic"``: int64 keys for the whole tile, ``tl.topk`` of the tile, joined with the kept
    keys, ``tl.topk`` again (slow; kept for comparison).

Output order: each ``[topk - 1]`` row lists the selected blocks by descending score (equal scores:
lower block first), then ``-1`` for missing entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .triton_version import require_triton

require_triton(triton.__version__)

import triton.language as tl  # noqa: E402
from triton import knobs  # noqa: E402

_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)
# Every real key is at least _KEY_MIN + 2**30 (block ids stay below 2**30); slot sentinels sit at
# _KEY_MIN + slot, so anything above this floor is a real block.
_VALID_FLOOR = tl.constexpr(-(2**63) + 2**29)
MAX_BLOCKS = 2**30

@dataclass(frozen=True)
class GateConfig:
    """Launch parameters of the fused gate.

    ``scores``: ``"mma3"`` (tensor cores on the three-way bf16 split of the summaries; bfloat16
    queries only), ``"fma"`` (fp32 FMA chain on CUDA cores; any query dtype) or ``"auto"`` (mma3
    for bfloat16 queries, fma otherwise). ``merge``: ``"insert"`` (threshold filter, then a few
    insertion rounds) or ``"bitonic"`` (``tl.topk`` of every tile; slow, kept for comparison).
    ``rounds``: ``"loop"`` (a data-dependent loop of insertion rounds) or ``"unrolled"``
    (``topk - 1`` guarded copies; no nested loop, so the tile loop can be software-pipelined).

    With ``scores="fma"`` the selection never depends on the configuration. With ``"mma3"`` it is
    a fixed function of the inputs for one configuration (the MMA instruction shape is part of the
    reduction order), which is why :func:`gate_topk` uses one fixed default per query dtype and
    never autotunes per shape: every rank of a context-parallel call compiles the same kernel.
    """

    block_m: int = 16
    block_n: int = 64
    block_d: int = 128
    num_warps: int = 4
    num_stages: int = 2
    merge: str = "insert"
    scores: str = "auto"
    rounds: str = "loop"


# The fastest measured on an H200 (one 512K sequence, 16/4 heads, D 128): bfloat16 queries on
# tensor cores, chunk 128 topk 8: 75 ms (12 configurations: 75-192 ms); chunk 4096 topk 12: 10 ms.
# Float16/float32 queries on CUDA cores: 438-468 ms for the best two of four.
DEFAULT_MMA = GateConfig(block_n=32, scores="mma3")
DEFAULT_FMA = GateConfig(block_m=16, block_n=128, block_d=16, num_warps=8, num_stages=1, scores="fma")


def default_config(q_dtype: torch.dtype) -> GateConfig:
    """The fixed launch configuration used when ``config`` is None (depends on the dtype only)."""
    return DEFAULT_MMA if q_dtype == torch.bfloat16 else DEFAULT_FMA


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def split_bf16x3(summaries: torch.Tensor) -> torch.Tensor:
    """``[N, Hkv, D]`` float32 -> ``[Hkv, 3, N, D]`` bfloat16 ``(hi, mid, lo)`` with
    ``hi + mid + lo == summaries`` exactly (for values whose low part stays a normal bf16 number,
    i.e. above about ``2**-110``; below that the split is still a fixed function of the value).
    Infinities and NaNs go whole into ``hi`` (``mid = lo = 0``); finite values beyond bf16's range
    keep bf16's largest finite value in ``hi``."""
    s = summaries.permute(1, 0, 2)
    hi = s.to(torch.bfloat16)
    big = torch.full_like(hi, torch.finfo(torch.bfloat16).max)
    hi = torch.where(hi.isinf() & s.isfinite(), torch.copysign(big, hi), hi)
    # Exact: the rounding error of a round-to-nearest (or of the clamp, in the same binade).
    r = torch.where(hi.isfinite(), s - hi.float(), 0.0)
    mid = r.to(torch.bfloat16)
    lo = (r - mid.float()).to(torch.bfloat16)  # exact: r - mid has at most 8 significant bits
    return torch.stack([hi, mid, lo], dim=1).contiguous()


@triton.jit
def _ordered(x):
    """float32 -> int32 whose signed order is the float order (-0.0 == +0.0; NaNs outermost)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unordered(o):
    """Inverse of :func:`_ordered` (up to the sign of zero)."""
    bits = tl.where(o < 0, o ^ 0x7FFFFFFF, o)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _scores(q_ptr, s_ptr, q_row_off, live, qt, j, j_in, hk, stride_sp, stride_sh, stride_sn,
            R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
            MMA3: tl.constexpr, Q_ONCE: tl.constexpr, INTERPRETED: tl.constexpr):
    """``[R, BLOCK_N]`` float32 scores of the rows against blocks ``j``.

    fma: one sequential fp32 FMA chain over ``d = 0..D-1`` per score (``input_precision="ieee"``,
    chunks of ``BLOCK_D`` pass the accumulator on). mma3: ``acc = q.lo; acc += q.mid; acc += q.hi``
    on tensor cores, each over ``d`` in chunks of ``BLOCK_D``, fp32 accumulation."""
    acc = tl.zeros([R, BLOCK_N], tl.float32)
    s_col = hk * stride_sh + j.to(tl.int64)[None, :] * stride_sn
    if MMA3:
        for p in tl.static_range(3):
            for d0 in tl.static_range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                d_in = d < D
                if not Q_ONCE:
                    qt = tl.load(q_ptr + q_row_off + d[None, :], mask=live[:, None] & d_in[None, :],
                                 other=0.0)
                # p = 0, 1, 2 reads lo, mid, hi: small terms first.
                st = tl.load(s_ptr + (2 - p) * stride_sp + s_col + d[:, None],
                             mask=j_in[None, :] & d_in[:, None], other=0.0)
                if INTERPRETED:
                    # Triton 3.6's interpreter mis-multiplies bf16 in tl.dot; fp32 operands hold
                    # the same values, so the products are the same.
                    acc = tl.dot(qt.to(tl.float32), st.to(tl.float32), acc)
                else:
                    acc = tl.dot(qt, st, acc)
    else:
        for d0 in tl.static_range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_in = d < D
            if not Q_ONCE:
                qt = tl.load(q_ptr + q_row_off + d[None, :], mask=live[:, None] & d_in[None, :],
                             other=0.0).to(tl.float32)
            st = tl.load(s_ptr + s_col + d[:, None], mask=j_in[None, :] & d_in[:, None], other=0.0)
            # ieee: a sequential fp32 FMA chain over d, never TF32 (see the module docstring).
            acc = tl.dot(qt, st, acc, input_precision="ieee")
    return acc


@triton.jit
def _insert_round(top, o, surv, j):
    """Move each row's best surviving candidate into its worst kept slot if it is better."""
    m = tl.max(tl.where(surv, o, -2147483648), 1)
    jb = tl.min(tl.where(surv & (o == m[:, None]), j[None, :], 2147483647), 1)
    has = jb != 2147483647
    key = (m.to(tl.int64) << 32) | (2147483647 - jb).to(tl.int64)
    worst = tl.min(top, 1)
    take = has & (key > worst)
    top = tl.where((top == worst[:, None]) & take[:, None], key[:, None], top)
    surv = surv & (j[None, :] != jb[:, None])
    return top, surv


@triton.jit
def _gate_tile(q_ptr, s_ptr, q_row_off, live, qt, qb, qf, top, start, hi, hk,
               stride_sp, stride_sh, stride_sn,
               D: tl.constexpr, TOPK1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MMA3: tl.constexpr, Q_ONCE: tl.constexpr, MERGE_BITONIC: tl.constexpr,
               ROUNDS_UNROLLED: tl.constexpr, WHILE_LOOPS: tl.constexpr):
    """Scores of one tile of ``BLOCK_N`` candidate blocks from ``start``, merged into ``top``."""
    R: tl.constexpr = top.shape[0]
    KP: tl.constexpr = top.shape[1]
    j = start + tl.arange(0, BLOCK_N)
    j_in = j < hi
    acc = _scores(q_ptr, s_ptr, q_row_off, live, qt, j, j_in, hk, stride_sp, stride_sh, stride_sn,
                  R, BLOCK_N, D, BLOCK_D, MMA3, Q_ONCE, WHILE_LOOPS)
    valid = (j[None, :] >= qf[:, None]) & (j[None, :] < qb[:, None])
    if MERGE_BITONIC:
        rev = (2147483647 - j).to(tl.int64)
        key = (_ordered(acc).to(tl.int64) << 32) | rev[None, :]
        key = tl.where(valid, key, _KEY_MIN)
        tile_top = tl.topk(key, KP, dim=1)
        both = tl.reshape(tl.join(top, tile_top), [R, 2 * KP])
        top = tl.topk(both, KP, dim=1)
    else:
        # Tiles come in increasing block order, so every kept block has a lower index than this
        # tile's: a candidate can only enter with a strictly greater score than the row's worst
        # kept one. `not (s <= t)` also lets NaN scores through, and everything when t is NaN
        # (an empty slot's sentinel decodes to NaN, as does a kept NaN): the exact int keys of
        # the rounds decide those.
        t = _unordered((tl.min(top, 1) >> 32).to(tl.int32))
        surv = valid & ~(acc <= t[:, None])
        left = tl.sum(surv.to(tl.int32), 1)
        rounds = tl.minimum(tl.max(left, 0), TOPK1)
        if rounds > 0:
            o = _ordered(acc)
            if ROUNDS_UNROLLED:
                for it in tl.static_range(TOPK1):
                    if it < rounds:
                        top, surv = _insert_round(top, o, surv, j)
            elif WHILE_LOOPS:
                # Triton 3.6's interpreter cannot take a tensor bound in range().
                it = rounds * 0
                while it < rounds:
                    top, surv = _insert_round(top, o, surv, j)
                    it += 1
            else:
                for _ in range(rounds):
                    top, surv = _insert_round(top, o, surv, j)
    return top


@triton.jit
def _gate_topk_kernel(
    q_ptr, s_ptr, qb_ptr, qf_ptr, out_ptr,
    n, n_tiles,
    stride_qn, stride_qh, stride_sp, stride_sh, stride_sn, stride_on, stride_oh,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TOPK1: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MMA3: tl.constexpr, MERGE_BITONIC: tl.constexpr, ROUNDS_UNROLLED: tl.constexpr,
    WHILE_LOOPS: tl.constexpr,
):
    # One grid axis (n_tiles * Hkv programs; a second axis would cap n_tiles at 65535), kv head
    # fastest: the latest query tiles (the most candidates) of all heads launch first, and the
    # short early tiles fill the tail.
    pid = tl.program_id(0)
    hk = pid % HKV
    tile = n_tiles - 1 - pid // HKV
    R: tl.constexpr = BLOCK_M * GP
    Q_ONCE: tl.constexpr = BLOCK_D >= D
    r = tl.arange(0, R)
    row = tile * BLOCK_M + r // GP
    g = r % GP
    head = hk * G + g
    in_n = row < n
    live = in_n & (g < G)
    row64 = row.to(tl.int64)
    qb = tl.load(qb_ptr + row64, mask=in_n, other=0).to(tl.int32)
    qf = tl.load(qf_ptr + row64, mask=in_n, other=0).to(tl.int32)
    qf = tl.where(live, qf, qb)  # padded rows: empty range
    has = qf < qb
    lo = tl.min(tl.where(has, qf, 2**30), 0)
    hi = tl.max(tl.where(has, qb, 0), 0)

    slot = tl.arange(0, KP)
    if MERGE_BITONIC:
        top = tl.full([R, KP], _KEY_MIN, tl.int64)
    else:
        # Distinct sentinels, so "the slot holding the row minimum" is one slot; slots past
        # TOPK1 (power-of-two padding) hold huge keys and are never the minimum.
        init = tl.where(slot < TOPK1, _KEY_MIN + slot.to(tl.int64), _KEY_MAX - slot.to(tl.int64))
        top = tl.zeros([R, KP], tl.int64) + init[None, :]

    q_row_off = row64[:, None] * stride_qn + head[:, None].to(tl.int64) * stride_qh
    if Q_ONCE:
        # The whole head dimension fits one chunk: load the query rows once for all tiles.
        dq = tl.arange(0, BLOCK_D)
        qt = tl.load(q_ptr + q_row_off + dq[None, :], mask=live[:, None] & (dq < D)[None, :],
                     other=0.0)
        if not MMA3:
            qt = qt.to(tl.float32)
    else:
        qt = 0.0
    if WHILE_LOOPS:
        start = lo
        while start < hi:
            top = _gate_tile(q_ptr, s_ptr, q_row_off, live, qt, qb, qf, top, start, hi, hk,
                             stride_sp, stride_sh, stride_sn, D, TOPK1, BLOCK_N, BLOCK_D,
                             MMA3, Q_ONCE, MERGE_BITONIC, ROUNDS_UNROLLED, WHILE_LOOPS)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            top = _gate_tile(q_ptr, s_ptr, q_row_off, live, qt, qb, qf, top, start, hi, hk,
                             stride_sp, stride_sh, stride_sn, D, TOPK1, BLOCK_N, BLOCK_D,
                             MMA3, Q_ONCE, MERGE_BITONIC, ROUNDS_UNROLLED, WHILE_LOOPS)

    # Best first: repeatedly take each row's largest key (keys are distinct within a row).
    if not MERGE_BITONIC:
        top = tl.where(slot[None, :] < TOPK1, top, _KEY_MIN)
    out_row = out_ptr + row64 * stride_on + head.to(tl.int64) * stride_oh
    for t in tl.static_range(TOPK1):
        best = tl.max(top, 1)
        low = best.to(tl.int32)  # truncation keeps the reversed block index
        blk = tl.where(best > _VALID_FLOOR, 2147483647 - low, -1)
        tl.store(out_row + t, blk, mask=live)
        top = tl.where(top == best[:, None], _KEY_MIN, top)


def gate_topk(q: torch.Tensor, summaries: torch.Tensor, q_block: torch.Tensor,
              q_first_block: torch.Tensor, topk: int, *, config: GateConfig | None = None
              ) -> torch.Tensor:
    """Top-(topk-1) past blocks of every query and head, without a score matrix.

    Args:
        q: ``[n, Hq, D]`` queries, bfloat16/float16/float32, last dim contiguous.
        summaries: ``[N, Hkv, D]`` float32 block means of the whole stream (``N < 2**30``).
        q_block, q_first_block: ``[n]`` int64 or int32 on ``q``'s device: each query's global
            block and the first block of its sequence; candidates are ``[q_first_block, q_block)``.
        topk: MoBA's top-k, counting the current block (so ``topk - 1`` past blocks are chosen).
        config: launch parameters; None: :func:`default_config` of ``q.dtype`` (a fixed one).

    Returns:
        ``[n, Hq, max(topk - 1, 0)]`` int32 global block ids by descending score (ties: lower
        block first), ``-1`` after the last candidate. Nothing is synchronised with the host.
    """
    if not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: must be a positive int, got {topk!r}")
    if q.dim() != 3 or summaries.dim() != 3:
        raise ValueError(f"q, summaries: expected [n, Hq, D] and [N, Hkv, D], got "
                         f"{tuple(q.shape)} and {tuple(summaries.shape)}")
    n, hq, d = q.shape
    nblocks, hkv, ds = summaries.shape
    if ds != d or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"summaries: shape {tuple(summaries.shape)} does not fit q {tuple(q.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"q: expected bfloat16, float16 or float32, got {q.dtype}")
    if summaries.dtype != torch.float32:
        raise TypeError(f"summaries: expected float32, got {summaries.dtype}")
    for name, t in (("q_block", q_block), ("q_first_block", q_first_block)):
        if t.shape != (n,) or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: expected [{n}] int32/int64, got {tuple(t.shape)} {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q on {q.device}")
    if summaries.device != q.device:
        raise ValueError(f"summaries: on {summaries.device}, q on {q.device}")
    if q.device.type != "cuda" and not knobs.runtime.interpret:
        raise ValueError(f"q: on {q.device}; the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1")
    if nblocks >= MAX_BLOCKS:
        raise ValueError(f"summaries: {nblocks} blocks, at most {MAX_BLOCKS - 1} supported")
    cfg = config or default_config(q.dtype)
    if cfg.merge not in ("insert", "bitonic"):
        raise ValueError(f"config: merge must be 'insert' or 'bitonic', got {cfg.merge!r}")
    if cfg.scores not in ("auto", "mma3", "fma"):
        raise ValueError(f"config: scores must be 'auto', 'mma3' or 'fma', got {cfg.scores!r}")
    if cfg.rounds not in ("loop", "unrolled"):
        raise ValueError(f"config: rounds must be 'loop' or 'unrolled', got {cfg.rounds!r}")
    mma3 = cfg.scores == "mma3" or (cfg.scores == "auto" and q.dtype == torch.bfloat16)
    if mma3 and q.dtype != torch.bfloat16:
        raise ValueError(f"config: scores='mma3' needs bfloat16 queries, got {q.dtype}")
    topk1 = topk - 1
    out = torch.empty(n, hq, topk1, dtype=torch.int32, device=q.device)
    if n == 0 or topk1 == 0:
        return out
    if nblocks == 0:
        return out.fill_(-1)
    q = q if q.stride(-1) == 1 else q.contiguous()
    if mma3:
        s = split_bf16x3(summaries)  # [Hkv, 3, N, D]
        stride_sp, stride_sh, stride_sn = s.stride(1), s.stride(0), s.stride(2)
    else:
        s = summaries if summaries.stride(-1) == 1 else summaries.contiguous()
        stride_sp, stride_sh, stride_sn = 0, s.stride(1), s.stride(0)
    kp = _next_pow2(topk1)
    block_n = max(cfg.block_n, kp, 16)  # tl.topk needs k <= width; tl.dot needs >= 16
    group = hq // hkv
    n_tiles = triton.cdiv(n, cfg.block_m)
    _gate_topk_kernel[(n_tiles * hkv,)](
        q, s, q_block.contiguous(), q_first_block.contiguous(), out,
        n, n_tiles,
        q.stride(0), q.stride(1), stride_sp, stride_sh, stride_sn, out.stride(0), out.stride(1),
        HKV=hkv, G=group, GP=_next_pow2(group), D=d, TOPK1=topk1, KP=kp,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_D=max(16, min(cfg.block_d, _next_pow2(d))),
        MMA3=mma3, MERGE_BITONIC=cfg.merge == "bitonic", ROUNDS_UNROLLED=cfg.rounds == "unrolled",
        # Triton 3.6's interpreter cannot take tensors as range() bounds (numpy 2); GPU code
        # keeps the for loops, which Triton can pipeline.
        WHILE_LOOPS=q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
