"""Public context-parallel entry points."""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_positive_int, check_qkv, check_scale
from ..stats import MoBAStats, record
from .comm import Comm
from .moba_cp import gather_offsets, moba_pipeline
from .ring import ring_pipeline
from .ring_flash import IMPLS


def _offsets(q: torch.Tensor, cu_seqlens, comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    """Host ``cu_seqlens`` and slice offsets (host sync: one copy), checked against each other."""
    on_device = (isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device.type != "cpu"
                 and cu_seqlens.dim() == 1 and cu_seqlens.numel() >= 2
                 and cu_seqlens.dtype in (torch.int32, torch.int64))
    if on_device:
        # Validate the host copy that comes back with the slice lengths: one device-to-host copy
        # instead of two. Every rank holds the same cu_seqlens, so every rank raises alike.
        cu, offsets = gather_offsets(q.shape[0], cu_seqlens.to(q.device), comm)
        cu = check_cu_seqlens(cu, None)
    else:
        cu, offsets = gather_offsets(q.shape[0], check_cu_seqlens(cu_seqlens, None).to(q.device), comm)
    if int(cu[-1]) != int(offsets[-1]):
        raise ValueError(
            f"cu_seqlens[-1] ({int(cu[-1])}) must equal the total tokens over the group "
            f"({int(offsets[-1])})"
        )
    return cu, offsets


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

    When ``moba_topk * moba_chunk_size`` covers the longest sequence, every past block would be
    selected and MoBA *is* full causal attention: the call then runs
    :func:`ring_attn_varlen_cp` instead (statistics ``path="ring"``, one host sync).
    """
    check_qkv(q, k, v)
    chunk = check_positive_int("moba_chunk_size", moba_chunk_size)
    topk = check_positive_int("moba_topk", moba_topk)
    scale = check_scale(softmax_scale, q.shape[-1])
    comm = Comm(group)
    cu, offsets = _offsets(q, cu_seqlens, comm)
    if topk * chunk >= int(cu.diff().max()):
        out = ring_pipeline(q, k, v, cu, offsets, scale, comm, backend, None)
        record(MoBAStats(path="ring", world_size=comm.world, rank=comm.rank, local_tokens=q.shape[0],
                         bytes_sent=comm.sent, bytes_received=comm.received, host_syncs=1,
                         selected_blocks_per_query=float("nan")))
        return out
    return moba_pipeline(q, k, v, cu, offsets, chunk, topk, scale, comm, backend)


def ring_attn_varlen_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group=None,
    softmax_scale: float | None = None,
    backend: str | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Exact causal attention within each packed sequence, sequence sharded across ``group``.

    Same layout contract as :func:`moba_attn_varlen_cp`: rank r passes the r-th contiguous slice
    of the packed global stream (slices may differ in length, even be empty; sequences may cross
    slice boundaries) and gets back the output of its slice.

    Args:
        q: ``[n, Hq, D]`` this rank's queries; k, v: ``[n, Hkv, D]``, ``Hq % Hkv == 0``.
            float32/float64 on CPU (gloo), bf16/fp16/float32 on CUDA (NCCL).
        cu_seqlens: int32 ``[B + 1]`` boundaries of the *global* stream, same on every rank.
        group: process group (``None``: the default group).
        softmax_scale: defaults to ``D ** -0.5``.
        backend: attention kernel backend of our own ring (see ``moba_dist.kernels``); naming
            one selects our ring under ``impl="auto"``.
        impl: ``"auto"`` (default, or ``$MOBA_DIST_RING_IMPL``): ring-flash-attn's zigzag ring
            when flash-attn and ring-flash-attn import and can run the inputs, else our own;
            ``"ours"``, ``"rfa_zigzag"``, ``"rfa_llama3"`` to choose (an ``rfa_*`` choice that
            cannot run warns and falls back to ours). See ``parallel/ring_flash.py``.

    Returns:
        ``[n, Hq, D]`` in q's dtype, differentiable in q, k, v.

    Communicated (our ring): slice lengths (all-gather), q/k/v to the zigzag layout and the output
    back (one all-to-all each way, reversed in backward), keys/values around the ring with double
    buffering, and dK/dV accumulators around the ring in backward. See ``parallel/ring.py``.
    Host syncs: one (slice lengths and ``cu_seqlens`` to the host, to plan the layouts).
    """
    check_qkv(q, k, v)
    scale = check_scale(softmax_scale, q.shape[-1])
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    comm = Comm(group)
    cu, offsets = _offsets(q, cu_seqlens, comm)
    return ring_pipeline(q, k, v, cu, offsets, scale, comm, backend, impl)
