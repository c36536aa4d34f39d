"""Next-token loss and retrieval accuracy over the LM head in row chunks (scripts/train.py).

The logits of a whole long slice (``n x vocab`` in float32) are never materialized: rows go
through the LM head ``chunk_rows`` at a time, each chunk under ``torch.utils.checkpoint`` so that
backward recomputes that chunk's logits instead of keeping them. Peak extra memory is one
chunk's ``chunk_rows x vocab`` float32 logits (and their gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, shift_labels: torch.Tensor,
                    num_items: torch.Tensor | int, chunk_rows: int = 8192) -> torch.Tensor:
    """``sum(cross_entropy(hidden @ weight.T, shift_labels)) / num_items`` in chunks of rows.

    Args:
        hidden: ``[n, H]`` final hidden states of this rank's tokens (any float dtype).
        weight: ``[V, H]`` LM head weight.
        shift_labels: int64 ``[n]``, the label of the *next* token for each row (-100: none).
        num_items: labelled tokens of the whole (global) batch: dividing every rank's sum by
            the global count makes the ranks' losses add up to the global mean.
        chunk_rows: rows per chunk.

    Returns:
        A float32 scalar, differentiable in ``hidden`` and ``weight``.
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[s:s + chunk_rows], shift_labels[s:s + chunk_rows]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_ce_sum, h, weight, y, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, y)
    return total / num_items


@torch.no_grad()
def retrieval_counts(hidden: torch.Tensor, weight: torch.Tensor, shift_labels: torch.Tensor,
                     chunk_rows: int = 8192) -> torch.Tensor:
    """float64 ``[3]``: (summed cross-entropy, correct argmax predictions, labelled rows) over
    the rows of this rank whose next token is labelled. Only those rows go through the head."""
    rows = (shift_labels != -100).nonzero().flatten()
    out = torch.zeros(3, dtype=torch.float64, device=hidden.device)
    for s in range(0, rows.numel(), chunk_rows):
        r = rows[s:s + chunk_rows]
        logits = F.linear(hidden[r], weight).float()
        y = shift_labels[r]
        out[0] += F.cross_entropy(logits, y, reduction="sum").double()
        out[1] += (logits.argmax(dim=-1) == y).sum()
        out[2] += r.numel()
    return out
