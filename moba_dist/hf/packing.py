"""Packed-batch bookkeeping on the host side: sequence boundaries from ``position_ids``, shifted
labels that never cross a sequence, and the contiguous slice of each context-parallel rank.

Pure functions of their inputs (no communication); every rank computes the same answer from the
same full batch.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[B, S]`` view of a ``[B, S]`` or ``[S]`` integer tensor (``[S]`` is one row)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 1:
        return x[None]
    if x.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq] or [seq], got shape {tuple(x.shape)}")
    return x


def cu_seqlens_from_position_ids(position_ids: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor:
    """Boundaries of the packed stream that flattens a ``[batch, seqlen]`` batch row by row.

    A sequence starts at the first token of every row and wherever ``position_ids`` is 0 (HF's
    packing convention: positions restart at 0 for each packed sequence). Without
    ``position_ids`` every row is one sequence. A ``[1, seqlen]`` ``position_ids`` is shared by
    all rows, as in HF models.

    Returns int32 ``cu_seqlens [N + 1]`` on the host (one device-to-host copy of ``batch *
    seqlen`` flags when ``position_ids`` lives on a GPU).
    """
    total = batch * seqlen
    if position_ids is None:
        return torch.arange(batch + 1, dtype=torch.int32) * seqlen
    pos = as_rows(position_ids, "position_ids")
    if pos.shape[-1] != seqlen or pos.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [{batch} or 1, {seqlen}], got shape {tuple(pos.shape)}")
    starts = (pos == 0).cpu().expand(batch, seqlen).clone()
    starts[:, 0] = True
    idx = starts.flatten().nonzero().flatten()
    return torch.cat([idx, torch.tensor([total])]).to(torch.int32)


def cu_seqlens_padded(position_ids: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor:
    """:func:`cu_seqlens_from_position_ids` with a fixed size and no host read, for
    ``torch.compile``: int32 ``[batch * seqlen + 1]`` on ``position_ids``' device, the same
    boundaries followed by repeats of the total (empty sequences at the end, which the
    attention drops). Without ``position_ids``: ``[batch + 1]`` on the CPU, as there."""
    if position_ids is None:
        return cu_seqlens_from_position_ids(None, batch, seqlen)
    pos = as_rows(position_ids, "position_ids")
    if pos.shape[-1] != seqlen or pos.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must be [{batch} or 1, {seqlen}], got shape {tuple(pos.shape)}")
    total = batch * seqlen
    col = torch.arange(seqlen, device=pos.device)
    starts = ((pos == 0) | (col == 0)).expand(batch, seqlen).reshape(-1)
    index = torch.arange(total, device=pos.device)
    # Start positions in order, then the total wherever a token starts nothing.
    cu = torch.where(starts, index, total).sort().values
    return torch.cat([cu, cu.new_full((1,), total)]).to(torch.int32)


def shift_labels_packed(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a flat packed stream ``labels [T]``: ``out[t] = labels[t + 1]``,
    and ``-100`` at the last token of each sequence (``cu_seqlens`` host int ``[N + 1]``) so no
    token is trained to predict the next sequence's first token."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:-1] = labels[1:]
    ends = cu_seqlens[1:].to(torch.int64)
    ends = ends[ends > cu_seqlens[:-1].to(torch.int64)] - 1
    out[ends.to(labels.device)] = IGNORE_INDEX
    return out


def shift_labels(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """HF ``shift_labels`` for a packed batch, same shape as ``labels`` (``[B, S]`` or ``[S]``).

    Like HF's own shift (targets are the next token, ``-100`` at the end of each row), and also
    ``-100`` at the last token of each packed sequence (``position_ids`` restarting at 0). Pass it
    as ``model(..., labels=labels, shift_labels=shift_labels(labels, pos))`` to get on one
    process the loss that :meth:`ContextParallel.shard` splits across ranks.
    """
    rows = as_rows(labels, "labels")
    cu = cu_seqlens_from_position_ids(position_ids, *rows.shape)
    return shift_labels_packed(rows.reshape(-1), cu).view(labels.shape)


def slice_offsets(total: int, world: int) -> list[int]:
    """Start of each rank's contiguous slice and the end, ``[W + 1]``: lengths differ by at most
    one, the first ``total % world`` ranks holding the extra token (as ``torch.tensor_split``)."""
    base, extra = divmod(total, world)
    offsets = [0]
    for r in range(world):
        offsets.append(offsets[-1] + base + (r < extra))
    return offsets


def shard_batch(input_ids: torch.Tensor, position_ids: torch.Tensor | None, labels: torch.Tensor | None,
                rank: int, world: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, slice]:
    """Rank ``rank``'s slice of a batch as HF model kwargs, the global ``cu_seqlens`` and the
    slice; see :meth:`moba_dist.hf.ContextParallel.shard`, which calls it with its group."""
    ids = as_rows(input_ids, "input_ids")
    batch, seqlen = ids.shape
    cu = cu_seqlens_from_position_ids(position_ids, batch, seqlen)
    if position_ids is None:
        pos = torch.arange(seqlen, device=ids.device).expand(batch, seqlen)
    else:
        pos = as_rows(position_ids, "position_ids").expand(batch, seqlen)
    if batch * seqlen < world:
        # An empty slice would reach HF's packed-sequence detection, which fails on 0 tokens.
        raise ValueError(f"input_ids: {batch * seqlen} tokens cannot be split over {world} ranks "
                         "(each rank needs at least one token)")
    offsets = slice_offsets(batch * seqlen, world)
    a, b = offsets[rank], offsets[rank + 1]
    out = {"input_ids": ids.reshape(-1)[a:b][None], "position_ids": pos.reshape(-1)[a:b][None]}
    if labels is not None:
        lab = as_rows(labels, "labels")
        if lab.shape != ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}, "
                             f"got {tuple(lab.shape)}")
        lab = lab.reshape(-1)
        shifted = shift_labels_packed(lab, cu)
        out["labels"] = lab[a:b][None]
        out["shift_labels"] = shifted[a:b][None]
        out["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
    return out, cu, slice(a, b)


__all__ = ["cu_seqlens_from_position_ids", "cu_seqlens_padded", "shard_batch", "shift_labels",
           "shift_labels_packed", "slice_offsets"]
