"""Merging partial attention results by log-sum-exp: the one place this is done.

A row's softmax over a union of disjoint key sets equals the LSE-weighted sum of the softmaxes
over each set: with ``lse = log(sum_p exp(lse_p))``, ``out = sum_p exp(lse_p - lse) * out_p``.

Deterministic: the row-wise maximum is order-free, and the weighted sums over parts that share a
row go through :func:`moba_dist.kernels.reduce.index_add_rows` (a sort-based segment sum under
``torch.use_deterministic_algorithms(True)``).
"""

from __future__ import annotations

import torch

from .base import accum_dtype
from .reduce import index_add_rows


def merge_lse(
    out: torch.Tensor,
    lse: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``part`` results into ``(out, lse)``.

    Args:
        out: ``[R, D]`` partial output of R rows (any float dtype).
        lse: ``[R]`` its log-sum-exp (``-inf`` where the row saw no key).
        part_out: ``[P, D]`` more partial outputs.
        part_lse: ``[P]`` their log-sum-exp.
        index: ``[P]`` int64, the row of ``out`` each part row belongs to (several parts may
            share a row). ``None`` means ``P == R`` and part row ``i`` belongs to row ``i``.

    Returns:
        ``(out [R, D], lse [R])`` in the accumulation dtype (float32, or float64 for float64).
        Rows that saw no key in any part stay at output 0, ``lse = -inf``.
    """
    acc = accum_dtype(out.dtype)
    lse = lse.to(acc)
    part_lse = part_lse.to(acc)
    if index is None:
        m = torch.maximum(lse, part_lse)
    else:
        m = lse.scatter_reduce(0, index, part_lse, reduce="amax", include_self=True)
    # A row whose every part is empty has m = -inf; shift by 0 there so exp() gives 0, not NaN.
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lse - m)
    if index is None:
        wp = torch.exp(part_lse - m)
        denom = w + wp
        merged = out.to(acc) * w[:, None] + part_out.to(acc) * wp[:, None]
    else:
        wp = torch.exp(part_lse - m[index])
        denom = index_add_rows(w.clone(), index, wp)
        merged = index_add_rows(out.to(acc) * w[:, None], index, part_out.to(acc) * wp[:, None])
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return merged / safe[:, None], m + torch.log(denom)
