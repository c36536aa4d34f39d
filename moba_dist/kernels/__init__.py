"""Attention-with-LSE kernels behind one interface (see ``base.py``), and the LSE merge.

Backends, in order of preference where they apply:

  ``cudnn``       cuDNN's fused SDPA through NVIDIA's cuDNN frontend (Hopper or later, fp16/bf16,
                  ``pip install moba-dist[cudnn]``), when it imports;
  ``flash_attn``  the flash-attn package (CUDA, fp16/bf16), when it imports;
  ``aten_flash``  PyTorch's bundled FlashAttention-2 (CUDA, fp16/bf16);
  ``torch``       plain PyTorch ops (any device and float dtype; the CPU/CI path).

Choose one explicitly with ``backend=`` on the public functions or with the environment variable
``MOBA_DIST_ATTN_BACKEND``; a name that is not a backend, or a backend that cannot run the inputs
(package not installed, device, dtype, head dim), raises ``ValueError`` naming the argument or
the variable and the reason.

float32 on CUDA: neither FlashAttention backend runs it, so the automatic choice falls to the
pure-PyTorch kernels, which are correct but much slower (score tiles held in memory, within the
workspace budget of ``moba_dist.memory``). That choice warns once per process; cast q, k, v to
bf16/fp16 for FlashAttention, or name ``backend="torch"`` to choose it knowingly (no warning).
"""

from __future__ import annotations

import os
import warnings
from functools import cache

import torch

from .base import AttnBackend, accum_dtype
from .cuda_backends import AtenFlashBackend, FlashAttnBackend
from .cudnn_backend import CudnnBackend
from .merge import merge_lse, merge_slots
from .reduce import deterministic_mode, index_add_rows
from .torch_backend import TorchBackend, default_scale

ENV_VAR = "MOBA_DIST_ATTN_BACKEND"
_PREFERENCE = ("cudnn", "flash_attn", "aten_flash", "torch")
_warned_slow_cuda = False


@cache
def _registry() -> dict[str, AttnBackend]:
    return {b.name: b for b in (CudnnBackend(), FlashAttnBackend(), AtenFlashBackend(), TorchBackend())}


def available_backends() -> list[str]:
    """Names of all registered backends (whether or not they can run on this machine)."""
    return list(_PREFERENCE)


def backend_installed(name: str) -> bool:
    """Whether backend ``name``'s package or build is present on this machine, whatever the
    inputs (``False`` for an unknown name)."""
    be = _registry().get(name)
    return be is not None and bool(getattr(be, "installed", True))


def _why_not(be: AttnBackend, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    why_not = getattr(be, "why_not", None)
    if why_not is not None:
        return why_not(device, dtype, head_dim)
    if be.supports(device, dtype, head_dim):
        return None
    return f"{be.name!r} cannot run {dtype} with head_dim={head_dim} on {device}"


def get_backend(
    device: torch.device, dtype: torch.dtype, head_dim: int, name: str | None = None
) -> AttnBackend:
    """Pick the backend for these inputs: ``name``, else ``$MOBA_DIST_ATTN_BACKEND``, else the
    first of ``cudnn, flash_attn, aten_flash, torch`` that supports them.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: the name (argument ``backend`` or the variable) is not a backend, or the
            backend cannot run these inputs; the message says why (e.g. flash-attn missing).
    """
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend must be a str or None, got {type(name).__name__}")
    source = "backend"
    if not name:
        name = os.environ.get(ENV_VAR) or None
        source = f"${ENV_VAR}"
    reg = _registry()
    if name is not None:
        if name not in reg:
            raise ValueError(f"{source}={name!r} is not an attention backend; choose one of "
                             f"{list(reg)}, or leave it unset for the automatic choice")
        reason = _why_not(reg[name], device, dtype, head_dim)
        if reason is not None:
            raise ValueError(f"{source}={name!r} cannot run these inputs: {reason}")
        return reg[name]
    for cand in _PREFERENCE:
        if reg[cand].supports(device, dtype, head_dim):
            if device.type == "cuda" and cand == "torch":
                _warn_slow_cuda(dtype)
            return reg[cand]
    raise ValueError(f"no attention backend supports {dtype} on {device}")  # pragma: no cover


def _warn_slow_cuda(dtype: torch.dtype) -> None:
    """One warning per process (not per call: attention runs in every layer of every step)."""
    global _warned_slow_cuda
    if _warned_slow_cuda:
        return
    _warned_slow_cuda = True
    warnings.warn(
        f"moba_dist: {dtype} on CUDA runs on the pure-PyTorch attention kernels (backend 'torch'): "
        "correct, but much slower than FlashAttention and heavier on memory. Cast q, k, v to "
        "bfloat16/float16 to use FlashAttention, or pass backend='torch' (or set "
        f"{ENV_VAR}=torch) to choose it explicitly. This warning is shown once per process.",
        UserWarning, stacklevel=3)


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
    "backend_installed",
    "default_scale",
    "deterministic_mode",
    "get_backend",
    "index_add_rows",
    "merge_lse",
    "merge_slots",
    "varlen_attn_with_lse",
]
