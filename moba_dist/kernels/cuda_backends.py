"""CUDA backends: PyTorch's bundled FlashAttention-2 and the flash-attn package.

Both take flash-attn's varlen layout directly and return LSE as ``[Hq, Tq]`` float32, so they
are thin adapters. Neither syncs with the host. FlashAttention-2 reports ``lse = +inf`` for a row
that sees no key; the adapters turn that into the interface's ``-inf`` (log of an empty sum), which
is what an LSE merge needs. Both accept fp16/bf16 and head dims up to 256
(multiples of 8).
"""

from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def _cuda_half(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    return device.type == "cuda" and dtype in _HALF and head_dim <= 256 and head_dim % 8 == 0


def _empty_rows_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill_(torch.isposinf(lse), float("-inf"))


class AtenFlashBackend:
    """``torch.ops.aten._flash_attention_forward/_backward`` (ships with PyTorch)."""

    name = "aten_flash"

    def supports(self, device, dtype, head_dim):
        return (
            _cuda_half(device, dtype, head_dim)
            and hasattr(torch.ops.aten, "_flash_attention_forward")
            and torch.backends.cuda.is_flash_attention_available()
        )

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal, False,
            scale=softmax_scale,
        )
        return out, _empty_rows_to_neg_inf(lse)

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        # Dropout is off, so the RNG state the kernel would read is never used.
        rng = torch.zeros(2, dtype=torch.uint64, device=q.device)
        unused = torch.empty(0, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out, lse.contiguous(), cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, 0.0, causal, rng, unused, scale=softmax_scale,
        )
        return dq, dk, dv


class FlashAttnBackend:
    """The ``flash-attn`` package (``pip install moba-dist[flash]``)."""

    name = "flash_attn"

    def __init__(self):
        try:
            from flash_attn import flash_attn_interface as fai
        except Exception:  # ImportError, or a binary built for another torch
            fai = None
        self._fai = fai

    def supports(self, device, dtype, head_dim):
        return self._fai is not None and _cuda_half(device, dtype, head_dim)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        out, lse, _, _ = self._fai._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, softmax_scale,
            causal,
        )
        return out, _empty_rows_to_neg_inf(lse)

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fai._flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, 0.0, softmax_scale, causal, -1, -1, 0.0, None, False, None,
        )
        return dq, dk, dv
