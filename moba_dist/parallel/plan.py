"""Context-parallel planning: pure functions from layout and selections to index tensors.

Rank ``r`` holds global tokens ``[offsets[r], offsets[r+1])``. After gating, rank ``r`` needs
the key/value rows of

  * every (kv head ``g``, block ``j``) some local query selected as a past block, and
  * the causal prefix of its first block when that block began on an earlier rank (all heads),

that live on *earlier* ranks (a past block, and a current block's prefix, never live on a later
rank). ``need[r, g, j]`` (the selections, exchanged once) lets every rank derive every rank's
requests, so send and receive sizes agree by construction and no separate request round trip is
needed.

Row numbering: each rank keeps its K and V *head-major*, ``kv_local[g * n + t]`` for local token
``t`` of head ``g``, so every (head, block part) is a contiguous range. The all-to-all sends, per
destination, the needed ranges in ``(g, j)`` order. The receiving rank's *pool* is
``cat(received rows, kv_local)``; the plan says which pool ranges form each attention segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..blocks import BlockLayout


def expand_ranges(starts: torch.Tensor, lengths: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Concatenate ``arange(s, s + l)`` over ranges; ``total`` (= ``lengths.sum()``) avoids a sync."""
    if total is None:
        total = int(lengths.sum())
    begin = torch.cumsum(lengths, 0) - lengths
    base = torch.repeat_interleave(starts - begin, lengths, output_size=total)
    return base + torch.arange(total, device=starts.device)


@dataclass(frozen=True)
class LocalPlan:
    """Data-independent part of a rank's plan (from the layout and slice offsets only)."""

    rank: int
    offsets: torch.Tensor  # [W + 1] slice boundaries
    part_block: torch.Tensor  # [P] global block of each local block part, ascending
    part_start: torch.Tensor  # [P] local row where the part begins
    part_len: torch.Tensor  # [P]
    prefix_block: int  # block whose causal prefix lies on earlier ranks, or -1
    prefix_len: int  # rows of that prefix

    @property
    def begin(self) -> int:
        return int(self.offsets[self.rank])

    @property
    def n(self) -> int:
        return int(self.offsets[self.rank + 1] - self.offsets[self.rank])


def local_plan(layout: BlockLayout, offsets: torch.Tensor, rank: int) -> LocalPlan:
    offsets = offsets.to(torch.int64)
    a, b = int(offsets[rank]), int(offsets[rank + 1])
    ov = layout.overlap(offsets[rank:rank + 2])[0]
    part_block = torch.nonzero(ov).flatten()
    part_start = layout.start[part_block].clamp_min(a) - a
    prefix_block, prefix_len = -1, 0
    if b > a:
        first = int(layout.block_of(torch.tensor(a)))
        if int(layout.start[first]) < a:
            prefix_block, prefix_len = first, a - int(layout.start[first])
    return LocalPlan(rank, offsets, part_block, part_start, ov[part_block], prefix_block, prefix_len)


@dataclass(frozen=True)
class StreamPlan:
    """Everything that depends on ``(cu_seqlens, slice offsets, chunk)`` alone: the block layout
    and every rank's :class:`LocalPlan`. Computed once per distinct layout and reused by every
    layer (see :func:`stream_plan`)."""

    layout: BlockLayout
    offsets: torch.Tensor
    ranks: tuple[LocalPlan, ...]
    device_cache: dict = field(default_factory=dict, compare=False, repr=False)


_STREAM_CACHE: dict[tuple, StreamPlan] = {}
_STREAM_CACHE_SIZE = 16


def stream_plan(cu_seqlens: torch.Tensor, offsets: torch.Tensor, chunk: int) -> StreamPlan:
    """Cached :class:`StreamPlan` for host int64 ``cu_seqlens``/``offsets``.

    The key is the values themselves (a few hundred bytes to hash), so a model's layers, which
    all see the same batch, plan once per step; the cache keeps the last 16 layouts."""
    key = (cu_seqlens.numpy().tobytes(), offsets.numpy().tobytes(), chunk)
    hit = _STREAM_CACHE.get(key)
    if hit is None:
        layout = BlockLayout.build(cu_seqlens, chunk)
        ranks = tuple(local_plan(layout, offsets, r) for r in range(offsets.numel() - 1))
        hit = StreamPlan(layout, offsets.clone(), ranks)
        if len(_STREAM_CACHE) >= _STREAM_CACHE_SIZE:
            _STREAM_CACHE.pop(next(iter(_STREAM_CACHE)))
        _STREAM_CACHE[key] = hit
    return hit


def remote_need(layout: BlockLayout, offsets: torch.Tensor, need: torch.Tensor,
                plans: tuple[LocalPlan, ...] | None = None) -> torch.Tensor:
    """``[W, Hkv, N]``: (head, block) rows each rank must fetch from earlier ranks: its selected
    past blocks plus, for every head, the block holding its causal prefix."""
    out = need.clone()
    for r in range(need.shape[0]):
        p = plans[r] if plans is not None else local_plan(layout, offsets, r)
        if p.prefix_block >= 0:
            out[r, :, p.prefix_block] = True
    return out


@dataclass(frozen=True)
class FetchPlan:
    """What rank ``rank`` sends, receives, and how it assembles attention segments.

    Row lists are kept as runs ``(start, length)`` (a few per segment) rather than expanded row
    by row: the pipeline expands them on the device, so the host neither builds nor uploads a
    table with one entry per key row. The ``*_index`` properties expand them on the host.
    """

    send_splits: list[int]  # rows to each destination
    recv_splits: list[int]  # rows from each source
    send_start: torch.Tensor  # [runs] local head-major rows to send, in destination order
    send_len: torch.Tensor
    seg_head: torch.Tensor  # [S] kv head of each past segment, (g, j) order
    seg_block: torch.Tensor  # [S] global block of each past segment
    seg_len: torch.Tensor  # [S] rows of each past segment (its block length)
    piece_seg: torch.Tensor  # [pieces] segment of each pool run, by segment then source
    piece_start: torch.Tensor  # [pieces] first pool row of the run
    piece_len: torch.Tensor
    prefix_start: torch.Tensor  # [Hkv, runs] pool runs of the causal prefix, by source
    prefix_len: torch.Tensor  # [runs] (the same for every head)
    recv_items: int  # (head, block) items received from other ranks

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_splits)

    @property
    def send_index(self) -> torch.Tensor:
        """``[sum(send_splits)]`` local head-major rows to send, in destination order."""
        return expand_ranges(self.send_start, self.send_len)

    @property
    def seg_index(self) -> torch.Tensor:
        """``[sum(seg_len)]`` pool rows of the past segments, in segment order."""
        return expand_ranges(self.piece_start, self.piece_len)

    @property
    def prefix_index(self) -> torch.Tensor:
        """``[Hkv, prefix length]`` pool rows of the causal prefix, head-major."""
        hkv = self.prefix_start.shape[0]
        return torch.stack([expand_ranges(self.prefix_start[g], self.prefix_len) for g in range(hkv)]) \
            if hkv else torch.zeros(0, 0, dtype=torch.int64)


def fetch_plan(layout: BlockLayout, offsets: torch.Tensor, need: torch.Tensor, rank: int,
               plans: tuple[LocalPlan, ...] | None = None) -> FetchPlan:
    """Plan rank ``rank``'s all-to-all and segment assembly.

    Args:
        layout: block layout of the whole stream.
        offsets: ``[W + 1]`` slice boundaries.
        need: ``[W, Hkv, N]`` bool, ``need[w, g, j]``: a query of rank ``w`` in a head of group
            ``g`` selected past block ``j``. Identical on every rank.
        rank: this rank.
        plans: every rank's :class:`LocalPlan` when already known (:func:`stream_plan`).

    Returns:
        A :class:`FetchPlan` (host int64 tensors).
    """
    offsets = offsets.to(torch.int64)
    world, hkv, _ = need.shape
    lens = offsets.diff()
    ov = layout.overlap(offsets)  # [W, N]
    rneed = remote_need(layout, offsets, need, plans)
    me = rank

    def requested(dst: int, src: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(g, j) items dst fetches from src, in (g, j) order; empty unless src < dst."""
        if src >= dst:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        g, j = torch.nonzero(rneed[dst] & (ov[src] > 0)[None, :], as_tuple=True)
        return g, j

    def ranges_on(src: int, g: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-major local rows of (g, j) items on rank src, as (start, length)."""
        first = layout.start[j].clamp_min(offsets[src]) - offsets[src]
        return g * lens[src] + first, ov[src, j]

    send_starts, send_lens, send_splits = [], [], []
    for dst in range(world):
        s, ln = ranges_on(me, *requested(dst, me))
        send_starts.append(s)
        send_lens.append(ln)
        send_splits.append(int(ln.sum()))

    # Where each fetched (g, j) item starts in the receive buffer, per source.
    recv_splits, recv_pos, recv_items = [], [], set()
    base = 0
    for src in range(world):
        g, j = requested(me, src)
        recv_items.update(zip(g.tolist(), j.tolist()))
        ln = ov[src, j]
        pos = torch.full((hkv, layout.num_blocks), -1, dtype=torch.int64)
        pos[g, j] = base + torch.cumsum(ln, 0) - ln
        recv_pos.append(pos)
        recv_splits.append(int(ln.sum()))
        base += recv_splits[-1]
    received = base

    # Past segments: remote pieces in source order, then the local piece.
    seg_head, seg_block = torch.nonzero(need[me], as_tuple=True)
    seg_len = layout.length[seg_block]
    piece_seg, piece_start, piece_len = [], [], []
    seg_ids = torch.arange(seg_head.numel())
    for src in range(world):
        ln = ov[src, seg_block]
        if src < me:
            start = recv_pos[src][seg_head, seg_block]
        elif src == me:
            start = received + ranges_on(me, seg_head, seg_block)[0]
        else:
            continue
        keep = ln > 0
        piece_seg.append(seg_ids[keep])
        piece_start.append(start[keep])
        piece_len.append(ln[keep])
    piece_seg = torch.cat(piece_seg)
    order = torch.argsort(piece_seg, stable=True)  # pieces were appended by source

    # Causal prefix of the first local block: per head, one run per earlier source holding it.
    lp = plans[me] if plans is not None else local_plan(layout, offsets, me)
    if lp.prefix_block >= 0:
        jp = lp.prefix_block
        plen = ov[:me, jp]
        prefix_start = torch.stack([torch.stack([recv_pos[s][g, jp] for s in range(me)])[plen > 0]
                                    for g in range(hkv)])
        prefix_len = plen[plen > 0]
    else:
        prefix_start = torch.zeros(hkv, 0, dtype=torch.int64)
        prefix_len = torch.zeros(0, dtype=torch.int64)

    return FetchPlan(send_splits, recv_splits, torch.cat(send_starts), torch.cat(send_lens), seg_head,
                     seg_block, seg_len, piece_seg[order], torch.cat(piece_start)[order],
                     torch.cat(piece_len)[order], prefix_start, prefix_len, len(recv_items))
