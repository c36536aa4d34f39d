"""Per-model MoBA settings: block size, top-k, and which layers keep full attention."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ._validation import check_cu_seqlens, check_cu_seqlens_form, check_positive_int, check_qkv, check_scale
from .kernels import get_backend
from .moba import causal_attn_varlen, moba_attn_varlen
from .ops import moba_attention
from .parallel.api import moba_attn_varlen_cp, ring_attn_varlen_cp
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
    ) -> torch.Tensor:
        """Layer ``layer_idx``'s attention of this rank's slice: :func:`ring_attn_varlen_cp` for
        full layers, :func:`moba_attn_varlen_cp` otherwise (which itself switches to the ring
        when ``topk * chunk_size`` covers the longest sequence).

        One device: with ``group=None`` and no initialized default process group, the tensors
        are the whole stream on one device and the single-device functions run instead (full
        causal attention for full layers, :func:`moba_dist.moba_attn_varlen` otherwise) with
        the same argument checks; ``cu_seqlens[-1]`` must then equal ``q.shape[0]``, so a
        sharded input cannot slip through. This is the model-level dispatcher's choice: the CP
        functions themselves raise without a process group (calling them is a request for
        context parallelism, and a missing ``init_process_group`` is a setup error there), and
        on one device both routes give the same result as a group of one rank.

        Shapes as in :func:`moba_attn_varlen_cp`: ``q [n, Hq, D]``, ``k, v [n, Hkv, D]``, global
        int32 ``cu_seqlens [B + 1]``; returns ``[n, Hq, D]`` in q's dtype.

        Under ``torch.compile``: one device is one custom operator (no graph break), context
        parallel runs eagerly outside the graph (one graph break).
        """
        full = self.is_full(layer_idx)
        if group is None and not (dist.is_available() and dist.is_initialized()):
            check_qkv(q, k, v)
            if torch.compiler.is_compiling():  # one custom op, no graph break (moba_dist.ops)
                scale = check_scale(softmax_scale, q.shape[-1])
                check_cu_seqlens_form(cu_seqlens, q.device)
                return moba_attention(q, k, v, cu_seqlens, self.chunk_size, self.topk, scale, full=full,
                                      backend=backend)
            if not full:
                cu = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
                return moba_attn_varlen(q, k, v, cu, int(cu.diff().max()), self.chunk_size, self.topk,
                                        softmax_scale=softmax_scale, backend=backend)
            scale = check_scale(softmax_scale, q.shape[-1])
            get_backend(q.device, q.dtype, q.shape[-1], backend)
            cu = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
            record(MoBAStats(path="full", local_tokens=q.shape[0], host_syncs=1,
                             selected_blocks_per_query=float("nan")))
            return causal_attn_varlen(q, k, v, cu, scale, backend)
        if full:
            return ring_attn_varlen_cp(q, k, v, cu_seqlens, group=group, softmax_scale=softmax_scale,
                                       backend=backend)
        return moba_attn_varlen_cp(q, k, v, cu_seqlens, self.chunk_size, self.topk, group=group,
                                   softmax_scale=softmax_scale, backend=backend)


def _check_layer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


__all__ = ["MoBAConfig"]
