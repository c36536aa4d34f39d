"""Block layout of a packed varlen batch (host-side, pure).

Blocks are cut per sequence from its own first token (docs/semantics.md, blocks) and numbered globally in
stream order, so block ``j`` covers tokens ``[start[j], start[j] + length[j])``. Everything here
is small (``O(B + N)`` for B sequences and N blocks) and lives on the CPU; the few per-token
lookups the device needs are done with ``torch.searchsorted`` on a device copy of ``start``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    chunk: int
    cu_seqlens: torch.Tensor  # [B + 1] int64, CPU
    start: torch.Tensor  # [N] int64, first global token of each block
    length: torch.Tensor  # [N] int64, tokens in each block (only a sequence's last may be < chunk)
    first_block: torch.Tensor  # [N] int64, global id of the first block of the block's sequence

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, chunk: int) -> BlockLayout:
        cu = cu_seqlens.to("cpu", torch.int64)
        lens = cu.diff()
        nblk = (lens + chunk - 1) // chunk
        seq = torch.repeat_interleave(torch.arange(lens.numel()), nblk)
        seq_first = torch.cumsum(nblk, 0) - nblk
        j = torch.arange(seq.numel()) - seq_first[seq]
        start = cu[seq] + j * chunk
        length = torch.minimum(cu[seq + 1] - start, torch.tensor(chunk))
        return cls(chunk, cu, start, length, seq_first[seq])

    @property
    def num_blocks(self) -> int:
        return self.start.numel()

    @property
    def end(self) -> torch.Tensor:
        return self.start + self.length

    def block_of(self, pos: torch.Tensor) -> torch.Tensor:
        """Global block id of each global token position (host tensors)."""
        return torch.searchsorted(self.start, pos, right=True) - 1

    def overlap(self, offsets: torch.Tensor) -> torch.Tensor:
        """``[W, N]`` tokens of block j held by slice ``[offsets[w], offsets[w+1])``."""
        lo = torch.maximum(self.start[None, :], offsets[:-1, None])
        hi = torch.minimum(self.end[None, :], offsets[1:, None])
        return (hi - lo).clamp_min(0)
