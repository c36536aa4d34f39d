"""Public context-parallel entry points.

Both open the same way: errors that make communication impossible raise at once
(``handshake.open_group``); every other argument is checked locally and the verdict travels in
the handshake (``handshake.agree``), the first collective of the call, so that a bad argument
on one rank makes every rank raise instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
import warnings

import torch

from .._graph import outside_graph
from .._validation import (
    check_cu_seqlens_form,
    check_cu_seqlens_values,
    check_positive_int,
    check_qkv,
    check_scale,
)
from ..kernels import backend_installed, deterministic_mode, get_backend
from ..stats import MoBAStats, record
from .comm import Comm
from .handshake import Agreement, agree, check_device_for_group, fingerprint, handshake_device, open_group
from .moba_cp import moba_pipeline
from .ring import ring_pipeline
from .ring_flash import IMPL_ENV, IMPLS, load_ring_flash_attn
from .step import StepPlan

_warned_rfa_nondeterministic = False


def resolve_ring_impl(impl) -> str:
    """``impl``, else ``$MOBA_DIST_RING_IMPL``, else ``"auto"``, checked. Under
    ``torch.use_deterministic_algorithms(True)`` ``"auto"`` becomes ``"ours"`` (ring-flash-attn
    is run without its deterministic backward), and naming an ``rfa_*`` ring warns once."""
    global _warned_rfa_nondeterministic
    if impl is not None and not isinstance(impl, str):
        raise TypeError(f"impl must be a str or None, got {type(impl).__name__}")
    name, source = impl, "impl"
    if name is None:
        name, source = os.environ.get(IMPL_ENV) or "auto", f"${IMPL_ENV}"
    if name not in IMPLS:
        raise ValueError(f"{source}={name!r} is not a ring implementation; choose one of {IMPLS}")
    if deterministic_mode():
        if name == "auto":
            return "ours"
        if name != "ours" and not _warned_rfa_nondeterministic:
            _warned_rfa_nondeterministic = True
            warnings.warn(f"{source}={name!r} under torch.use_deterministic_algorithms(True): "
                          "ring-flash-attn's backward is not deterministic, so gradients may differ "
                          "bit for bit between runs; impl='ours' is deterministic. Shown once.",
                          UserWarning, stacklevel=3)
    return name


def _local_checks(entry: str, comm: Comm | None, q, k, v, cu_seqlens, chunk, topk, softmax_scale,
                  backend, impl, settings=None) -> tuple[dict[str, int], float, str]:
    """Every check that needs no other rank; returns (fingerprint, scale, resolved impl)."""
    check_qkv(q, k, v)
    if comm is not None:
        check_device_for_group(comm, q)
    check_cu_seqlens_form(cu_seqlens, q.device)
    if cu_seqlens.device.type == "cpu":  # free to read here; on a GPU it is read after the handshake
        check_cu_seqlens_values(cu_seqlens.to(torch.int64), None)
    scale = check_scale(softmax_scale, q.shape[-1])
    be = get_backend(q.device, q.dtype, q.shape[-1], backend)
    impl = resolve_ring_impl(impl)
    cuda = q.device.type == "cuda"
    words = fingerprint(entry, q, k, cu_seqlens, chunk, topk, scale, be.name, impl,
                        flash_attn=cuda and backend_installed("flash_attn"),
                        ring_flash_attn=cuda and load_ring_flash_attn() is not None, settings=settings)
    return words, scale, impl


def _open(entry: str, group, q, k, v, cu_seqlens, softmax_scale, backend, impl,
          chunk_topk=None, settings=None) -> tuple[Comm, Agreement, float, str, tuple[int, int]]:
    """Open a call: group, local checks, handshake. Raises on every rank alike (see module doc)."""

    def local(comm):
        chunk = topk = 0
        if chunk_topk is not None:
            chunk = check_positive_int("moba_chunk_size", chunk_topk[0])
            topk = check_positive_int("moba_topk", chunk_topk[1])
        return (*_local_checks(entry, comm, q, k, v, cu_seqlens, chunk, topk, softmax_scale,
                               backend, impl, settings), (chunk, topk))

    try:
        comm, group_error = open_group(group, entry), None
    except Exception as exc:
        group_error = exc
    if group_error is not None:
        # No rank can be waiting on this one (no group, or not a member): an argument error,
        # being more specific, is raised first.
        local(None)
        raise group_error
    device = handshake_device(comm, q)
    try:
        words, scale, impl, chunk_topk = local(comm)
        error = None
    except Exception as exc:  # deferred: every rank learns of it in the handshake
        words, scale, error = None, 0.0, exc
    n_local = q.shape[0] if error is None else 0
    agreement = agree(comm, entry, device, n_local, cu_seqlens, words, error)
    return comm, agreement, scale, impl, chunk_topk


def _begin(entry: str, plan: StepPlan | None, group, q, k, v, cu_seqlens, softmax_scale, backend, impl,
           chunk_topk=None):
    """Open a call, with or without a step plan: ``(comm, cu_seqlens, offsets, scale, impl,
    (chunk, topk), handshake_ran)``. With an established plan no handshake runs: the local
    checks do, and the slice must be the plan's."""
    if plan is None:
        comm, agreed, scale, impl, chunk_topk = _open(entry, group, q, k, v, cu_seqlens, softmax_scale,
                                                      backend, impl, chunk_topk)
        return comm, agreed.cu_seqlens, agreed.offsets, scale, impl, chunk_topk, True
    if not isinstance(plan, StepPlan):
        raise TypeError(f"plan must be a moba_dist.StepPlan or None, got {type(plan).__name__}")
    if not plan.context_parallel:
        raise ValueError(f"{entry}: plan is a one-device StepPlan; make it with context_parallel=True")
    if group is not None and group is not plan.group:
        raise ValueError(f"{entry}: group differs from the plan's group; pass one of them")
    plan.check_cu_seqlens(cu_seqlens)
    agreed = plan.agreed()
    if agreed is None:
        comm, agreement, scale, impl, chunk_topk = _open(entry, plan.group, q, k, v, cu_seqlens,
                                                         softmax_scale, backend, impl, chunk_topk,
                                                         plan.settings)
        plan.establish_cp(comm, agreement.cu_seqlens, agreement.offsets, q)
        cu, offsets, ran = agreement.cu_seqlens, agreement.offsets, True
    else:
        comm, cu, offsets = agreed
        comm = Comm(comm.group)  # a fresh byte ledger: statistics stay per call
        chunk = topk = 0
        if chunk_topk is not None:
            chunk = check_positive_int("moba_chunk_size", chunk_topk[0])
            topk = check_positive_int("moba_topk", chunk_topk[1])
        _, scale, impl = _local_checks(entry, comm, q, k, v, cu_seqlens, chunk, topk, softmax_scale,
                                       backend, impl)
        plan.check_slice(q)
        chunk_topk, ran = (chunk, topk), False
    plan.calls += 1
    return comm, cu, offsets, scale, impl, chunk_topk, ran


def _record_ring(comm: Comm, n_local: int, host_syncs: int) -> None:
    record(MoBAStats(path="ring", world_size=comm.world, rank=comm.rank, local_tokens=n_local,
                     bytes_sent=comm.sent, bytes_received=comm.received, host_syncs=host_syncs,
                     selected_blocks_per_query=float("nan")))


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
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """MoBA over a sequence sharded across the ranks of ``group`` (context parallelism).

    The packed global stream of T tokens is split into contiguous slices in group-rank order;
    this rank passes its slice and gets back the output of its slice, equal to what
    :func:`moba_dist.moba_attn_varlen` gives for those tokens on one device.

    Args:
        q: ``[n, Hq, D]`` this rank's queries; k, v: ``[n, Hkv, D]``. Slices may differ in
            length (even be empty), and may start or end inside a sequence or a block.
        cu_seqlens: int32 ``[B + 1]`` boundaries of the *global* stream, same on every rank
            (on q's device or on the CPU).
        moba_chunk_size, moba_topk: as in :func:`moba_dist.moba_attn_varlen`.
        group: process group (``None``: the default group, which must be initialized). NCCL
            for CUDA tensors, gloo for CPU.
        softmax_scale: positive and finite; defaults to ``D ** -0.5``.
        backend: attention kernel backend; default automatic.
        plan: a context-parallel :class:`moba_dist.StepPlan` shared by a step's layers (its
            group is used): the handshake and its host sync run in the first call only. Default:
            the call opens with its own handshake.

    Returns:
        ``[n, Hq, D]`` in q's dtype, differentiable in q, k, v.

    Raises:
        ValueError, TypeError: on *every* rank of the group when any rank's arguments are
            invalid, or when ranks disagree on what must be identical (``cu_seqlens``, chunk,
            top-k, scale, heads, head dim, dtype, backend, ``MOBA_DIST_*`` settings; a
            :class:`moba_dist.parallel.handshake.RankMismatchError` then names the ranks and the
            fields). Checked in the first collective, before any other communication.
        ValueError: at once, on the calling rank, when no process group is initialized or
            ``group`` does not contain the calling rank.

    Communicated: the handshake (one all-gather of 480 bytes per rank: slice lengths and the
    agreement check), block key sums (all-gather), selection counts (all-gather), and only the
    selected key/value rows (all-to-all, reversed in backward). See ``moba_cp.py`` for volumes
    and the two host syncs (one per layer with a shared ``plan``). Statistics: :func:`moba_dist.last_stats`.

    When ``moba_topk * moba_chunk_size`` covers the longest sequence, every past block would be
    selected and MoBA *is* full causal attention: the call then runs
    :func:`ring_attn_varlen_cp` instead (statistics ``path="ring"``, one host sync).

    Under ``torch.compile`` the call runs eagerly outside the graph (one graph break).
    """
    if torch.compiler.is_compiling():  # eagerly, outside the graph: collectives and host syncs
        return _moba_cp_outside_graph(q, k, v, cu_seqlens, moba_chunk_size, moba_topk, group=group,
                                      softmax_scale=softmax_scale, backend=backend, plan=plan)
    comm, cu, offsets, scale, impl, (chunk, topk), ran = _begin(
        "moba_attn_varlen_cp", plan, group, q, k, v, cu_seqlens, softmax_scale, backend, None,
        chunk_topk=(moba_chunk_size, moba_topk))
    if topk * chunk >= int(cu.diff().max()):
        out = ring_pipeline(q, k, v, cu, offsets, scale, comm, backend, impl)
        _record_ring(comm, q.shape[0], int(ran))
        return out
    if plan is None:
        return moba_pipeline(q, k, v, cu, offsets, chunk, topk, scale, comm, backend)
    return moba_pipeline(q, k, v, cu, offsets, chunk, topk, scale, comm, backend, plan=plan)


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
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """Exact causal attention within each packed sequence, sequence sharded across ``group``.

    Same layout contract as :func:`moba_attn_varlen_cp`: rank r passes the r-th contiguous slice
    of the packed global stream (slices may differ in length, even be empty; sequences may cross
    slice boundaries) and gets back the output of its slice.

    Args:
        q: ``[n, Hq, D]`` this rank's queries; k, v: ``[n, Hkv, D]``, ``Hq % Hkv == 0``.
            float32/float64 on CPU (gloo), bf16/fp16/float32 on CUDA (NCCL).
        cu_seqlens: int32 ``[B + 1]`` boundaries of the *global* stream, same on every rank.
        group: process group (``None``: the default group, which must be initialized).
        softmax_scale: positive and finite; defaults to ``D ** -0.5``.
        backend: attention kernel backend of our own ring (see ``moba_dist.kernels``); naming
            one selects our ring under ``impl="auto"``.
        impl: ``"auto"`` (default, or ``$MOBA_DIST_RING_IMPL``): ring-flash-attn's zigzag ring
            when flash-attn and ring-flash-attn import and can run the inputs, else our own
            (always our own under ``torch.use_deterministic_algorithms(True)``); ``"ours"``,
            ``"rfa_zigzag"``, ``"rfa_llama3"`` to choose (an ``rfa_*`` choice that cannot run
            warns and falls back to ours). See ``parallel/ring_flash.py``.
        plan: as in :func:`moba_attn_varlen_cp`.

    Returns:
        ``[n, Hq, D]`` in q's dtype, differentiable in q, k, v. :func:`moba_dist.last_stats`
        describes this call (``path="ring"``).

    Raises:
        As :func:`moba_attn_varlen_cp`: argument errors and cross-rank disagreements raise on
        every rank, in the first collective.

    Communicated (our ring): the handshake (slice lengths and the agreement check, one
    all-gather), q/k/v to the zigzag layout and the output back (one all-to-all each way,
    reversed in backward), keys/values around the ring with double buffering, and dK/dV
    accumulators around the ring in backward. See ``parallel/ring.py``.
    Host syncs: one (the handshake table and ``cu_seqlens`` to the host, to plan the layouts).
    Under ``torch.compile`` the call runs eagerly outside the graph (one graph break).
    """
    if torch.compiler.is_compiling():  # eagerly, outside the graph: collectives and host syncs
        return _ring_cp_outside_graph(q, k, v, cu_seqlens, group=group, softmax_scale=softmax_scale,
                                      backend=backend, impl=impl, plan=plan)
    comm, cu, offsets, scale, impl, _, ran = _begin("ring_attn_varlen_cp", plan, group, q, k, v, cu_seqlens,
                                                    softmax_scale, backend, impl)
    out = ring_pipeline(q, k, v, cu, offsets, scale, comm, backend, impl)
    _record_ring(comm, q.shape[0], int(ran))
    return out


_moba_cp_outside_graph = outside_graph(moba_attn_varlen_cp)
_ring_cp_outside_graph = outside_graph(ring_attn_varlen_cp)
