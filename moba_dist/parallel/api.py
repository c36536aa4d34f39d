"""Public context-parallel entry points."""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_positive_int, check_qkv, check_scale
from .comm import Comm
from .moba_cp import gather_offsets, moba_pipeline


def moba_attn_varlen_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    group=None,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """MoBA over a sequence sharded across the ranks of ``group`` (context parallelism).

    The packed global stream of T tokens is split into contiguous slices in group-rank order;
    this rank passes its slice and gets back the output of its slice, equal to what
    :func:`moba_dist.moba_attn_varlen` gives for those tokens on one device.

    Args:
        q: ``[n, Hq, D]`` this rank's queries; k, v: ``[n, Hkv, D]``. Slices may differ in
            length (even be empty), and may start or end inside a sequence or a block.
        cu_seqlens: int32 ``[B + 1]`` boundaries of the *global* stream, same on every rank.
        moba_chunk_size, moba_topk: as in :func:`moba_dist.moba_attn_varlen`.
        group: process group (``None``: the default group). NCCL for CUDA tensors, gloo for CPU.
        softmax_scale: defaults to ``D ** -0.5``.
        backend: attention kernel backend; default automatic.

    Returns:
        ``[n, Hq, D]`` in q's dtype, differentiable in q, k, v.

    Communicated: block key sums (all-gather), selection counts (all-gather), and only the
    selected key/value rows (all-to-all, reversed in backward). See ``moba_cp.py`` for volumes
    and the two host syncs. Statistics: :func:`moba_dist.last_stats`.
    """
    check_qkv(q, k, v)
    chunk = check_positive_int("moba_chunk_size", moba_chunk_size)
    topk = check_positive_int("moba_topk", moba_topk)
    scale = check_scale(softmax_scale, q.shape[-1])
    comm = Comm(group)
    cu, offsets = gather_offsets(q.shape[0], check_cu_seqlens(cu_seqlens, None).to(q.device), comm)
    if int(cu[-1]) != int(offsets[-1]):
        raise ValueError(
            f"cu_seqlens[-1] ({int(cu[-1])}) must equal the total tokens over the group "
            f"({int(offsets[-1])})"
        )
    return moba_pipeline(q, k, v, cu, offsets, chunk, topk, scale, comm, backend)
