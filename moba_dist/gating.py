"""MoBA gating as pure tensor functions: block summaries and top-k block selection.

Semantics (docs/semantics.md): the summary of a block is the mean of its keys per kv head (summed
in float64, which is exact for bf16/fp16 keys, then rounded once to float32); query ``i``
scores every strictly past block of its own sequence by ``<q_i, mean(K_j)>`` (no softmax scale,
no gradient) and keeps the ``topk - 1`` best, ties going to the lower block index; its current
block is always added separately by the attention.
"""

from __future__ import annotations

import torch

SUM_TILE_ELEMS = 1 << 27  # key elements gathered per summary tile
SUM_DTYPE = torch.float64  # block key sums: exact (hence order-free) for bf16/fp16 keys


@torch.no_grad()
def block_part_sums(k: torch.Tensor, part_start: torch.Tensor, part_len: torch.Tensor,
                    max_len: int) -> torch.Tensor:
    """Sum of key rows over each part ``[part_start[p], part_start[p] + part_len[p])`` of ``k``.

    Args:
        k: ``[n, Hkv, D]`` local keys.
        part_start, part_len: ``[P]`` int64 on ``k``'s device, rows local to ``k``.
        max_len: host bound on ``part_len`` (the block size).

    Returns:
        ``[P, Hkv, D]`` float64. A bf16/fp16 key has at most 11 significant bits, so float64 sums
        of up to millions of them are exact: a block's sum is the same bitwise however the block
        is split into parts (across ranks) and in whatever order the parts are added. float32
        keys are exact too unless one block's keys span more than about 2^29 in magnitude.
    """
    n_parts = part_start.numel()
    out = torch.zeros(n_parts, *k.shape[1:], dtype=SUM_DTYPE, device=k.device)
    if n_parts == 0 or max_len == 0:
        return out
    ar = torch.arange(max_len, device=k.device)
    step = max(1, SUM_TILE_ELEMS // (max_len * k.shape[1] * k.shape[2]))
    for a in range(0, n_parts, step):
        rows = part_start[a:a + step, None] + ar
        valid = ar < part_len[a:a + step, None]
        gathered = k[torch.where(valid, rows, 0)].to(SUM_DTYPE)
        out[a:a + step] = (gathered * valid[..., None, None]).sum(1)
    return out


def block_means(sums: torch.Tensor, lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N, Hkv, D]`` block means in the gate dtype from float64 block ``sums`` and ``lengths``
    (one division in float64, one rounding)."""
    return (sums / lengths.to(sums.device, sums.dtype)[:, None, None]).to(dtype)


def gate_tile_elems(budget: int, dtype: torch.dtype) -> int:
    """Score elements per gating tile within ``budget`` bytes: the scores, their product buffer,
    the validity mask and the packed int64 top-k keys (``3 * 8 + 1`` bytes per float32 score;
    the CUDA fallback's float64 scores take about as much)."""
    per = 3 * max(torch.empty(0, dtype=dtype).element_size(), 8) + 1
    return max(1 << 12, budget // per)


def gate_tiles(layout, q_begin: int, n: int, num_heads: int,
               max_elems: int = 1 << 24) -> list[tuple[int, int, int, int]]:
    """Host plan of gating tiles for the local query rows ``[0, n)`` at global positions
    ``q_begin + row``: a list of ``(row_a, row_b, block_lo, block_hi)`` where the tile's queries
    may only pick blocks in ``[block_lo, block_hi)``. Tiles with no candidate are left out."""
    if n == 0:
        return []
    blk = layout.block_of(torch.tensor([q_begin, q_begin + n - 1]))
    widest = int((torch.arange(int(blk[0]), int(blk[1]) + 1)
                  - layout.first_block[int(blk[0]):int(blk[1]) + 1]).max())
    step = max(layout.chunk, max_elems // (num_heads * max(widest, 1)))
    starts = torch.arange(0, n, step)
    stops = torch.clamp(starts + step, max=n)
    first_blk = layout.block_of(q_begin + starts)
    lo = layout.first_block[first_blk]
    hi = layout.block_of(q_begin + stops - 1)
    keep = hi > lo
    return [tuple(t) for t in torch.stack([starts, stops, lo, hi], 1)[keep].tolist()]


def topk_lowest_index_ties(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` along the last dim among ``valid`` entries, ties
    broken toward the lower index; ``-1`` pads rows with fewer than ``k`` valid entries.

    ``torch.topk`` does not promise which of equal values it returns. For float32 scores the
    score's order-preserving bit pattern and the reversed index are packed into one int64 key, so
    a single ``topk`` is exact; other dtypes take the k-th value from ``topk`` and choose among
    entries equal to it by position.
    """
    if scores.dtype == torch.float32:
        return _topk_packed(scores, valid, k)
    scores = scores.masked_fill(~valid, float("-inf"))
    kth = scores.topk(k, dim=-1).values[..., -1:]
    above = scores > kth
    tied = (scores == kth) & valid
    room = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(-1) <= room))
    # Compact chosen positions into k slots in index order; unchosen go to a dummy slot k.
    slot = torch.where(chosen, chosen.cumsum(-1) - 1, k)
    idx = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    out = torch.full((*scores.shape[:-1], k + 1), -1, dtype=torch.int64, device=scores.device)
    return out.scatter_(-1, slot, idx)[..., :k]


_INT64_MIN = -(2**63)


def _topk_packed(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    width = scores.shape[-1]
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal scores, equal bits
    # Negative floats order backwards as signed ints; flipping their magnitude bits fixes that.
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    rev = width - 1 - torch.arange(width, device=scores.device)
    key = torch.where(valid, (bits << 32) | rev, _INT64_MIN)
    top = key.topk(k, dim=-1).values
    return torch.where(top > _INT64_MIN, width - 1 - (top & 0xFFFFFFFF), -1)


def gate_scores(qt: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``s[t, g, c, r] = sum_d qt[t, g, c, d] * means[r, g, d]`` with a fixed summation order.

    ``qt [t, Hkv, G, D]`` and ``means [r, Hkv, D]`` in the gate dtype. The sum runs over ``d`` in
    increasing order with one rounded multiply and one rounded add per term (separate elementwise
    kernels, so no fused multiply-add and no reordering by a GEMM library or by TF32), which
    makes every score a function of its own query and block alone, whatever the tile shape.
    That costs ``D`` passes over the tile: this is the CPU path; CUDA uses the Triton kernel.
    """
    m = means.permute(2, 1, 0)[:, None, :, None, :]  # [D, 1, Hkv, 1, r]
    s = qt[..., 0, None] * m[0]
    prod = torch.empty_like(s)
    for d in range(1, qt.shape[-1]):
        torch.mul(qt[..., d, None], m[d], out=prod)
        s.add_(prod)
    return s


def _triton_gate(gate: str):
    """The fused Triton gate + top-k (``gate="auto"``), or None for ``"torch"`` or when Triton
    (or a GPU for it) is missing."""
    if gate == "torch":
        return None
    try:
        from .kernels.triton_gate import gate_topk
    except Exception:  # ImportError, or a Triton that cannot build for this machine
        return None
    return gate_topk


@torch.no_grad()
def select_blocks(q: torch.Tensor, summaries: torch.Tensor, q_block: torch.Tensor,
                  q_first_block: torch.Tensor, topk: int, tiles, gate: str = "auto") -> torch.Tensor:
    """Top-(topk-1) past blocks of every local query and head.

    Args:
        q: ``[n, Hq, D]`` local queries.
        summaries: ``[N, Hkv, D]`` block means of the whole stream, in the gate dtype (float32,
            float64 for float64 inputs).
        q_block, q_first_block: ``[n]`` int64 device tensors, each query's current block and the
            first block of its sequence (global ids).
        topk: MoBA's top-k, counting the current block.
        tiles: from :func:`gate_tiles` (the pure-PyTorch path's tiling).
        gate: ``"auto"`` (the fused Triton gate on CUDA) or ``"torch"`` (:attr:`moba_dist.Settings.gate`).

    Returns:
        ``[n, Hq, topk - 1]`` int32 global block ids, ``-1`` where a query has fewer past blocks.
        Which blocks are chosen depends on each query's own scores only (see
        :func:`gate_scores`), never on ``n``, the tiling or the slicing.
    """
    n, hq, d = q.shape
    hkv = summaries.shape[1]
    sel = torch.full((n, hq, max(topk - 1, 0)), -1, dtype=torch.int32, device=q.device)
    if topk <= 1 or n == 0:
        return sel
    fused = _triton_gate(gate) if q.is_cuda and summaries.dtype == torch.float32 else None
    if fused is not None:
        return fused(q, summaries, q_block, q_first_block, topk)
    acc = summaries.dtype
    for a, b, lo, hi in tiles:
        qt = q[a:b].to(acc).view(b - a, hkv, hq // hkv, d)
        if q.is_cuda and acc == torch.float32:
            # Without Triton: float64 products of bf16/fp16/fp32 inputs are exact and their sum
            # is within an ulp of float64, so rounding to float32 gives the correctly rounded
            # score but for ~2^-22 of ties of rounding: fast (a float64 GEMM, never TF32), not
            # provably order-free like the Triton kernel or the CPU loop below.
            s = torch.einsum("tkgd,rkd->tkgr", qt.double(), summaries[lo:hi].double()).float()
        else:
            s = gate_scores(qt, summaries[lo:hi])
        s = s.reshape(b - a, hq, hi - lo)
        j = torch.arange(lo, hi, device=q.device)
        valid = (j >= q_first_block[a:b, None]) & (j < q_block[a:b, None])
        kk = min(topk - 1, hi - lo)
        idx = topk_lowest_index_ties(s, valid[:, None, :].expand_as(s), kk)
        sel[a:b, :, :kk] = torch.where(idx >= 0, idx + lo, -1)
    return sel
