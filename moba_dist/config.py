"""Per-model MoBA settings: block size, top-k, and which layers keep full attention."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._graph import outside_graph
from ._validation import check_cu_seqlens, check_cu_seqlens_form, check_positive_int, check_qkv, check_scale
from .kernels import get_backend
from .moba import causal_attn_varlen, moba_attn_varlen
from .ops import PADDING_ERROR, moba_attention
from .parallel.api import moba_attn_varlen_cp, ring_attn_varlen_cp
from .parallel.step import StepPlan
from .stats import MoBAStats, record


@dataclass(frozen=True)
class MoBAConfig:
    """MoBA for most layers, exact causal attention for some (MoBA's paper keeps the last few
    layers full, for instance).

    Args:
        chunk_size: MoBA block size in tokens (``moba_chunk_size``), >= 1.
        topk: blocks per query including the current one (``moba_topk``), >= 1.
        full_attention_layers: indices (>= 0) of layers that use full causal attention; any
            iterable of ints, stored as a sorted tuple.
        all_full: every layer uses full causal attention (a dense baseline with the same code).
    """

    chunk_size: int
    topk: int
    full_attention_layers: tuple[int, ...] = ()
    all_full: bool = False

    def __post_init__(self):
        check_positive_int("chunk_size", self.chunk_size)
        check_positive_int("topk", self.topk)
        layers = self.full_attention_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"full_attention_layers must be an iterable of ints, got {type(layers).__name__}")
        layers = tuple(layers)
        for i in layers:
            _check_layer("full_attention_layers", i)
        object.__setattr__(self, "full_attention_layers", tuple(sorted(set(layers))))
        if not isinstance(self.all_full, bool):
            raise TypeError(f"all_full must be a bool, got {type(self.all_full).__name__}")

    def is_full(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` uses full causal attention."""
        _check_layer("layer_idx", layer_idx)
        return self.all_full or layer_idx in self.full_attention_layers

    def attention(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        *,
        group=None,
        softmax_scale: float | None = None,
        backend: str | None = None,
        context_parallel: bool | None = None,
        plan: StepPlan | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer ``layer_idx``'s attention: the one dispatcher of the package (the module, the HF
        integration and the training script all call it).

        Where it runs (``context_parallel``):

        * ``None`` (default): context parallel when ``group`` is given or a default process
          group is initialized, one device otherwise; a ``plan`` decides instead when given.
        * ``False``: the tensors are the whole stream on this device and nothing is
          communicated, even when a process group exists (data-parallel training):
          :func:`moba_dist.moba_attn_varlen` (full layers: causal attention), same checks;
          ``cu_seqlens[-1]`` must equal ``q.shape[0]``.
        * ``True``: they are this rank's slice of the global stream and
          :func:`moba_attn_varlen_cp` runs over ``group`` (full layers:
          :func:`ring_attn_varlen_cp`; MoBA switches to the ring itself when ``topk *
          chunk_size`` covers the longest sequence).

        Shapes: ``q [n, Hq, D]``, ``k, v [n, Hkv, D]``, int32 ``cu_seqlens [B + 1]``; returns
        ``[n, Hq, D]`` in q's dtype. ``plan``: a :class:`moba_dist.StepPlan` shared by the
        step's layers (see there). ``valid``: optional bool mask (an HF ``attention_mask``) that
        must be all True (ValueError on padding). Every path records :func:`moba_dist.last_stats`.

        Under ``torch.compile``: one device is one custom operator (no graph break; the checks
        that read ``cu_seqlens`` and ``valid`` run inside it, and ``plan`` is not used), context
        parallel runs eagerly outside the graph (one graph break).
        """
        full = self.is_full(layer_idx)
        if context_parallel is None:
            context_parallel = plan.context_parallel if plan is not None else (
                group is not None or (dist.is_available() and dist.is_initialized()))
        if context_parallel:
            run = _cp_attention_outside_graph if torch.compiler.is_compiling() else _cp_attention
            return run(self, full, q, k, v, cu_seqlens, group, softmax_scale, backend, valid, plan)
        check_qkv(q, k, v)
        scale = check_scale(softmax_scale, q.shape[-1])
        if torch.compiler.is_compiling():  # one custom op, no graph break (moba_dist.ops)
            check_cu_seqlens_form(cu_seqlens, q.device)
            return moba_attention(q, k, v, cu_seqlens, self.chunk_size, self.topk, scale, full=full,
                                  backend=backend, valid=valid)
        if valid is not None and not bool(valid.all()):
            raise ValueError(PADDING_ERROR)
        if not full:
            if plan is not None:
                return moba_attn_varlen(q, k, v, cu_seqlens, plan.max_seqlen(cu_seqlens, q), self.chunk_size,
                                        self.topk, softmax_scale=scale, backend=backend, plan=plan)
            cu = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
            return moba_attn_varlen(q, k, v, cu, int(cu.diff().max()), self.chunk_size, self.topk,
                                    softmax_scale=scale, backend=backend)
        get_backend(q.device, q.dtype, q.shape[-1], backend)
        cu = plan.one_device(cu_seqlens, q) if plan is not None else \
            check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
        record(MoBAStats(path="full", local_tokens=q.shape[0], host_syncs=0 if plan else 1,
                         selected_blocks_per_query=float("nan")))
        return causal_attn_varlen(q, k, v, cu, scale, backend)


def _cp_attention(config: MoBAConfig, full: bool, q, k, v, cu_seqlens, group, softmax_scale, backend,
                  valid, plan):
    """The context-parallel functions (under ``torch.compile`` called through
    :func:`~moba_dist._graph.outside_graph`: their collectives and host syncs run eagerly, one graph
    break per call)."""
    if valid is not None and not bool(valid.all()):
        raise ValueError(PADDING_ERROR)
    if full:
        return ring_attn_varlen_cp(q, k, v, cu_seqlens, group=group, softmax_scale=softmax_scale,
                                   backend=backend, plan=plan)
    return moba_attn_varlen_cp(q, k, v, cu_seqlens, config.chunk_size, config.topk, group=group,
                               softmax_scale=softmax_scale, backend=backend, plan=plan)


_cp_attention_outside_graph = outside_graph(_cp_attention)


def _check_layer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


__all__ = ["MoBAConfig"]
