"""Planning for ring attention: pure host functions from layouts to index tables.

A *layout* says which global tokens each rank holds: ``layout[r]`` is an int64 ``[R, 2]`` tensor of
``(begin, end)`` ranges, sorted, disjoint, non-empty; rank ``r`` stores those tokens concatenated in
that order, so its local row ``i`` is the ``i``-th token of its ranges. The layouts of one group
partition the stream ``[0, T)``.

Three layouts appear:

  * *contiguous*: rank ``r`` holds ``[offsets[r], offsets[r+1])`` (the user's slices);
  * *zigzag*: the stream is cut into ``2W`` chunks of near-equal length and rank ``r`` holds
    chunks ``r`` and ``2W-1-r``, which balances causal work for one long sequence;
  * *per-sequence zigzag*: every sequence is cut into ``2W`` equal chunks and rank ``r`` holds
    chunks ``r`` and ``2W-1-r`` of each (ring-flash-attn's varlen zigzag layout).

:func:`relayout_plan` moves rows between two layouts with one all-to-all. :func:`ring_plan` says,
for each step of a ring in which step ``s`` brings rank ``r`` the keys of rank ``(r - s) mod W``,
which kernel calls to make. Everything here is O(B + R) host work for B sequences and R ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import expand_ranges


def normalize(ranges: torch.Tensor) -> torch.Tensor:
    """Drop empty ranges and merge touching ones: ``[R, 2]`` -> ``[R', 2]`` (same token set)."""
    ranges = ranges.to(torch.int64).reshape(-1, 2)
    ranges = ranges[ranges[:, 1] > ranges[:, 0]]
    if ranges.shape[0] < 2:
        return ranges.clone()
    starts_new = torch.ones(ranges.shape[0], dtype=torch.bool)
    starts_new[1:] = ranges[1:, 0] != ranges[:-1, 1]
    first = torch.nonzero(starts_new).flatten()
    last = torch.cat([first[1:] - 1, torch.tensor([ranges.shape[0] - 1])])
    return torch.stack([ranges[first, 0], ranges[last, 1]], 1)


def num_rows(ranges: torch.Tensor) -> int:
    return int((ranges[:, 1] - ranges[:, 0]).sum())


def contiguous_layout(offsets: torch.Tensor) -> list[torch.Tensor]:
    """Rank ``r`` holds ``[offsets[r], offsets[r+1])``."""
    offsets = offsets.to(torch.int64)
    return [normalize(offsets[r:r + 2]) for r in range(offsets.numel() - 1)]


def zigzag_layout(total: int, world: int) -> list[torch.Tensor]:
    """Stream cut at ``floor(j * T / 2W)``; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``."""
    cut = (torch.arange(2 * world + 1, dtype=torch.int64) * total) // (2 * world)
    return [normalize(torch.stack([cut[[r, 2 * world - 1 - r]], cut[[r + 1, 2 * world - r]]], 1))
            for r in range(world)]


def seq_zigzag_layout(cu_seqlens: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Every sequence cut into ``2W`` equal chunks; rank ``r`` holds chunks ``r`` and ``2W-1-r`` of
    each, in sequence order. Requires every sequence length to be a multiple of ``2W``."""
    cu = cu_seqlens.to(torch.int64)
    lens = cu.diff()
    if bool((lens % (2 * world)).any()):
        raise ValueError(f"cu_seqlens: every sequence length must be a multiple of 2 * world = {2 * world}")
    piece = lens // (2 * world)
    out = []
    for r in range(world):
        front = cu[:-1] + r * piece
        back = cu[:-1] + (2 * world - 1 - r) * piece
        ranges = torch.stack([front, front + piece, back, back + piece], 1)  # [B, 4]: two ranges
        out.append(normalize(ranges.reshape(-1, 2)))
    return out


def same_layout(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether every rank holds the same tokens in both layouts (then a relayout is a no-op)."""
    return all(torch.equal(normalize(x), normalize(y)) for x, y in zip(a, b))


def _local_rows(ranges: torch.Tensor, begin: torch.Tensor,
                end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Local (start row, length) of each global piece ``[begin, end)``, each inside one range."""
    lens = ranges[:, 1] - ranges[:, 0]
    first_row = torch.cumsum(lens, 0) - lens
    idx = torch.searchsorted(ranges[:, 0].contiguous(), begin, right=True) - 1
    return first_row[idx] + begin - ranges[idx, 0], end - begin


def _pieces(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Global ``(begin, end)`` of the non-empty intersections of two range lists, in stream order."""
    lo = torch.maximum(a[:, None, 0], b[None, :, 0]).flatten()
    hi = torch.minimum(a[:, None, 1], b[None, :, 1]).flatten()
    keep = hi > lo
    lo, hi = lo[keep], hi[keep]
    order = torch.argsort(lo)
    return lo[order], hi[order]


@dataclass(frozen=True)
class RelayoutPlan:
    """One rank's share of an all-to-all that moves rows from layout ``src`` to layout ``dst``.

    Send ``x[send_index]`` with ``send_splits`` rows to each destination rank; the received rows,
    ``recv_splits`` from each source in rank order, become the local ``dst`` rows after
    ``received[recv_order]`` (``None`` when they already arrive in ``dst`` order).
    """

    send_index: torch.Tensor  # [sum(send_splits)] int64 local src rows, grouped by destination
    send_splits: list[int]
    recv_splits: list[int]
    recv_order: torch.Tensor | None  # [n_dst] int64 received row of each local dst row


def relayout_plan(src: list[torch.Tensor], dst: list[torch.Tensor], rank: int) -> RelayoutPlan:
    """Plan rank ``rank``'s part of the all-to-all from layout ``src`` to layout ``dst``.

    Rows travel in stream order within each (source, destination) pair, so both sides derive the
    same order from the two layouts alone: no sizes need to be exchanged.
    """
    world = len(src)
    me_src, me_dst = src[rank], dst[rank]
    send_idx, send_splits = [], []
    for d in range(world):
        lo, hi = _pieces(me_src, dst[d])
        start, length = _local_rows(me_src, lo, hi)
        send_idx.append(expand_ranges(start, length, int(length.sum())))
        send_splits.append(int(length.sum()))
    recv_rows, recv_splits = [], []
    for p in range(world):
        lo, hi = _pieces(src[p], me_dst)
        start, length = _local_rows(me_dst, lo, hi)
        recv_rows.append(expand_ranges(start, length, int(length.sum())))
        recv_splits.append(int(length.sum()))
    dst_row_of_received = torch.cat(recv_rows)
    n = dst_row_of_received.numel()
    if n != num_rows(me_dst):
        raise ValueError("layouts do not cover the same tokens")
    if torch.equal(dst_row_of_received, torch.arange(n)):
        order = None
    else:
        order = torch.empty(n, dtype=torch.int64)
        order[dst_row_of_received] = torch.arange(n)
    return RelayoutPlan(torch.cat(send_idx), send_splits, recv_splits, order)


@dataclass(frozen=True)
class RingCall:
    """One varlen kernel call: local query rows ``[q_begin, q_end)`` against rows
    ``[k_begin, k_end)`` of the key buffer held at that step, cut into segments by the host int32
    tensors ``cu_q``/``cu_k``; causal (bottom-right aligned) or not."""

    q_begin: int
    q_end: int
    k_begin: int
    k_end: int
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool


def _seq_overlap(cu: torch.Tensor, ranges: torch.Tensor) -> torch.Tensor:
    """``[B]`` tokens of each sequence inside the union of ``ranges``."""
    lo = torch.maximum(cu[:-1, None], ranges[None, :, 0])
    hi = torch.minimum(cu[1:, None], ranges[None, :, 1])
    return (hi - lo).clamp_min(0).sum(1)


def _cu32(lengths: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(torch.int32)


def step_calls(cu_seqlens: torch.Tensor, q_ranges: torch.Tensor, k_ranges: torch.Tensor,
               diagonal: bool) -> list[RingCall]:
    """Kernel calls for local queries on ``q_ranges`` against keys on ``k_ranges``.

    ``diagonal``: the keys are the queries' own tokens (``q_ranges == k_ranges``). Then one causal
    call covers every local row: each sequence's local rows are contiguous and in stream order, so
    causal masking on local positions is causal masking on global positions.

    Otherwise the two range lists are disjoint. A query range sees exactly the key ranges that end
    before it starts, a prefix of the key buffer; consecutive query ranges seeing the same prefix
    form one non-causal call. Only one sequence can hold both a key before the group and a query
    in it (it must contain the group's first token), so each call is a single segment: the first
    ``Lq`` rows of the group against the last ``Lk`` rows of the prefix. Calls without such a
    sequence, or without keys, are dropped: those queries see nothing there.
    """
    cu = cu_seqlens.to(torch.int64)
    q_ranges, k_ranges = normalize(q_ranges), normalize(k_ranges)
    if diagonal:
        lens = _seq_overlap(cu, q_ranges)
        lens = lens[lens > 0]
        if lens.numel() == 0:
            return []
        n = int(lens.sum())
        c = _cu32(lens)
        mx = int(lens.max())
        return [RingCall(0, n, 0, n, c, c, mx, mx, True)]
    if q_ranges.shape[0] == 0 or k_ranges.shape[0] == 0:
        return []
    before = k_ranges[None, :, 1] <= q_ranges[:, None, 0]  # [Rq, Rk]
    after = k_ranges[None, :, 0] >= q_ranges[:, None, 1]
    if not bool((before | after).all()):
        raise ValueError("query and key ranges overlap but diagonal=False")
    count = before.sum(1)  # key ranges each query range sees (a prefix: both lists are sorted)
    k_lens = k_ranges[:, 1] - k_ranges[:, 0]
    k_prefix_rows = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(k_lens, 0)])
    q_lens = q_ranges[:, 1] - q_ranges[:, 0]
    q_first_row = torch.cumsum(q_lens, 0) - q_lens
    calls = []
    i = 0
    while i < q_ranges.shape[0]:
        j = i
        while j + 1 < q_ranges.shape[0] and int(count[j + 1]) == int(count[i]):
            j += 1
        c = int(count[i])
        if c > 0:
            first = int(q_ranges[i, 0])
            b = int(torch.searchsorted(cu, torch.tensor(first), right=True)) - 1
            seq = cu[b:b + 2]
            lq = int(_seq_overlap(seq, q_ranges[i:j + 1])[0])
            lk = int(_seq_overlap(seq, k_ranges[:c])[0])
            if lq > 0 and lk > 0:
                q0, m = int(q_first_row[i]), int(k_prefix_rows[c])
                calls.append(RingCall(q0, q0 + lq, m - lk, m, _cu32(torch.tensor([lq])),
                                      _cu32(torch.tensor([lk])), lq, lk, False))
        i = j + 1
    return calls


@dataclass(frozen=True)
class RingPlan:
    """Rank ``rank``'s ring over a layout: at step ``s`` it holds the key/value rows of rank
    ``source[s] = (rank - s) mod W`` (``rows[source[s]]`` of them) and makes ``calls[s]``."""

    rank: int
    world: int
    rows: list[int]  # rows held by each rank in the layout
    source: list[int]
    calls: list[list[RingCall]]

    def rows_at(self, step: int) -> int:
        """Rows of the key/value buffer held at ``step`` (``step == world`` wraps to this rank)."""
        return self.rows[(self.rank - step) % self.world]


def ring_plan(cu_seqlens: torch.Tensor, layout: list[torch.Tensor], rank: int) -> RingPlan:
    """Calls for every ring step of rank ``rank`` (see :func:`step_calls`)."""
    world = len(layout)
    source = [(rank - s) % world for s in range(world)]
    calls = [step_calls(cu_seqlens, layout[rank], layout[src], s == 0) for s, src in enumerate(source)]
    return RingPlan(rank, world, [num_rows(r) for r in layout], source, calls)


__all__ = [
    "RelayoutPlan",
    "RingCall",
    "RingPlan",
    "contiguous_layout",
    "normalize",
    "num_rows",
    "relayout_plan",
    "ring_plan",
    "same_layout",
    "seq_zigzag_layout",
    "step_calls",
    "zigzag_layout",
]
