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
class CoreMeta:
    """Host sizes and device offsets of the two kernel calls."""

    cu_q_self: torch.Tensor  # int32 [P + 1], device
    cu_k_self: torch.Tensor
    max_q_self: int
    max_k_self: int
    cu_q_sel: torch.Tensor  # int32 [S + 1], device
    cu_k_sel: torch.Tensor
    max_q_sel: int
    max_k_sel: int
    num_pairs: int
    softmax_scale: float
    backend: AttnBackend


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class MoBACore(torch.autograd.Function):
    """``out = softmax attention over (own block, causal) ∪ (selected blocks)``.

    Inputs: ``q [n, Hq, D]``; ``k_self, v_self [p + n, Hkv, D]``; ``k_sel, v_sel [R, 1, D]`` the
    selected blocks' rows, head-major by segment; ``pair_row [num_pairs]`` the flat ``t * Hq + h``
    row of each selected (query, head) pair, sorted by segment. Output ``[n, Hq, D]``, q's dtype.
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
        if meta.num_pairs:
            q_sel = _flat(q)[pair_row].unsqueeze(1)
            o_sel, lse_sel = be.forward(q_sel, k_sel, v_sel, meta.cu_q_sel, meta.cu_k_sel,
                                        meta.max_q_sel, meta.max_k_sel, scale, False)
            merged, merged_lse = merge_lse(_flat(out), lse.t().reshape(-1), o_sel[:, 0],
                                           lse_sel[0], pair_row)
            out = merged.to(q.dtype).view(n, hq, -1)
            lse = merged_lse.view(n, hq).t().contiguous()
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
        if meta.num_pairs:
            rows = lambda x: _flat(x)[pair_row].unsqueeze(1)  # noqa: E731
            lse_sel = lse.t().reshape(-1)[pair_row].unsqueeze(0).contiguous()
            dq_sel, dk_sel, dv_sel = be.backward(rows(dout), rows(q), k_sel, v_sel, rows(out),
                                                 lse_sel, meta.cu_q_sel, meta.cu_k_sel,
                                                 meta.max_q_sel, meta.max_k_sel, scale, False)
            acc = torch.float64 if q.dtype == torch.float64 else torch.float32
            dq = _flat(dq).to(acc).index_add_(0, pair_row, dq_sel[:, 0].to(acc))
            dq = dq.to(q.dtype).view(q.shape)
        return dq, dk_self, dv_self, dk_sel, dv_sel, None, None
