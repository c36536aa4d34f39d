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


class LSEAccumulator:
    """Merge many partial results into ``R`` rows, touching only the rows each part names.

    :func:`merge_lse` with an index rescales and rewrites all ``R`` rows per call; merging the
    selected part of MoBA batch by batch that way costs several passes over ``[R, D]`` per batch.
    Here a row keeps an unnormalized sum ``acc`` relative to its running maximum ``m`` plus the
    normalizer ``l``, so a batch of ``P`` parts costs ``O(P * D)`` plus a few ``O(R)`` vector
    passes: ``m`` grows by a row-wise (order-free) max, rows of the batch are rescaled by
    ``exp(m_old - m_new)`` (a row named twice is written twice with the same value), then the
    parts are added with :func:`index_add_rows` (deterministic under
    ``torch.use_deterministic_algorithms(True)``).

    Args:
        out: ``[R, D]`` a first partial output of every row (any float dtype).
        lse: ``[R]`` its log-sum-exp (``-inf``: the row saw no key yet).
        in_place: when ``out`` is already in the accumulation dtype, accumulate in it (it is
            overwritten; no ``[R, D]`` copy) instead of in a copy.

    Memory: one ``[R, D]`` accumulator in the accumulation dtype (none beyond ``out`` with
    ``in_place``) and three ``[R]`` vectors; :meth:`result` normalizes in place and can write
    into a given output, so no second ``[R, D]`` float32 tensor exists at any time.
    """

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, in_place: bool = False):
        self.dtype = accum_dtype(out.dtype)
        self.m = lse.to(self.dtype, copy=True)
        # -inf: the row saw no key. NaN is "seen" (its output stays NaN: NaN in, NaN out).
        seen = self.m != float("-inf")
        self.l = seen.to(self.dtype)
        copy = not (in_place and out.dtype == self.dtype)
        self.acc = out.to(self.dtype, copy=copy).masked_fill_(~seen[:, None], 0)

    def add(self, part_out: torch.Tensor, part_lse: torch.Tensor, index: torch.Tensor) -> None:
        """Merge ``part_out [P, D]`` with log-sum-exp ``part_lse [P]`` into rows ``index [P]``."""
        part_lse = part_lse.to(self.dtype)
        m_new = self.m.scatter_reduce(0, index, part_lse, reduce="amax", include_self=True)
        shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        scale = torch.exp(self.m - shift)  # 0 where the row had seen nothing, 1 where m is unchanged
        self.acc[index] = self.acc[index] * scale[index, None]
        self.l = self.l * scale
        wp = torch.exp(part_lse - shift[index])
        index_add_rows(self.acc, index, part_out.to(self.dtype) * wp[:, None])
        index_add_rows(self.l, index, wp)
        self.m = m_new

    def result(self, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [R, D], lse [R])``; rows that saw no key: 0, -inf. ``out`` (any float dtype,
        ``[R, D]``): written in place and returned; ``None``: the accumulation dtype. Ends the
        accumulator (its buffer is normalized in place)."""
        safe = torch.where(self.l > 0, self.l, torch.ones_like(self.l))
        shift = torch.where(torch.isinf(self.m), torch.zeros_like(self.m), self.m)
        acc = self.acc.div_(safe[:, None])
        self.acc = None
        if out is not None and not _same_view(out, acc):
            acc = out.copy_(acc)
        return acc, shift + torch.log(self.l)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same elements of the same memory (an in-place result)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride())
