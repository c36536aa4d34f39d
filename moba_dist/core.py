"""The MoBA attention kernel step, given a plan: one autograd Function.

Two kernel calls per direction:

  * *self part*: every query over its own block, causal; keys ``k_self`` may start with a prefix
    of rows fetched from earlier ranks, which only the first segment sees;
  * *selected part*: (query, head) pairs gathered into one row each and grouped by the (kv head,
    block) they selected, against that block's keys (one varlen segment per (head, block)).

The two are merged by log-sum-exp. Backward calls each kernel's backward with the *merged* output
and LSE, which yields exact gradients for each key set (see ``kernels/base.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import AttnBackend, merge_lse


@dataclass(frozen=True)
class SelBatch:
    """A run of consecutive selected-part segments processed together (bounds memory)."""

    pairs: slice  # into pair_row
    rows: slice  # into k_sel / v_sel
    cu_q: torch.Tensor  # int32 [segments + 1], device, relative to the batch
    cu_k: torch.Tensor
    max_q: int


@dataclass(frozen=True)
class CoreMeta:
    """Host sizes and device offsets of the kernel calls."""

    cu_q_self: torch.Tensor  # int32 [P + 1], device
    cu_k_self: torch.Tensor
    max_q_self: int
    max_k_self: int
    sel_batches: list[SelBatch]
    max_k_sel: int
    softmax_scale: float
    backend: AttnBackend


def sel_batches(seg_counts: torch.Tensor, seg_len: torch.Tensor, max_pairs: int, device) -> list[SelBatch]:
    """Group consecutive segments so each batch gathers at most ``max_pairs`` (query, head) rows
    (a single larger segment gets a batch of its own). Host tensors in, device offsets out."""
    batches = []
    n_seg = seg_counts.numel()
    pair_cu = torch.cat([seg_counts.new_zeros(1), torch.cumsum(seg_counts, 0)])
    row_cu = torch.cat([seg_len.new_zeros(1), torch.cumsum(seg_len, 0)])
    a = 0
    while a < n_seg:
        b = int(torch.searchsorted(pair_cu, pair_cu[a] + max_pairs, right=True)) - 1
        b = min(max(b, a + 1), n_seg)
        if int(pair_cu[b] - pair_cu[a]):
            batches.append(SelBatch(
                pairs=slice(int(pair_cu[a]), int(pair_cu[b])),
                rows=slice(int(row_cu[a]), int(row_cu[b])),
                cu_q=(pair_cu[a:b + 1] - pair_cu[a]).to(device=device, dtype=torch.int32),
                cu_k=(row_cu[a:b + 1] - row_cu[a]).to(device=device, dtype=torch.int32),
                max_q=int(seg_counts[a:b].max()),
            ))
        a = b
    return batches


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _pick(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``t * Hq + h`` of ``x [n, Hq, D]`` as ``[len(rows), 1, D]``."""
    return _flat(x)[rows].unsqueeze(1)


class MoBACore(torch.autograd.Function):
    """``out = softmax attention over (own block, causal) ∪ (selected blocks)``.

    Inputs: ``q [n, Hq, D]``; ``k_self, v_self [p + n, Hkv, D]``; ``k_sel, v_sel [R, 1, D]`` the
    selected blocks' rows, head-major by segment; ``pair_row [num_pairs]`` the flat ``t * Hq + h``
    row of each selected (query, head) pair, sorted by segment. Output ``[n, Hq, D]``, q's dtype.

    The selected part runs in batches of consecutive segments (``meta.sel_batches``) so that the
    gathered query rows, partial outputs and their gradients never exceed one batch at a time.
    """

    @staticmethod
    def forward(ctx, q, k_self, v_self, k_sel, v_sel, pair_row, meta: CoreMeta):
        be, scale = meta.backend, meta.softmax_scale
        n, hq, d = q.shape
        ctx.meta = meta
        if n == 0:
            ctx.save_for_backward(q, k_self, v_self, k_sel, v_sel)
            return torch.zeros_like(q)
        out, lse = be.forward(q, k_self, v_self, meta.cu_q_self, meta.cu_k_self, meta.max_q_self,
                              meta.max_k_self, scale, True)
        if meta.sel_batches:
            acc_out, acc_lse = _flat(out), lse.t().reshape(-1)
            for b in meta.sel_batches:
                rows = pair_row[b.pairs]
                o_sel, lse_sel = be.forward(_pick(q, rows), k_sel[b.rows], v_sel[b.rows],
                                            b.cu_q, b.cu_k, b.max_q, meta.max_k_sel, scale, False)
                acc_out, acc_lse = merge_lse(acc_out, acc_lse, o_sel[:, 0], lse_sel[0], rows)
            out = acc_out.to(q.dtype).view(n, hq, -1)
            lse = acc_lse.view(n, hq).t().contiguous()
        ctx.save_for_backward(q, k_self, v_self, k_sel, v_sel, pair_row, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        if len(ctx.saved_tensors) == 5:  # empty local slice: zeros keep every collective's
            return (*(torch.zeros_like(t) for t in ctx.saved_tensors), None, None)  # backward alive
        q, k_self, v_self, k_sel, v_sel, pair_row, out, lse = ctx.saved_tensors
        meta = ctx.meta
        be, scale = meta.backend, meta.softmax_scale
        dout = dout.contiguous()
        dq, dk_self, dv_self = be.backward(dout, q, k_self, v_self, out, lse, meta.cu_q_self,
                                           meta.cu_k_self, meta.max_q_self, meta.max_k_self, scale,
                                           True)
        # Zeros rather than None when nothing was selected: the gradient must still reach the
        # all-to-all so that its backward collective runs on every rank.
        dk_sel, dv_sel = torch.zeros_like(k_sel), torch.zeros_like(v_sel)
        if meta.sel_batches:
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            dq = _flat(dq).to(acc)
            lse_rows = lse.t().reshape(-1)
            for b in meta.sel_batches:
                rows = pair_row[b.pairs]
                dq_b, dk_b, dv_b = be.backward(_pick(dout, rows), _pick(q, rows), k_sel[b.rows],
                                               v_sel[b.rows], _pick(out, rows),
                                               lse_rows[rows].unsqueeze(0).contiguous(),
                                               b.cu_q, b.cu_k, b.max_q, meta.max_k_sel, scale, False)
                dq.index_add_(0, rows, dq_b[:, 0].to(acc))
                dk_sel[b.rows] = dk_b
                dv_sel[b.rows] = dv_b
            dq = dq.to(q.dtype).view(q.shape)
        return dq, dk_self, dv_self, dk_sel, dv_sel, None, None
