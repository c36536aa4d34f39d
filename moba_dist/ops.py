"""Custom operators (``torch.library``, namespace ``moba_dist``): single-device MoBA as opaque
ops with fixed output shapes, so that ``torch.compile`` traces a model through them without a
graph break.

``moba_dist::moba_fwd`` runs the whole single-device call (argument checks that read
``cu_seqlens``, the choice between MoBA and full causal attention, gate, plan, attend) as eager
code inside the op: host syncs happen there, where the compiler does not look. It returns the
output, the log-sum-exp and the gate's selection, all with shapes known from the inputs'
shapes alone. ``moba_dist::moba_bwd`` plans again from that selection (no re-gating) and runs
the same backward kernels as the eager autograd path, so gradients are bitwise those of eager.

The eager public functions do not use these ops (the eager path keeps its plan for backward
instead of planning twice); ``moba_attn_varlen``, ``layer_attention`` and the HF attention
function call :func:`moba_attention` while ``torch.compiler.is_compiling()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_cu_seqlens, check_max_seqlen
from .core import core_backward, core_forward
from .kernels import accum_dtype, get_backend
from .parallel.moba_cp import _forward_only, moba_plan
from .stats import MoBAStats, record

PADDING_ERROR = ("attention_mask: moba_dist does not support padding; pack the sequences into one row "
                 "with position_ids restarting at 0 instead (or generate with moba_dist.hf.MoBACache, "
                 "which takes left-padded batches)")


def _decide(cu_seqlens: Tensor, total: int, device: torch.device, chunk: int, topk: int, full: bool,
            max_seqlen: int) -> tuple[Tensor, int, bool]:
    """Host int64 ``cu_seqlens`` (validated), the longest sequence, and whether the call is full
    causal attention (a full layer, or ``topk * chunk`` covering every sequence).

    Trailing repeats of the total (empty sequences at the end: how a fixed-size ``cu_seqlens``
    built under ``torch.compile`` is padded, see ``moba_dist.hf.packing.cu_seqlens_padded``) are
    dropped: they hold no token and no block, and without them the layout is the one the
    eager call plans (and caches) for the same batch."""
    cu = check_cu_seqlens(cu_seqlens, total, device)
    if total and int(cu[-2]) == total:
        cu = torch.cat([cu[cu < total], cu.new_full((1,), total)])
    longest = int(cu.diff().max())
    if max_seqlen >= 0:
        check_max_seqlen(max_seqlen, longest)
    return cu, longest, full or topk * chunk >= longest


@torch.library.custom_op("moba_dist::moba_fwd", mutates_args=())
def moba_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, chunk: int, topk: int,
             softmax_scale: float, max_seqlen: int = -1, full: bool = False, backend: str | None = None,
             valid: Tensor | None = None, forward_only: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Single-device MoBA forward: ``(out [T, Hq, D] q.dtype, lse [Hq, T] float32 (float64 for
    float64 inputs), sel [T, Hq, topk - 1] int32)``; ``sel`` holds each (query, head)'s selected
    past blocks (global block ids, -1 where a query has fewer past blocks than slots), all -1
    when the call ran full causal attention.

    ``full``: full causal attention whatever ``topk``/``chunk`` (a full layer). ``max_seqlen``:
    checked against ``cu_seqlens`` unless negative. ``valid``: a bool mask that must be all
    True (an HF ``attention_mask``; ValueError on padding). ``forward_only``: no backward will
    follow (inference: the plan takes prefill's smaller workspace budget); the caller decides,
    because inside the operator no input requires gradients. Host syncs: ``cu_seqlens`` (and
    ``valid``) once, the selection counts once (MoBA path)."""
    if valid is not None and not bool(valid.all()):
        raise ValueError(PADDING_ERROR)
    T, hq, _ = q.shape
    be = get_backend(q.device, q.dtype, q.shape[-1], backend)  # an unusable backend fails first
    cu, longest, is_full = _decide(cu_seqlens, T, q.device, chunk, topk, full, max_seqlen)
    if is_full:
        cu_dev = cu.to(device=q.device, dtype=torch.int32)
        out, lse = be.forward(q, k, v, cu_dev, cu_dev, longest, longest, softmax_scale, True)
        record(MoBAStats(path="full", local_tokens=T, host_syncs=1, selected_blocks_per_query=float("nan")))
        sel = torch.full((T, hq, topk - 1), -1, dtype=torch.int32, device=q.device)
        return out.contiguous(), lse.contiguous(), sel
    offsets = torch.tensor([0, T], dtype=torch.int64)
    meta, sel, stats = moba_plan(q, k, v, cu, offsets, chunk, topk, softmax_scale, None, backend,
                                 forward_only=forward_only)
    out, lse, _ = core_forward(q, k, v, meta)
    record(stats)
    return out.contiguous(), lse.contiguous(), sel.to(torch.int32).contiguous()


@moba_fwd.register_fake
def _(q, k, v, cu_seqlens, chunk, topk, softmax_scale, max_seqlen=-1, full=False, backend=None,
      valid=None, forward_only=False):
    T, hq, d = q.shape
    return (q.new_empty(T, hq, d), q.new_empty(hq, T, dtype=accum_dtype(q.dtype)),
            q.new_empty(T, hq, topk - 1, dtype=torch.int32))


@torch.library.custom_op("moba_dist::moba_bwd", mutates_args=())
def moba_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sel: Tensor,
             cu_seqlens: Tensor, chunk: int, topk: int, softmax_scale: float, full: bool = False,
             backend: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`moba_fwd`: ``(dq, dk, dv)`` like ``q, k, v``. The MoBA path plans again
    from ``sel`` (the forward's selection: nothing is gated again) and runs
    :func:`~moba_dist.core.core_backward`; the full path runs the backend's causal backward.
    Host syncs: ``cu_seqlens`` once, the selection counts once (MoBA path), which the eager
    backward, keeping the forward's plan, does not need."""
    T = q.shape[0]
    cu, longest, is_full = _decide(cu_seqlens, T, q.device, chunk, topk, full, -1)
    if is_full:
        be = get_backend(q.device, q.dtype, q.shape[-1], backend)
        cu_dev = cu.to(device=q.device, dtype=torch.int32)
        dq, dk, dv = be.backward(dout.contiguous(), q, k, v, out, lse, cu_dev, cu_dev, longest, longest,
                                 softmax_scale, True)
    else:
        offsets = torch.tensor([0, T], dtype=torch.int64)
        meta, _, _ = moba_plan(q, k, v, cu, offsets, chunk, topk, softmax_scale, None, backend, sel=sel,
                               forward_only=False)
        dq, dk, dv = core_backward(dout, q, k, v, out, lse, meta)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@moba_bwd.register_fake
def _(dout, q, k, v, out, lse, sel, cu_seqlens, chunk, topk, softmax_scale, full=False, backend=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, chunk, topk, softmax_scale, _max_seqlen, full, backend, _valid, _fwd_only = inputs
    out, lse, sel = output
    ctx.save_for_backward(q, k, v, out, lse, sel, cu_seqlens)
    ctx.args = (chunk, topk, softmax_scale, full, backend)
    ctx.mark_non_differentiable(lse, sel)


def _backward(ctx, dout, _dlse, _dsel):
    q, k, v, out, lse, sel, cu_seqlens = ctx.saved_tensors
    chunk, topk, softmax_scale, full, backend = ctx.args
    dq, dk, dv = moba_bwd(dout, q, k, v, out, lse, sel, cu_seqlens, chunk, topk, softmax_scale, full,
                          backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


moba_fwd.register_autograd(_backward, setup_context=_setup_context)


def moba_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, chunk: int, topk: int,
                   softmax_scale: float, *, max_seqlen: int = -1, full: bool = False,
                   backend: str | None = None, valid: Tensor | None = None) -> Tensor:
    """The output of :func:`moba_fwd` (what the public functions return under ``torch.compile``);
    the caller has done the checks that need no device values. Whether a backward can follow is
    decided here, outside the operator (a constant of the traced graph)."""
    return moba_fwd(q, k, v, cu_seqlens, chunk, topk, softmax_scale, max_seqlen, full, backend, valid,
                    _forward_only(q, k, v))[0]


__all__ = ["PADDING_ERROR", "moba_attention", "moba_bwd", "moba_fwd"]
