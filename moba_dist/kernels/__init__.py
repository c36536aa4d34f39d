"""Attention-with-LSE kernels behind one interface (see ``base.py``), and the LSE merge.

Backends, in order of preference where they apply:

  ``cudnn``       cuDNN's fused SDPA through NVIDIA's cuDNN frontend (Hopper or later, fp16/bf16,
                  ``pip install moba-dist[cudnn]``), when it imports;
  ``flash_attn``  the flash-attn package (CUDA, fp16/bf16), when it imports;
  ``aten_flash``  PyTorch's bundled FlashAttention-2 (CUDA, fp16/bf16);
  ``torch``       plain PyTorch ops (any device and float dtype; the CPU/CI path).

Choose one explicitly with ``backend=`` on the public functions or with the environment variable
``MOBA_DIST_ATTN_BACKEND``; a named backend that cannot run the inputs raises ``ValueError``.
"""

from __future__ import annotations

import os
from functools import cache

import torch

from .base import AttnBackend, accum_dtype
from .cuda_backends import AtenFlashBackend, FlashAttnBackend
from .cudnn_backend import CudnnBackend
from .merge import merge_lse
from .torch_backend import TorchBackend, default_scale

ENV_VAR = "MOBA_DIST_ATTN_BACKEND"
_PREFERENCE = ("cudnn", "flash_attn", "aten_flash", "torch")


@cache
def _registry() -> dict[str, AttnBackend]:
    return {b.name: b for b in (CudnnBackend(), FlashAttnBackend(), AtenFlashBackend(), TorchBackend())}


def available_backends() -> list[str]:
    """Names of all registered backends (whether or not they can run on this machine)."""
    return list(_PREFERENCE)


def get_backend(
    device: torch.device, dtype: torch.dtype, head_dim: int, name: str | None = None
) -> AttnBackend:
    """Pick the backend for these inputs: ``name``, else ``$MOBA_DIST_ATTN_BACKEND``, else the
    first of ``cudnn, flash_attn, aten_flash, torch`` that supports them."""
    name = name or os.environ.get(ENV_VAR) or None
    reg = _registry()
    if name is not None:
        if name not in reg:
            raise ValueError(f"backend: unknown attention backend {name!r}; choose from {list(reg)}")
        if not reg[name].supports(device, dtype, head_dim):
            raise ValueError(
                f"backend: {name!r} cannot run {dtype} with head_dim={head_dim} on {device}"
            )
        return reg[name]
    for cand in _PREFERENCE:
        if reg[cand].supports(device, dtype, head_dim):
            return reg[cand]
    raise ValueError(f"no attention backend supports {dtype} on {device}")  # pragma: no cover


class _VarlenAttnWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend):
        out, lse = backend.forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, backend)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, backend = ctx.args
        dq, dk, dv = backend.backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal)
        return dq, dk, dv, None, None, None, None, None, None, None


def varlen_attn_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable varlen attention returning ``(out [Tq, Hq, D], lse [Hq, Tq])``.

    Gradients flow through ``out`` only (``lse`` is returned detached). Causal masks are aligned
    bottom-right. See ``base.py`` for layouts.
    """
    scale = default_scale(q.shape[-1]) if softmax_scale is None else softmax_scale
    be = get_backend(q.device, q.dtype, q.shape[-1], backend)
    return _VarlenAttnWithLSE.apply(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, be
    )


__all__ = [
    "AttnBackend",
    "accum_dtype",
    "available_backends",
    "default_scale",
    "get_backend",
    "merge_lse",
    "varlen_attn_with_lse",
]
