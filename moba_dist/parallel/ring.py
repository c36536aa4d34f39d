"""Exact causal ring attention over our kernel interface, and the layout changes around it.

Pipeline of :func:`ring_pipeline` (W ranks, contiguous user slices in and out):

  1. one ``all_to_all_single`` of ``cat(q, k, v)`` from the contiguous slices to the ring's layout
     (zigzag: rank r holds stream chunks r and 2W-1-r of 2W, so causal work is balanced); its
     backward is the reverse all-to-all (``Comm.all_to_all_rows``);
  2. :class:`RingAttention`: W steps; at step s rank r holds the keys/values of rank (r-s) mod W,
     posts the exchange for step s+1 (send to r+1, receive from r-1) *before* running step s's
     kernel call, and merges partial results by LSE (``kernels.merge_lse``). Backward is a second
     ring that moves keys/values forward again together with float32 (float64) dK/dV
     accumulators, which arrive back at their owner after W hops; every kernel backward gets the
     *final* merged output and LSE, which makes each piece's gradient exact;
  3. one ``all_to_all_single`` of the output back to the contiguous slices.

Communication per rank (n local rows, Hq/Hkv heads, D head dim, element size e, accumulator
size a): relayout ``~n*(Hq+2Hkv)*D*e`` out and back, same again in backward; forward ring
``(W-1) * 2*n*Hkv*D*e``; backward ring the same plus ``W * 2*n*Hkv*D*a`` for dK/dV.

Host syncs: none here; the caller has already brought slice lengths and ``cu_seqlens`` to the
host once (``moba_cp.gather_offsets``), and every table is planned from them on the host. The
per-call ``cu_seqlens`` tables are copied to the device once per forward.

Alternatively (``impl``), ring-flash-attn runs step 2 on its own layout (see ``ring_flash.py``).
"""

from __future__ import annotations

import torch

from ..kernels import AttnBackend, accum_dtype, get_backend, merge_lse
from .comm import Comm
from .p2p import RingExchange
from .ring_flash import pick_impl, run_llama3, run_zigzag
from .ring_plan import (
    RingPlan,
    contiguous_layout,
    relayout_plan,
    ring_plan,
    same_layout,
    seq_zigzag_layout,
    zigzag_layout,
)

_KV_TAG, _DKV_TAG = 0, 1


def _device_calls(plan: RingPlan, device: torch.device):
    """Per step: ``(call, cu_q, cu_k)`` with the cu tables on ``device``, all in one small copy."""
    flat = [t for step in plan.calls for c in step for t in (c.cu_q, c.cu_k)]
    if not flat:
        return [[] for _ in plan.calls]
    pieces = iter(torch.cat(flat).to(device, non_blocking=True).split([t.numel() for t in flat]))
    return [[(c, next(pieces), next(pieces)) for c in step] for step in plan.calls]


class RingAttention(torch.autograd.Function):
    """Causal attention of local ``q [n, Hq, D]`` over the keys of the whole ring.

    ``k, v [n, Hkv, D]`` are this rank's rows in the plan's layout. Returns ``[n, Hq, D]`` in q's
    dtype. Communicated: key/value rows around the ring (forward and backward), dK/dV
    accumulators around the ring (backward).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, comm: Comm, backend: AttnBackend, scale: float):
        q = q.contiguous()
        n, hq, _ = q.shape
        acc = accum_dtype(q.dtype)
        calls = _device_calls(plan, q.device)
        kv = torch.stack([k, v])  # one message per step: [2, rows, Hkv, D]
        out = torch.zeros(n, hq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((n, hq), float("-inf"), dtype=acc, device=q.device)
        ring = RingExchange(comm, "ring_kv", _KV_TAG)
        for s in range(plan.world):
            pending = None
            if s + 1 < plan.world:  # post the next step's exchange before computing this one
                pending = ring.start(kv, (2, plan.rows_at(s + 1), *kv.shape[2:]))
            for c, cu_q, cu_k in calls[s]:
                rows = slice(c.q_begin, c.q_end)
                o, part_lse = backend.forward(q[rows], kv[0, c.k_begin:c.k_end], kv[1, c.k_begin:c.k_end],
                                              cu_q, cu_k, c.max_q, c.max_k, scale, c.causal)
                m_out, m_lse = merge_lse(out[rows].reshape(-1, out.shape[-1]), lse[rows].reshape(-1),
                                         o.reshape(-1, o.shape[-1]), part_lse.t().reshape(-1))
                out[rows] = m_out.view(-1, hq, out.shape[-1])
                lse[rows] = m_lse.view(-1, hq)
            if pending is not None:
                kv = pending.wait()
        out = out.to(q.dtype)
        lse = lse.t().contiguous()  # [Hq, n], the kernels' layout
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, comm, backend, scale, calls)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, comm, backend, scale, calls = ctx.args
        dout = dout.contiguous()
        acc = accum_dtype(q.dtype)
        world = plan.world
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v])
        kv_ring = RingExchange(comm, "ring_kv.backward", _KV_TAG)
        dkv_ring = RingExchange(comm, "ring_dkv.backward", _DKV_TAG)
        pending_dkv = None
        dkv = None
        for s in range(world):
            pending_kv = None
            if s + 1 < world:
                pending_kv = kv_ring.start(kv, (2, plan.rows_at(s + 1), *kv.shape[2:]))
            parts = []
            for c, cu_q, cu_k in calls[s]:
                rows = slice(c.q_begin, c.q_end)
                dq_p, dk_p, dv_p = backend.backward(
                    dout[rows], q[rows], kv[0, c.k_begin:c.k_end], kv[1, c.k_begin:c.k_end], out[rows],
                    lse[:, rows].contiguous(), cu_q, cu_k, c.max_q, c.max_k, scale, c.causal)
                dq[rows] += dq_p
                parts.append((c, dk_p, dv_p))
            # The accumulator for this step's keys arrives from the previous rank (it started at
            # their owner); at step 0 the keys are our own and it starts at zero.
            if s == 0:
                dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)
            else:
                dkv = pending_dkv.wait()
            for c, dk_p, dv_p in parts:
                dkv[0, c.k_begin:c.k_end] += dk_p
                dkv[1, c.k_begin:c.k_end] += dv_p
            if pending_kv is not None:
                kv = pending_kv.wait()
            if world > 1:  # after the last step this hop delivers each accumulator to its owner
                pending_dkv = dkv_ring.start(dkv, (2, plan.rows_at(s + 1), *kv.shape[2:]))
        if pending_dkv is not None:
            dkv = pending_dkv.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def relayout(x: torch.Tensor, src: list[torch.Tensor], dst: list[torch.Tensor], comm: Comm,
             name: str) -> torch.Tensor:
    """Rows of ``x`` (this rank's rows of layout ``src``) -> this rank's rows of layout ``dst``.

    One differentiable ``all_to_all_single`` (skipped on every rank when the layouts agree)."""
    if same_layout(src, dst):
        return x
    p = relayout_plan(src, dst, comm.rank)
    y = comm.all_to_all_rows(x[p.send_index.to(x.device)], p.send_splits, p.recv_splits, name)
    return y if p.recv_order is None else y[p.recv_order.to(x.device)]


def ring_pipeline(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                  offsets: torch.Tensor, softmax_scale: float, comm: Comm, backend: str | None,
                  impl: str | None) -> torch.Tensor:
    """Causal attention of this rank's contiguous slice; ``cu_seqlens``/``offsets`` are host int64.

    ``impl``: ``"ours"``, ``"rfa_zigzag"``, ``"rfa_llama3"`` or ``"auto"`` (see ``ring_flash.py``).
    """
    world, total = comm.world, int(offsets[-1])
    hq, hkv = q.shape[1], k.shape[1]
    choice = pick_impl(impl, q, cu_seqlens, world, backend)
    src = contiguous_layout(offsets)
    if choice == "rfa_zigzag":
        dst = seq_zigzag_layout(cu_seqlens, world)
    elif choice == "rfa_llama3":
        dst = contiguous_layout(torch.arange(world + 1, dtype=torch.int64) * (total // world))
    else:
        dst = zigzag_layout(total, world)
    qkv = relayout(torch.cat([q, k, v], 1), src, dst, comm, "ring_relayout")
    qz, kz, vz = qkv.split([hq, hkv, hkv], 1)
    if choice == "rfa_zigzag":
        out = run_zigzag(qz, kz, vz, cu_seqlens, world, softmax_scale, comm.group)
    elif choice == "rfa_llama3":
        out = run_llama3(qz, kz, vz, cu_seqlens, comm.rank, world, softmax_scale, comm.group)
    else:
        be = get_backend(q.device, q.dtype, q.shape[-1], backend)
        plan = ring_plan(cu_seqlens, dst, comm.rank)
        out = RingAttention.apply(qz, kz, vz, plan, comm, be, softmax_scale)
    return relayout(out, dst, src, comm, "ring_relayout_out")


__all__ = ["RingAttention", "relayout", "ring_pipeline"]
