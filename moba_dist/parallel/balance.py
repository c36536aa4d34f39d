"""Balanced gating across ranks: gate each query on the rank whose share of gate work it falls in.

The gate scores a query against every past block of its sequence, so with contiguous slices a
rank late in a long sequence has far more gate work than an early one (for one sequence over W
ranks the last rank has ``2W - 1`` times the first rank's). Before gating, the queries move (one
all-to-all, no gradient) to contiguous *work-balanced* slices, cut where the running gate work
reaches ``r / W`` of the total; the selections travel back the same way (int32). Contiguous in,
contiguous out: only rows near the cuts move, in stream order, so no reordering is needed.

Work model: a query in block ``j`` of a sequence starting at block ``f`` costs ``j - f + 1``
units (its candidate blocks, plus one for its share of the top-k). Planning is pure host work
on the block layout, ``O(W + N)``, cached with the layout.
"""

from __future__ import annotations

import torch

from ..blocks import BlockLayout
from .comm import Comm

MIN_MEAN_CANDIDATES = 256  # below this mean gate width the gate is cheap next to attention
MIN_IMBALANCE = 1.15  # slowest rank's work over the mean, below which moving queries is not worth it


def gate_work(layout: BlockLayout, offsets: torch.Tensor) -> torch.Tensor:
    """``[W]`` gate work of each contiguous slice ``[offsets[r], offsets[r+1])`` (host int64)."""
    per_token = torch.arange(layout.num_blocks) - layout.first_block + 1
    return (layout.overlap(offsets.to(torch.int64)) * per_token[None, :]).sum(1)


def balanced_offsets(layout: BlockLayout, world: int) -> torch.Tensor:
    """``[W + 1]`` cuts of the stream into contiguous slices of near-equal gate work (host)."""
    end = int(layout.cu_seqlens[-1])
    if layout.num_blocks == 0:
        return torch.arange(world + 1, dtype=torch.int64) * end // world
    per_token = torch.arange(layout.num_blocks) - layout.first_block + 1
    work = layout.length * per_token
    cum = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(work, 0)])
    total = int(cum[-1])
    target = (torch.arange(1, world, dtype=torch.int64) * total + world - 1) // world
    j = (torch.searchsorted(cum, target, right=True) - 1).clamp(0, max(layout.num_blocks - 1, 0))
    inside = (target - cum[j] + per_token[j] - 1) // per_token[j].clamp_min(1)
    cuts = layout.start[j] + torch.minimum(inside, layout.length[j])
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([end])]).to(torch.int64)


def should_balance(layout: BlockLayout, offsets: torch.Tensor, mode: str = "auto") -> bool:
    """Whether gating on work-balanced slices pays; ``mode`` (:attr:`moba_dist.Settings.gate_balance`)
    ``"1"``/``"0"`` forces it on/off."""
    world = offsets.numel() - 1
    if mode == "0" or world == 1:
        return False
    if mode == "1":
        return True
    work = gate_work(layout, offsets)
    tokens = int(offsets[-1])
    mean_candidates = int(work.sum()) / max(tokens, 1)
    imbalance = int(work.max()) * world / max(int(work.sum()), 1)
    return mean_candidates >= MIN_MEAN_CANDIDATES and imbalance >= MIN_IMBALANCE


def _overlap(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Tokens the range ``a = (begin, end)`` shares with each slice of cuts ``b``."""
    lo = torch.maximum(b[:-1], a[0])
    hi = torch.minimum(b[1:], a[1])
    return (hi - lo).clamp_min(0).tolist()


def move_rows(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, comm: Comm, name: str) -> torch.Tensor:
    """This rank's rows of contiguous slices ``src`` -> its rows of contiguous slices ``dst``
    (cuts ``[W + 1]``, host). One all-to-all, not differentiable. Both layouts keep stream
    order, so local rows are already grouped by destination and arrive in order."""
    me = comm.rank
    send = _overlap(src[me:me + 2], dst)
    recv = _overlap(dst[me:me + 2], src)
    return comm.start_all_to_all(x, send, recv, name).wait()


__all__ = ["balanced_offsets", "gate_work", "move_rows", "should_balance"]
