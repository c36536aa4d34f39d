"""MoBA decoding: one new query per row against a KV cache, in pure PyTorch.

A decode step for the newest token ``t = cache_seqlens[b] - 1`` of row ``b`` is row ``t`` of the
training-time MoBA (docs/semantics.md, "Decoding"): the gate scores the means of the complete
past blocks ``j < t // chunk`` with ``moba_dist.gating`` (same summaries, same fixed summation
order, same tie rule, so the selection is bitwise that of ``select_blocks``), keeps the
``topk - 1`` best, and the query attends to those blocks plus its own block up to itself.

This module is the CPU path and the reference twin of the Triton kernel
(``moba_dist/kernels/triton_decode.py``). It makes host syncs (it reads ``cache_seqlens``) and
gathers the selected keys: simple, not fast.

Shapes and dtypes (B rows, Hq query heads, Hkv kv heads, D head dim, Lmax cache capacity):

  * ``q [B, Hq, D]``; ``k_cache, v_cache [B, Lmax, Hkv, D]``; ``cache_seqlens`` int32 ``[B]``;
  * ``block_sums [B, Nmax, Hkv, D]`` float64 running key sums per block (``Nmax >= ceil(Lmax /
    chunk)``), kept by the cache with :func:`update_block_sums`; only complete blocks are read.
"""

from __future__ import annotations

import torch

from .gating import SUM_DTYPE, block_means, select_blocks
from .kernels.base import accum_dtype


def _check(q, k_cache, v_cache, cache_seqlens, block_sums, chunk, topk) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"q [B, Hq, D], k_cache = v_cache [B, Lmax, Hkv, D]: got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != d or hq % k_cache.shape[2] != 0:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cache_seqlens: expected int32 [{b}], got {tuple(cache_seqlens.shape)} "
                         f"{cache_seqlens.dtype}")
    if block_sums.dim() != 4 or block_sums.shape[0] != b or block_sums.shape[2:] != k_cache.shape[2:]:
        raise ValueError(f"block_sums: expected [{b}, Nmax, {k_cache.shape[2]}, {d}], got "
                         f"{tuple(block_sums.shape)}")
    if block_sums.dtype != SUM_DTYPE:
        raise TypeError(f"block_sums: expected float64, got {block_sums.dtype}")
    for name, val in (("moba_chunk_size", chunk), ("moba_topk", topk)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: must be a positive int, got {val!r}")


@torch.no_grad()
def decode_selection(q: torch.Tensor, block_sums: torch.Tensor, own_block: torch.Tensor,
                     moba_chunk_size: int, moba_topk: int) -> torch.Tensor:
    """Selected past blocks ``[B, Hq, topk - 1]`` (int64 block ids within the row, ``-1`` for
    none) of queries ``q [B, Hq, D]`` whose own block is ``own_block [B]`` (int64, host).

    Row ``b``'s candidates are its blocks ``[0, own_block[b])``, all complete. The rows' block
    means are laid out as one stream of ``B * n`` blocks (``n = max(own_block)``), so this is
    :func:`moba_dist.gating.select_blocks` itself, with the gate the training path uses on this
    device and dtype (Triton's ``gate_topk`` on CUDA for float32 summaries, the fixed-order loop
    on the CPU)."""
    bsz, hq, d = q.shape
    hkv = block_sums.shape[2]
    n = int(own_block.max()) if bsz else 0
    sel = torch.full((bsz, hq, max(moba_topk - 1, 0)), -1, dtype=torch.int64, device=q.device)
    if moba_topk <= 1 or n == 0:
        return sel
    sums = block_sums[:, :n].reshape(bsz * n, hkv, d)
    lengths = torch.full((bsz * n,), moba_chunk_size, dtype=torch.int64)
    summaries = block_means(sums, lengths, accum_dtype(q.dtype))
    base = torch.arange(bsz, dtype=torch.int64) * n
    q_block = (base + own_block).to(q.device)
    q_first = base.to(q.device)
    tiles = [(b, b + 1, b * n, b * n + int(own_block[b])) for b in range(bsz) if int(own_block[b]) > 0]
    flat = select_blocks(q, summaries, q_block, q_first, moba_topk, tiles)
    return torch.where(flat >= 0, flat - q_first[:, None, None], -1)


@torch.no_grad()
def moba_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                cache_seqlens: torch.Tensor, block_sums: torch.Tensor, moba_chunk_size: int,
                moba_topk: int, *, softmax_scale: float | None = None) -> torch.Tensor:
    """MoBA attention of the newest token of each row against its cache (pure PyTorch).

    Args:
        q: ``[B, Hq, D]``, the query of the newest token of each row (one per row).
        k_cache, v_cache: ``[B, Lmax, Hkv, D]``; row ``b`` holds its tokens at positions
            ``0 .. cache_seqlens[b] - 1``, the newest (the query's own key/value) included.
        cache_seqlens: int32 ``[B]``, each ``>= 1``.
        block_sums: ``[B, Nmax, Hkv, D]`` float64 key sums of the blocks ``[j*chunk,
            (j+1)*chunk)``; entries of incomplete blocks are ignored.
        moba_chunk_size, moba_topk: MoBA's block size and top-k (counting the own block).
        softmax_scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, Hq, D]`` in q's dtype: for each row, row ``t = cache_seqlens[b] - 1`` of
        ``moba_attn_varlen`` on that row's sequence. Attention runs in float32 (float64 for
        float64 inputs). Host syncs: ``cache_seqlens`` is read once.
    """
    _check(q, k_cache, v_cache, cache_seqlens, block_sums, moba_chunk_size, moba_topk)
    bsz, hq, d = q.shape
    hkv = k_cache.shape[2]
    chunk = moba_chunk_size
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    acc = accum_dtype(q.dtype)
    dev = q.device
    t = cache_seqlens.to("cpu", torch.int64) - 1
    if bool((t < 0).any()) or bool((t >= k_cache.shape[1]).any()):
        raise ValueError(f"cache_seqlens: must be in [1, {k_cache.shape[1]}], got {cache_seqlens.tolist()}")
    own = t // chunk
    sel = decode_selection(q, block_sums, own, chunk, moba_topk)  # [B, Hq, topk - 1]

    # Key positions each (row, head) reads: the selected blocks, then its own block up to t.
    ar = torch.arange(chunk, device=dev)
    own_d, t_d = own.to(dev), t.to(dev)
    blocks = torch.cat([sel, own_d[:, None, None].expand(bsz, hq, 1)], -1)  # [B, Hq, topk]
    pos = blocks[..., None] * chunk + ar  # [B, Hq, topk, chunk]
    valid = (blocks[..., None] >= 0) & (pos <= t_d[:, None, None, None])
    pos = torch.where(valid, pos, 0).flatten(2)
    valid = valid.flatten(2)
    kv_head = torch.arange(hq, device=dev) // (hq // hkv)
    rows = torch.arange(bsz, device=dev)[:, None, None]
    keys = k_cache[rows, pos, kv_head[None, :, None]].to(acc)  # [B, Hq, S, D]
    vals = v_cache[rows, pos, kv_head[None, :, None]].to(acc)
    s = torch.einsum("bhd,bhsd->bhs", q.to(acc), keys) * scale
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p, vals).to(q.dtype)


@torch.no_grad()
def update_block_sums(block_sums: torch.Tensor, k_new: torch.Tensor, positions: torch.Tensor,
                      chunk: int) -> None:
    """Add appended keys into the running float64 block sums, in place (no host sync, CUDA-graph
    safe).

    Args:
        block_sums: ``[B, Nmax, Hkv, D]`` float64.
        k_new: ``[B, S, Hkv, D]``, the keys appended to each row.
        positions: ``[B, S]`` int64 cache position of each appended key, ``-1`` to skip (padding).
        chunk: MoBA's block size; key at position ``p`` goes to block ``p // chunk``.

    For bf16/fp16 keys (float32 too, unless one block's keys span about 2**29 in magnitude) the
    float64 sums are exact, so they are bitwise the sums the training path computes in one go,
    whatever order keys arrive in. float64 keys are summed in arrival order and may differ from
    a one-shot sum in the last bits. Skipped entries add ``+0.0`` to block 0 of their row, which
    leaves every sum unchanged.
    """
    bsz, nmax = block_sums.shape[:2]
    if k_new.dim() != 4 or k_new.shape[0] != bsz or k_new.shape[2:] != block_sums.shape[2:]:
        raise ValueError(f"k_new: expected [{bsz}, S, Hkv, D] fitting block_sums "
                         f"{tuple(block_sums.shape)}, got {tuple(k_new.shape)}")
    if block_sums.dtype != SUM_DTYPE or not block_sums.is_contiguous():
        raise ValueError("block_sums: must be a contiguous float64 tensor (updated in place)")
    if positions.shape != k_new.shape[:2]:
        raise ValueError(f"positions: expected {tuple(k_new.shape[:2])}, got {tuple(positions.shape)}")
    keep = positions >= 0
    blk = torch.where(keep, positions, 0) // chunk
    flat = (torch.arange(bsz, device=positions.device)[:, None] * nmax + blk).flatten()
    vals = torch.where(keep[..., None, None], k_new.to(block_sums.dtype), 0.0)
    block_sums.view(bsz * nmax, *block_sums.shape[2:]).index_put_(
        (flat.to(block_sums.device),), vals.flatten(0, 1), accumulate=True)


__all__ = ["decode_selection", "moba_decode", "update_block_sums"]
