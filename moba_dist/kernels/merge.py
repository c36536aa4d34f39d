"""Merging partial attention results by log-sum-exp: the one place this is done.

A row's softmax over a union of disjoint key sets equals the LSE-weighted sum of the softmaxes
over each set: with ``lse = log(sum_p exp(lse_p))``, ``out = sum_p exp(lse_p - lse) * out_p``.

:func:`merge_lse` merges parts named by row index (the ring's steps); :func:`merge_slots` merges
a window of rows whose parts sit in fixed slots (MoBA's selected blocks), in one pass.

Deterministic: the row-wise maximum is order-free, slots are summed in slot order, and the
weighted sums over parts that share a row in :func:`merge_lse` go through
:func:`moba_dist.kernels.reduce.index_add_rows` (a sort-based segment sum under
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


def merge_slots(part_out: torch.Tensor, part_lse: torch.Tensor, slots: int, out: torch.Tensor,
                lse: torch.Tensor, t0: int, impl: str = "auto") -> None:
    """Merge per-slot partial results into a window of rows of ``(out, lse)``, in place.

    A window is tokens ``[t0, t0 + W)`` of ``out [n, Hq, D]`` (the first part of every row: the
    own block's result) and ``lse [Hq, n]`` (float32, or float64 for float64). ``part_out
    [W * Hq * slots, D]`` (any float dtype) and ``part_lse [W * Hq * slots]`` hold slot ``s`` of
    row ``(t - t0) * Hq + h`` at ``((t - t0) * Hq + h) * slots + s``; a slot with ``lse = -inf``
    is empty and its ``part_out`` is not read (it may be uninitialized). Each row's parts are
    combined in one pass, in the accumulation dtype, and written over its ``out`` and ``lse``
    rows (rounded once to ``out``'s dtype). NaN anywhere in a row's parts gives NaN there.

    ``slots >= 1``. ``impl``: ``"auto"`` (CUDA: one Triton kernel, ``triton_moba._merge_kernel``, shared with
    the fused path; other devices: PyTorch, one slot at a time, scratch ``[W * Hq, D]``),
    ``"triton"`` or ``"torch"`` (the Triton kernel needs contiguous ``out`` and float32 ``lse``).
    """
    n, hq, d = out.shape
    rows = part_lse.numel() // slots
    w = rows // hq
    if rows == 0:
        return
    if impl == "auto":
        fits = out.is_contiguous() and lse.is_contiguous() and lse.dtype == torch.float32
        impl = "triton" if out.is_cuda and fits else "torch"
    if impl == "triton":
        import triton

        from .triton_moba import _merge_kernel, _next_pow2

        dp = max(16, _next_pow2(d))
        _merge_kernel[(triton.cdiv(rows, 16),)](
            part_out, part_lse, out, lse, out, lse, rows, n, t0 * hq, d,
            HQ=hq, S=slots, D=d, DP=dp, BLOCK_R=16, HAS_SELF=True, num_warps=8)
        return
    acc = accum_dtype(out.dtype)
    o_self = out[t0:t0 + w].reshape(rows, d)
    l_self = lse[:, t0:t0 + w].t().reshape(rows).to(acc)
    pl = part_lse.view(rows, slots).to(acc)
    m = torch.maximum(pl.max(1).values, l_self)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    w_self = torch.exp(l_self - m)
    denom = w_self.clone()
    merged = o_self.to(acc) * w_self[:, None]
    parts = part_out.view(rows, slots, d)
    for s in range(slots):
        ws = torch.exp(pl[:, s] - m)
        seen = (pl[:, s] != float("-inf"))[:, None]
        merged += torch.where(seen, parts[:, s].to(acc), 0) * ws[:, None]
        denom += ws
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    o_self.copy_(merged.div_(safe[:, None]))
    lse[:, t0:t0 + w] = (m + torch.log(denom)).view(w, hq).t().to(lse.dtype)

