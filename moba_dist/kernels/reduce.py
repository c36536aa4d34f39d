"""Row reductions with repeated indices that give the same bits run after run.

``out.index_add_(0, index, src)`` on CUDA adds rows with atomics: when ``index`` repeats a row,
the order of the additions, and so the rounding of the sum, changes from run to run.
:func:`index_add_rows` is the one place the library adds rows at repeated indices; it switches to
a sort-based segment sum when ``torch.use_deterministic_algorithms(True)`` is set:
``index_put_(..., accumulate=True)``, which on CUDA stably sorts the indices and lets one thread
group sum each row's contributions in sorted order (no atomics).

On the CPU ``index_add_`` already adds in index order, one contribution after the other, so it is
used in every mode: the CPU result is deterministic and identical in both modes.

Cost of the deterministic path on CUDA: a radix sort of ``index`` (``P`` int64 keys) and one
gather of ``src`` rows in sorted order, against one atomic add per element otherwise; no host
sync, no extra memory beyond the sort's ``O(P)`` keys and permutation.
"""

from __future__ import annotations

import torch


def deterministic_mode() -> bool:
    """Whether ``torch.use_deterministic_algorithms(True)`` is set (``warn_only`` included: the
    deterministic implementations exist, so they are used rather than warned about)."""
    return torch.are_deterministic_algorithms_enabled()


def index_add_rows(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor,
                   deterministic: bool | None = None) -> torch.Tensor:
    """``out[index[i]] += src[i]`` for every ``i``, in place; returns ``out``.

    Args:
        out: ``[R, ...]``.
        index: ``[P]`` int64 rows of ``out`` (on ``out``'s device; may repeat).
        src: ``[P, ...]`` with ``out``'s trailing shape and dtype.
        deterministic: force the deterministic path on (``True``) or off (``False``); ``None``
            follows :func:`deterministic_mode`.

    Deterministic on the CPU always (contributions added in increasing ``i``), and on CUDA when
    ``deterministic`` (or the mode) is on (a row's contributions summed in a fixed order, then
    added to the row).
    """
    if deterministic is None:
        deterministic = deterministic_mode()
    if deterministic and out.device.type != "cpu":
        return out.index_put_((index,), src, accumulate=True)
    return out.index_add_(0, index, src)


__all__ = ["deterministic_mode", "index_add_rows"]
