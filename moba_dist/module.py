"""``MoBAAttention``: the MoBA attention core as an ``nn.Module`` (no projections, no parameters),
and the dispatch it shares with the HF integration."""

from __future__ import annotations

import torch
from torch import nn

from ._validation import check_scale
from .config import MoBAConfig
from .parallel.step import StepPlan


def layer_attention(config: MoBAConfig, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    cu_seqlens: torch.Tensor, *, context_parallel: bool, group=None,
                    softmax_scale: float | None = None, valid: torch.Tensor | None = None,
                    plan: StepPlan | None = None) -> torch.Tensor:
    """``config.attention(layer_idx, ...)`` with where it runs stated (``context_parallel``):
    see :meth:`moba_dist.MoBAConfig.attention`, the package's one dispatcher."""
    return config.attention(layer_idx, q, k, v, cu_seqlens, group=group, softmax_scale=softmax_scale,
                            context_parallel=context_parallel, plan=plan, valid=valid)


class MoBAAttention(nn.Module):
    """MoBA (or, for layers in the schedule's full-attention set, exact causal) attention of
    already-projected queries, keys and values. Holds no parameters: put it where a model calls
    its attention kernel, after the q/k/v projections and rotary embeddings.

    Args:
        config: block size, top-k and the hybrid schedule.
        layer_idx: this layer's index in the schedule (``config.is_full(layer_idx)``).
        softmax_scale: defaults to ``D ** -0.5``.
        group: process group for context parallelism. ``None`` (default): single device, unless
            a :func:`moba_dist.hf.context_parallel` block is open, whose group is then used. To
            run over the default group without a block, pass ``torch.distributed.group.WORLD``.

    Forward ``(q, k, v, cu_seqlens=None)``, GQA allowed (``Hq % Hkv == 0``, kv heads not repeated):

    * ``[T, H, D]`` varlen layout: ``cu_seqlens`` int32 ``[B + 1]`` of the packed stream. Single
      device: the default is one sequence. Context parallel: the tensors are this rank's
      contiguous slice, ``cu_seqlens`` is global (same on every rank; the default is the open
      block's, from its last ``shard``).
    * ``[B, S, H, D]``: single device, each row is one sequence (``cu_seqlens`` must be None).
      Context parallel: ``B`` must be 1 and the row is this rank's slice, as above.

    ``plan``: a :class:`moba_dist.StepPlan` shared by the step's layers (default: the open
    ``context_parallel`` block's, from its last ``shard``, when ``cu_seqlens`` is not given).

    Returns the output in the input's layout and dtype, differentiable in q, k, v. Communication
    and host syncs: those of :func:`moba_dist.moba_attn_varlen_cp` /
    :func:`moba_dist.ring_attn_varlen_cp` (CP) or :func:`moba_dist.moba_attn_varlen` (one device).
    """

    def __init__(self, config: MoBAConfig, layer_idx: int = 0, *, softmax_scale: float | None = None,
                 group=None):
        super().__init__()
        if not isinstance(config, MoBAConfig):
            raise TypeError(f"config must be a MoBAConfig, got {type(config).__name__}")
        config.is_full(layer_idx)  # validates layer_idx
        check_scale(softmax_scale, 1)
        self.config = config
        self.layer_idx = layer_idx
        self.softmax_scale = softmax_scale
        self.group = group

    def extra_repr(self) -> str:
        kind = "full" if self.config.is_full(self.layer_idx) else "moba"
        return (f"layer_idx={self.layer_idx}, {kind}, chunk_size={self.config.chunk_size}, "
                f"topk={self.config.topk}")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cu_seqlens: torch.Tensor | None = None, plan: StepPlan | None = None) -> torch.Tensor:
        from .hf.context import active_context  # here: moba_dist.hf imports this module

        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() not in (3, 4) or t.dim() != q.dim():
                raise ValueError(f"{name} must be [T, H, D] or [B, S, H, D] like q, got shape "
                                 f"{tuple(t.shape)}")
        cp = active_context()
        if plan is None and cp is not None and self.group is None and cu_seqlens is None:
            plan = cp.plan
        parallel = plan.context_parallel if plan is not None else (self.group is not None or cp is not None)
        group = self.group if self.group is not None else (cp.group if cp is not None else None)
        rows = q.shape[:2] if q.dim() == 4 else None
        if rows is not None:
            if k.shape[:2] != rows or v.shape[:2] != rows:
                raise ValueError(f"k and v must have q's [B, S] = {tuple(rows)}, got {tuple(k.shape)}, "
                                 f"{tuple(v.shape)}")
            if parallel and rows[0] != 1:
                raise ValueError(f"q: context parallel takes one row ([1, n, H, D]) of the packed stream, "
                                 f"got batch {rows[0]}")
            if not parallel and cu_seqlens is not None:
                raise ValueError("cu_seqlens must be None for [B, S, H, D] input (each row is one sequence)")
            q, k, v = (t.reshape(-1, *t.shape[2:]) for t in (q, k, v))
        if cu_seqlens is None and plan is not None:
            cu_seqlens = plan.cu_seqlens
        if cu_seqlens is None:
            if parallel:
                if cp is None or cp.cu_seqlens is None:
                    raise ValueError("cu_seqlens is required for context parallel (or call "
                                     "cp.shard(...) in the open context_parallel block first)")
                cu_seqlens = cp.cu_seqlens
            elif rows is not None:
                cu_seqlens = torch.arange(rows[0] + 1, dtype=torch.int32) * rows[1]
            else:
                cu_seqlens = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        out = self.config.attention(self.layer_idx, q, k, v, cu_seqlens, context_parallel=parallel,
                                    group=None if plan is not None else group,
                                    softmax_scale=self.softmax_scale, plan=plan)
        return out if rows is None else out.view(*rows, *out.shape[1:])


__all__ = ["MoBAAttention", "layer_attention"]
