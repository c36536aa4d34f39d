"""Fused MoBA gate and top-k in Triton: block scores are reduced to each query's best past blocks
inside the kernel, so the ``[n, Hq, N]`` score matrix never reaches memory.

Semantics (those of :func:`moba_dist.gating.select_blocks`): query ``i`` and query head ``h``
score every block ``j`` in ``[q_first_block[i], q_block[i])`` by

    s(i, h, j) = <float32(q[i, h]), summaries[j, h // (Hq // Hkv)]>

in float32, and keep the ``topk - 1`` highest, ties going to the lower block index.

Exactness. Each score is one sequential fused multiply-add chain over the head dimension,
``acc = 0; for d in 0..D-1: acc = fma(q[d], s[d], acc)``: ``tl.dot`` with
``input_precision="ieee"`` lowers to that chain on CUDA cores (never TF32, whatever
``torch.backends.cuda.matmul.allow_tf32`` says), and the chunks of ``BLOCK_D`` columns pass the
accumulator on, so the order does not depend on the tile shape. A score depends only on its own
query row and block, and every query row keeps its own top-k, so a query's selection is bitwise
the same whatever ``n``, the slicing of the queries, or the row a query sits in, for a fixed
kernel configuration. (Triton's CPU interpreter evaluates ``tl.dot`` with numpy, whose order
differs; tests there use integer-valued inputs, for which every order gives the same float32.)

Top-k. A score and its block index are packed into one int64 key, ``(ordered_bits << 32) |
(2**31 - 1 - j)``, where ``ordered_bits`` is the float32 bit pattern with negative values' magnitude
bits flipped (so signed integer order is float order; ``-0.0`` is first turned into ``+0.0``).
Keys are distinct per row and the largest key is the best score with the lowest block index, so
every comparison below is exact, ties included. NaN scores: a NaN with the sign bit clear ranks
above ``+inf``, one with the sign bit set below ``-inf`` (as in ``gating._topk_packed``).

Per program: ``BLOCK_M`` consecutive query rows times all ``G = Hq / Hkv`` query heads of one kv
head (``R = BLOCK_M * next_pow2(G)`` rows of keys), streaming the union of its rows' candidate
ranges in tiles of ``BLOCK_N`` blocks; each summary tile is loaded once for the ``G`` heads. The
running top-``(topk - 1)`` of each row lives in registers as ``KP = next_pow2(topk - 1)`` keys.
Two merge strategies (``merge``):

  * ``"insert"``: a tile's keys below the row's current worst kept key are dropped; then, as many
    times as the most candidates left in any row (at most ``topk - 1``), every row moves its best
    remaining candidate into the slot of its worst kept key if it is better. Late tiles usually
    need 0-2 rounds.
  * ``"bitonic"``: ``tl.topk`` of the tile, joined with the kept keys, ``tl.topk`` again.

Output order: each ``[topk - 1]`` row lists the selected blocks by descending score (equal scores:
lower block first), then ``-1`` for missing entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_KEY_MIN = tl.constexpr(-(2**63))
_KEY_MAX = tl.constexpr(2**63 - 1)
# Every real key is at least _KEY_MIN + 2**30 (block ids stay below 2**30); slot sentinels sit at
# _KEY_MIN + slot, so anything above this floor is a real block.
_VALID_FLOOR = tl.constexpr(-(2**63) + 2**29)
MAX_BLOCKS = 2**30


@dataclass(frozen=True)
class GateConfig:
    """Launch parameters of the fused gate. The selection never depends on them (the scores'
    reduction order is fixed); only speed does. The defaults were the fastest of eight measured on
    an H200 (one 512K sequence, chunk 128, topk 8: 446 ms; 32/64/32 with 4 warps: about 13x
    slower)."""

    block_m: int = 16
    block_n: int = 128
    block_d: int = 16
    num_warps: int = 8
    num_stages: int = 1
    merge: str = "insert"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


@triton.jit
def _gate_tile(q_ptr, s_ptr, q_row_off, live, qb, qf, top, start, hi, hk, stride_sn, stride_sh,
               D: tl.constexpr, TOPK1: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               MERGE_BITONIC: tl.constexpr):
    """Scores of one tile of ``BLOCK_N`` candidate blocks from ``start``, merged into ``top``."""
    R: tl.constexpr = top.shape[0]
    KP: tl.constexpr = top.shape[1]
    j = start + tl.arange(0, BLOCK_N)
    j_in = j < hi
    acc = tl.zeros([R, BLOCK_N], tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_in = d < D
        qt = tl.load(q_ptr + q_row_off + d[None, :], mask=live[:, None] & d_in[None, :], other=0.0)
        st = tl.load(s_ptr + j.to(tl.int64)[None, :] * stride_sn + hk * stride_sh + d[:, None],
                     mask=j_in[None, :] & d_in[:, None], other=0.0)
        # ieee: a sequential fp32 FMA chain over d, never TF32 (see the module docstring).
        acc = tl.dot(qt.to(tl.float32), st, acc, input_precision="ieee")
    bits = acc.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 and +0.0 are equal scores
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    rev = (2147483647 - j).to(tl.int64)
    key = (ordered.to(tl.int64) << 32) | rev[None, :]
    valid = (j[None, :] >= qf[:, None]) & (j[None, :] < qb[:, None])
    key = tl.where(valid, key, _KEY_MIN)
    if MERGE_BITONIC:
        tile_top = tl.topk(key, KP, dim=1)
        both = tl.reshape(tl.join(top, tile_top), [R, 2 * KP])
        top = tl.topk(both, KP, dim=1)
    else:
        worst = tl.min(top, 1)
        key = tl.where(key > worst[:, None], key, _KEY_MIN)
        left = tl.sum((key != _KEY_MIN).to(tl.int32), 1)
        rounds = tl.minimum(tl.max(left, 0), TOPK1)
        # A while loop (not range(rounds)): Triton 3.6's interpreter cannot take a tensor bound.
        it = rounds * 0
        while it < rounds:
            best = tl.max(key, 1)
            worst = tl.min(top, 1)
            take = best > worst
            top = tl.where((top == worst[:, None]) & take[:, None], best[:, None], top)
            key = tl.where(key == best[:, None], _KEY_MIN, key)
            it += 1
    return top


@triton.jit
def _gate_topk_kernel(
    q_ptr, s_ptr, qb_ptr, qf_ptr, out_ptr,
    n, n_tiles,
    stride_qn, stride_qh, stride_sn, stride_sh, stride_on, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
    TOPK1: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MERGE_BITONIC: tl.constexpr, WHILE_LOOPS: tl.constexpr,
):
    # Late query tiles see the most blocks: launch them first so the short ones fill the tail.
    tile = n_tiles - 1 - tl.program_id(0)
    hk = tl.program_id(1)
    R: tl.constexpr = BLOCK_M * GP
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
    if WHILE_LOOPS:
        start = lo
        while start < hi:
            top = _gate_tile(q_ptr, s_ptr, q_row_off, live, qb, qf, top, start, hi, hk, stride_sn, stride_sh,
                             D, TOPK1, BLOCK_N, BLOCK_D, MERGE_BITONIC)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            top = _gate_tile(q_ptr, s_ptr, q_row_off, live, qb, qf, top, start, hi, hk, stride_sn, stride_sh,
                             D, TOPK1, BLOCK_N, BLOCK_D, MERGE_BITONIC)

    # Best first: repeatedly take each row's largest key (keys are distinct within a row).
    if not MERGE_BITONIC:
        top = tl.where(slot[None, :] < TOPK1, top, _KEY_MIN)
    out_row = out_ptr + row64 * stride_on + head.to(tl.int64) * stride_oh
    for t in tl.static_range(TOPK1):
        best = tl.max(top, 1)
        low = best.to(tl.int32)  # truncation keeps the reversed block index
        blk = tl.where(best > _VALID_FLOOR, (2147483647 - low).to(tl.int64), -1)
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
        config: launch parameters (speed only; the result does not depend on them).

    Returns:
        ``[n, Hq, max(topk - 1, 0)]`` int64 global block ids by descending score (ties: lower
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
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(f"q: on {q.device}; the kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1")
    if nblocks >= MAX_BLOCKS:
        raise ValueError(f"summaries: {nblocks} blocks, at most {MAX_BLOCKS - 1} supported")
    cfg = config or GateConfig()
    if cfg.merge not in ("insert", "bitonic"):
        raise ValueError(f"config: merge must be 'insert' or 'bitonic', got {cfg.merge!r}")
    topk1 = topk - 1
    out = torch.empty(n, hq, topk1, dtype=torch.int64, device=q.device)
    if n == 0 or topk1 == 0:
        return out
    if nblocks == 0:
        return out.fill_(-1)
    q = q if q.stride(-1) == 1 else q.contiguous()
    summaries = summaries if summaries.stride(-1) == 1 else summaries.contiguous()
    kp = _next_pow2(topk1)
    block_n = max(cfg.block_n, kp, 16)  # tl.topk needs k <= width; tl.dot needs >= 16
    group = hq // hkv
    n_tiles = triton.cdiv(n, cfg.block_m)
    _gate_topk_kernel[(n_tiles, hkv)](
        q, summaries, q_block.contiguous(), q_first_block.contiguous(), out,
        n, n_tiles,
        q.stride(0), q.stride(1), summaries.stride(0), summaries.stride(1),
        out.stride(0), out.stride(1),
        G=group, GP=_next_pow2(group), D=d, TOPK1=topk1, KP=kp,
        BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_D=max(16, min(cfg.block_d, _next_pow2(d))),
        MERGE_BITONIC=cfg.merge == "bitonic",
        # Triton 3.6's interpreter cannot take tensors as range() bounds (numpy 2); GPU code
        # keeps the for loops, which Triton can pipeline.
        WHILE_LOOPS=q.device.type == "cpu",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
