"""MoBA single-token decode over a context-parallel group: the KV cache of every row is sharded
as a context-parallel prefill left it, and each decode step equals :func:`moba_dist.decode.
moba_decode` on the whole cache (docs/semantics.md, "Decoding").

Layout (per rank, W ranks of ``group``): rank ``r`` holds, for each row ``b``, the contiguous
global positions ``[seq_offset[b], seq_offset[b] + cache_seqlens_local[b])`` at local cache
positions ``0 ..``; the slices of a row are disjoint, in rank order, and cover ``[0, L_b)``
(a slice may be empty, and may start or end inside a block). The newest token (position
``L_b - 1``) lives on the last rank whose slice is non-empty; new tokens are appended there.

Block sums (``block_sums_local [B, Nloc, Hkv, D]`` float64): local block ``i`` of row ``b`` is
global block ``seq_offset[b] // chunk + i``, and holds the sum of the keys of that block this
rank holds. A block cut by a slice boundary is scored by the rank that holds its **last**
position, which therefore needs the parts of the earlier ranks: :func:`fold_boundary_sums` adds
them, **once, after the prefill** (one all-gather of ``W x B x Hkv x D`` doubles). Afterwards
only the tail rank's sums change, through ``update_block_sums`` with positions relative to its
first local block (``position - (seq_offset // chunk) * chunk``). Float64 sums of bf16/fp16
keys are exact, so the folded sum is bitwise the single-device one.

The query is **replicated**: every rank passes the same ``q [B, Hq, D]`` (the new token's
hidden state is computed on every rank, as the rest of a context-parallel decode step does);
every rank gets the same output.

Per decode step, three small collectives, none proportional to the context length:

  1. nothing before gating: each rank scores the complete blocks whose last position it holds
     (the training gate's arithmetic: the fixed-order loop of ``gating.gate_scores`` on the CPU,
     the Triton decode gate, which replicates ``gate_topk``, on CUDA) and keeps its best
     ``topk`` (one more than needed: the tail rank cannot tell its own block from a past one
     before it knows the global length);
  2. ``all_gather`` of the local candidates (score, global block id) and of each row's slice
     end: ``W x B x (2 x Hq x topk + 1)`` doubles. Every rank then knows ``L_b``, drops
     candidates at or after the query's own block and merges the rest into the global
     top-(topk-1), ties to the lower block (identical on every rank);
  3. each rank attends over the parts of the selected blocks and of the own block it holds;
     ``all_gather`` of the partial ``(out, lse)``: ``W x B x Hq x (D + 1)`` values in the
     attention dtype, merged by log-sum-exp on every rank.

The local attention gathers the rows it reads (pure PyTorch, float32, float64 for float64
inputs); host syncs: the slice bounds are read once per step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..gating import SUM_DTYPE, block_means, gate_scores, topk_lowest_index_ties
from ..kernels.base import accum_dtype


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


@torch.no_grad()
def fold_boundary_sums(block_sums_local: torch.Tensor, seq_offset: torch.Tensor,
                       cache_seqlens_local: torch.Tensor, moba_chunk_size: int, *,
                       group=None) -> None:
    """Once after a context-parallel prefill: add into this rank's first local block the parts
    of that block held by earlier ranks, so that the rank holding a block's last position has
    its complete sum (in place). One ``all_gather`` of ``B x (Hkv x D + 2)`` doubles per rank.

    Must be called exactly once per prefill (a second call would add the parts again)."""
    chunk = moba_chunk_size
    bsz = block_sums_local.shape[0]
    off = seq_offset.to(block_sums_local.device, torch.int64)
    n = cache_seqlens_local.to(block_sums_local.device, torch.int64)
    first = off // chunk
    last_local = torch.clamp((off + n - 1) // chunk - first, min=0)
    rows = torch.arange(bsz, device=off.device)
    last_part = block_sums_local[rows, last_local].flatten(1)  # [B, Hkv * D]
    msg = torch.cat([last_part, (first + last_local).to(SUM_DTYPE)[:, None],
                     (n > 0).to(SUM_DTYPE)[:, None]], 1)
    parts = _all_gather(msg, group)  # [W, B, Hkv * D + 2]
    rank = dist.get_rank(group)
    earlier = parts[:rank]
    # Earlier ranks whose last block is my first block hold the rest of it (they end before me).
    take = (earlier[..., -1] > 0) & (earlier[..., -2] == first.to(SUM_DTYPE)) & (n > 0)
    add = (earlier[..., :-2] * take[..., None]).sum(0) if rank else torch.zeros_like(last_part)
    block_sums_local[:, 0] += add.view(bsz, *block_sums_local.shape[2:])


def slice_layout(cu_seqlens: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, ...]:
    """How this rank's slice ``[start, end)`` of a packed stream (``cu_seqlens`` int ``[N + 1]``,
    host) lays out as a sharded cache of ``N`` rows, one per sequence. Pure host arithmetic.

    Returns int64 ``[N]`` each: ``seq_offset`` (global position in its sequence of the row's
    first local token; for a sequence that ends before the slice, its length, for one that starts
    after it, 0), ``n`` (tokens of the row in the slice), and bool ``[N]`` ``tail``: this rank
    holds the row's last token, so it is the rank that appends the row's new tokens. The slice's
    tokens are the rows' local tokens row after row."""
    cu = cu_seqlens.to("cpu", torch.int64)
    first, last = cu[:-1], cu[1:]
    lo = first.clamp(min=start, max=end)
    hi = last.clamp(min=start, max=end)
    n = (hi - lo).clamp(min=0)
    seq_offset = torch.where(n > 0, lo - first, torch.where(last <= start, last - first, 0))
    tail = (last - 1 >= start) & (last - 1 < end)
    return seq_offset, n, tail


def _scorable(off: torch.Tensor, n: torch.Tensor, chunk: int) -> torch.Tensor:
    """Local blocks ``[0, count)`` whose last position this rank holds (complete blocks; the
    first one complete only after :func:`fold_boundary_sums`)."""
    return torch.clamp((off + n) // chunk - off // chunk, min=0)


def _candidates_torch(q, sums, count, chunk: int, k: int):
    """Best ``k`` local blocks per (row, head) with the fixed-order CPU gate: ``(scores float64,
    local ids int64, -1 padded)``, each ``[B, Hq, k]``."""
    bsz, hq, d = q.shape
    hkv = sums.shape[2]
    acc = accum_dtype(q.dtype)
    score = torch.full((bsz, hq, k), float("-inf"), dtype=SUM_DTYPE, device=q.device)
    ids = torch.full((bsz, hq, k), -1, dtype=torch.int64, device=q.device)
    for b in range(bsz):
        c = int(count[b])
        if c == 0:
            continue
        means = block_means(sums[b, :c], torch.full((c,), chunk, dtype=torch.int64), acc)
        s = gate_scores(q[b:b + 1].to(acc).view(1, hkv, hq // hkv, d), means).reshape(hq, c)
        kk = min(k, c)
        idx = topk_lowest_index_ties(s, torch.ones_like(s, dtype=torch.bool), kk)
        ids[b, :, :kk] = idx
        score[b, :, :kk] = s.gather(1, idx).to(SUM_DTYPE)
    return score, ids


def _candidates_triton(q, sums, count, chunk: int, k: int):
    """As :func:`_candidates_torch` with the Triton decode gate (the arithmetic of the training
    path's ``gate_topk`` on CUDA): the gate kernel of ``kernels/triton_decode.py`` run on the
    local sums, as if the row's own block were local block ``count``."""
    from ..kernels.triton_decode import DecodeConfig, _launch_gate, _Shapes, top_keys

    bsz, hq, _ = q.shape
    fake_seqlens = (count * chunk + 1).to(torch.int32)
    sz = _Shapes(q, sums.shape[1] * chunk + 1, sums, chunk, k + 1, DecodeConfig())
    cand = _launch_gate(q, fake_seqlens, sums.contiguous(), chunk, sz)
    top, ids = top_keys(cand, k)
    real = ids >= 0
    o = (top >> 32).to(torch.int32)  # the ordered score bits (triton_gate._ordered)
    bits = torch.where(o < 0, o ^ 0x7FFFFFFF, o)
    score = torch.where(real, bits.view(torch.float32).to(SUM_DTYPE), float("-inf"))
    return score, ids


def local_candidates(q, block_sums_local, seq_offset, cache_seqlens_local, chunk: int, topk: int,
                     gate: str = "auto"):
    """This rank's best ``topk`` scorable blocks per (row, head): ``(scores float64 [B, Hq, topk],
    global block ids int64 [B, Hq, topk], -1 padded)``. ``gate``: ``"torch"`` (the CPU gate),
    ``"triton"`` (the decode kernel's gate) or ``"auto"`` (Triton for CUDA float32-class
    summaries, as ``gating.select_blocks`` does)."""
    off = seq_offset.to(torch.int64).cpu()
    count = _scorable(off, cache_seqlens_local.to(torch.int64).cpu(), chunk)
    if gate == "auto":
        gate = "triton" if q.is_cuda and q.dtype != torch.float64 else "torch"
    fn = _candidates_triton if gate == "triton" else _candidates_torch
    score, ids = fn(q, block_sums_local, count.to(q.device), chunk, topk)
    first = (off // chunk).to(q.device)[:, None, None]
    return score, torch.where(ids >= 0, ids + first, -1)


def merge_candidates(scores: torch.Tensor, ids: torch.Tensor, own_block: torch.Tensor,
                     topk: int) -> torch.Tensor:
    """Global top-(topk-1) from every rank's candidates ``[W, B, Hq, K]`` (scores, global ids):
    those before the own block ``own_block [B]``, best score first, ties to the lower block.
    Returns ``[B, Hq, topk - 1]`` global ids, ``-1`` padded (the same on every rank)."""
    w, bsz, hq, k = scores.shape
    s = scores.permute(1, 2, 0, 3).reshape(bsz, hq, w * k)
    j = ids.permute(1, 2, 0, 3).reshape(bsz, hq, w * k)
    valid = (j >= 0) & (j < own_block.to(j.device)[:, None, None])
    # Candidates in block order, so "ties to the lower index" is "ties to the lower block".
    order = torch.where(valid, j, torch.iinfo(torch.int64).max).argsort(dim=-1, stable=True)
    s, j, valid = s.gather(-1, order), j.gather(-1, order), valid.gather(-1, order)
    kk = min(topk - 1, w * k)
    sel = torch.full((bsz, hq, topk - 1), -1, dtype=torch.int64, device=scores.device)
    if kk > 0:
        idx = topk_lowest_index_ties(s, valid, kk)
        sel[..., :kk] = torch.where(idx >= 0, j.gather(-1, idx.clamp_min(0)), -1)
    return sel


def local_attention(q, k_cache, v_cache, seq_offset, cache_seqlens_local, sel, query_pos,
                    chunk: int, scale: float):
    """Partial attention of the query over the keys this rank holds among its selection: the
    selected blocks ``sel [B, Hq, topk-1]`` and the own block up to ``query_pos [B]``. Returns
    ``out [B, Hq, D]`` and ``lse [B, Hq]`` in the attention dtype (``-inf``, 0: nothing here)."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    acc = accum_dtype(q.dtype)
    dev = q.device
    t = query_pos.to(dev, torch.int64)
    own = t // chunk
    off = seq_offset.to(dev, torch.int64)[:, None, None, None]
    n = cache_seqlens_local.to(dev, torch.int64)[:, None, None, None]
    blocks = torch.cat([sel, own[:, None, None].expand(bsz, hq, 1)], -1)
    pos = blocks[..., None] * chunk + torch.arange(chunk, device=dev)
    p = pos - off
    valid = (blocks[..., None] >= 0) & (pos <= t[:, None, None, None]) & (p >= 0) & (p < n)
    p = torch.where(valid, p, 0).flatten(2)
    valid = valid.flatten(2)
    kv_head = (torch.arange(hq, device=dev) // (hq // hkv))[None, :, None]
    rows = torch.arange(bsz, device=dev)[:, None, None]
    keys = k_cache[rows, p, kv_head].to(acc)
    vals = v_cache[rows, p, kv_head].to(acc)
    s = (torch.einsum("bhd,bhsd->bhs", q.to(acc), keys) * scale).masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(s, -1)
    prob = torch.exp(s - torch.where(lse.isfinite(), lse, 0.0)[..., None])
    return torch.einsum("bhs,bhsd->bhd", prob, vals), lse


def local_dense_attention(q, k_cache, v_cache, cache_seqlens_local, scale: float):
    """Partial exact attention of the query over every key this rank holds (a full-attention
    layer of a hybrid schedule): ``out [B, Hq, D]``, ``lse [B, Hq]`` as :func:`local_attention`."""
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    acc = accum_dtype(q.dtype)
    qg = q.to(acc).view(bsz, hkv, hq // hkv, d)
    s = torch.einsum("bkgd,blkd->bkgl", qg, k_cache.to(acc)) * scale
    stored = torch.arange(k_cache.shape[1], device=q.device) < cache_seqlens_local.to(q.device)[:, None]
    s = s.masked_fill(~stored[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    prob = torch.exp(s - torch.where(lse.isfinite(), lse, 0.0)[..., None])
    out = torch.einsum("bkgl,blkd->bkgd", prob, v_cache.to(acc))
    return out.reshape(bsz, hq, -1), lse.reshape(bsz, hq)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Log-sum-exp merge of ``out [W, B, Hq, D]``, ``lse [W, B, Hq]`` over ranks (rank order)."""
    m = lse.max(0).values
    w = torch.where(lse.isfinite(), torch.exp(lse - m), 0.0)
    return (w[..., None] * out).sum(0) / w.sum(0)[..., None]


@torch.no_grad()
def moba_decode_cp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   cache_seqlens_local: torch.Tensor, block_sums_local: torch.Tensor,
                   seq_offset: torch.Tensor, moba_chunk_size: int, moba_topk: int, *, group=None,
                   softmax_scale: float | None = None) -> torch.Tensor:
    """MoBA decode of the newest token of each row against a KV cache sharded over ``group``.

    Args:
        q: ``[B, Hq, D]``, the same on every rank (replicated).
        k_cache, v_cache: ``[B, Lloc, Hkv, D]``, this rank's slice of every row.
        cache_seqlens_local: ``[B]`` int, tokens this rank holds per row (may be 0).
        block_sums_local: ``[B, Nloc, Hkv, D]`` float64, local block ``i`` = global block
            ``seq_offset // chunk + i``, folded once after the prefill (:func:`fold_boundary_sums`).
        seq_offset: ``[B]`` int, global position of this rank's local position 0 per row (for an
            empty slice: any position ``<=`` the row's length, e.g. where it would begin).
        moba_chunk_size, moba_topk, softmax_scale: as in :func:`moba_dist.decode.moba_decode`.

    Returns:
        ``[B, Hq, D]`` in q's dtype on every rank: :func:`moba_dist.decode.moba_decode` of the
        whole cache (the selection bitwise; the output to rounding). Communicated: two
        ``all_gather`` calls (see the module docstring), nothing proportional to the context.
    """
    bsz, hq, d = q.shape
    chunk, topk = moba_chunk_size, moba_topk
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    dev = q.device
    off = seq_offset.to(dev, torch.int64)
    end = off + cache_seqlens_local.to(dev, torch.int64)
    k = max(topk, 1)
    if topk > 1:
        score, ids = local_candidates(q, block_sums_local, seq_offset, cache_seqlens_local, chunk, k)
    else:
        score = torch.zeros(bsz, hq, 0, dtype=SUM_DTYPE, device=dev)
        ids = torch.zeros(bsz, hq, 0, dtype=torch.int64, device=dev)
    # ids < 2**53 travel exactly as doubles, scores (float32 or float64 values) too.
    msg = torch.cat([score.flatten(1), ids.to(SUM_DTYPE).flatten(1), end.to(SUM_DTYPE)[:, None]], 1)
    got = _all_gather(msg, group)  # [W, B, 2 * Hq * K + 1]
    w = got.shape[0]
    kk = score.shape[-1]
    length = got[..., -1].max(0).values.to(torch.int64)  # [B] global row lengths
    own = (length - 1) // chunk
    if topk > 1:
        all_scores = got[..., :hq * kk].view(w, bsz, hq, kk)
        all_ids = got[..., hq * kk:2 * hq * kk].view(w, bsz, hq, kk).to(torch.int64)
        sel = merge_candidates(all_scores, all_ids, own, topk)
    else:
        sel = torch.zeros(bsz, hq, 0, dtype=torch.int64, device=dev)
    out, lse = local_attention(q, k_cache, v_cache, seq_offset, cache_seqlens_local, sel,
                               length - 1, chunk, scale)
    return _gather_merge(out, lse, group).to(q.dtype)


def _gather_merge(out: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    d = out.shape[-1]
    parts = _all_gather(torch.cat([out, lse[..., None]], -1), group)  # [W, B, Hq, D + 1]
    return merge_partials(parts[..., :d], parts[..., d])


@torch.no_grad()
def dense_decode_cp(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens_local: torch.Tensor, *, group=None,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Exact attention of the newest token of each row over a cache sharded over ``group`` (the
    full-attention layers of a hybrid schedule): ``q [B, Hq, D]`` replicated, ``k_cache, v_cache
    [B, Lloc, Hkv, D]`` and ``cache_seqlens_local [B]`` as in :func:`moba_decode_cp` -> ``[B, Hq,
    D]`` in q's dtype on every rank. Communicated: one ``all_gather`` of ``W x B x Hq x (D + 1)``
    values."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out, lse = local_dense_attention(q, k_cache, v_cache, cache_seqlens_local, scale)
    return _gather_merge(out, lse, group).to(q.dtype)


__all__ = ["dense_decode_cp", "fold_boundary_sums", "local_attention", "local_candidates",
           "local_dense_attention", "merge_candidates", "merge_partials", "moba_decode_cp",
           "slice_layout"]
