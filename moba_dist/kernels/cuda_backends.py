"""CUDA backends: PyTorch's bundled FlashAttention-2 and the flash-attn package.

Both take flash-attn's varlen layout directly and return LSE as ``[Hq, Tq]`` float32, so they
are thin adapters. Neither syncs with the host. FlashAttention-2 reports ``lse = +inf`` for a row
that sees no key; the adapters turn that into the interface's ``-inf`` (log of an empty sum), which
is what an LSE merge needs. Both accept fp16/bf16 and head dims up to 256
(multiples of 8).

Determinism: FlashAttention-2's backward adds dQ across key tiles with atomics unless asked not
to. Under ``torch.use_deterministic_algorithms(True)`` both adapters get the deterministic
backward: ``flash_attn`` through its ``deterministic`` argument, ``aten_flash`` by PyTorch itself
(its flash backward reads the same global flag; in ``warn_only`` mode PyTorch keeps the fast
kernel and warns once). Forward is deterministic in every mode.
"""

from __future__ import annotations

import re

import torch

from .reduce import deterministic_mode

_HALF = (torch.float16, torch.bfloat16)
# The private varlen functions called below (keyword arguments, names as in 2.7 and 2.8) change
# between minor releases: a version outside [MIN, END) is reported as not installed, and the
# automatic choice falls back to PyTorch's bundled FlashAttention-2 (``aten_flash``).
FLASH_ATTN_MIN_VERSION = (2, 7)
FLASH_ATTN_END_VERSION = (2, 9)  # first version not checked
FLASH_ATTN_RANGE = "flash-attn>=2.7,<2.9"


def _cuda_half_why_not(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if device.type != "cuda":
        return f"{name!r} runs on CUDA only, got a tensor on {device}"
    if dtype not in _HALF:
        return f"{name!r} runs float16/bfloat16 only, got {dtype}"
    if head_dim > 256 or head_dim % 8:
        return f"{name!r} needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    return None


def _major_minor(version: str) -> tuple[int, int] | None:
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def flash_attn_version_problem(version: str | None) -> str | None:
    """Why flash-attn ``version`` cannot be used (``None``: it can; an unparsable version is
    tried, as a source build may report one)."""
    major_minor = _major_minor(str(version)) if version is not None else None
    if major_minor is None or FLASH_ATTN_MIN_VERSION <= major_minor < FLASH_ATTN_END_VERSION:
        return None
    return (f"flash-attn {version} is installed but moba_dist calls its private varlen functions, "
            f"checked for {FLASH_ATTN_RANGE}: pip install '{FLASH_ATTN_RANGE}' (the automatic "
            "choice uses PyTorch's bundled FlashAttention-2, backend 'aten_flash', meanwhile)")


def _empty_rows_to_neg_inf(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill_(torch.isposinf(lse), float("-inf"))


class AtenFlashBackend:
    """``torch.ops.aten._flash_attention_forward/_backward`` (ships with PyTorch)."""

    name = "aten_flash"

    @property
    def installed(self) -> bool:
        """Whether this PyTorch build ships FlashAttention-2 (whatever the inputs)."""
        return (hasattr(torch.ops.aten, "_flash_attention_forward")
                and torch.backends.cuda.is_flash_attention_available())

    def supports(self, device, dtype, head_dim):
        return self.why_not(device, dtype, head_dim) is None

    def why_not(self, device, dtype, head_dim) -> str | None:
        """Why these inputs cannot run here (``None``: they can)."""
        reason = _cuda_half_why_not(self.name, device, dtype, head_dim)
        if reason is None and not self.installed:
            reason = ("PyTorch's bundled FlashAttention is not available in this build "
                      "(torch.backends.cuda.is_flash_attention_available() is False)")
        return reason

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        out, lse, _, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0, causal, False,
            scale=softmax_scale,
        )
        return out, _empty_rows_to_neg_inf(lse)

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        # Dropout is off, so the RNG state the kernel would read is never used. Deterministic mode
        # is read by PyTorch inside the op (no argument).
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
        self._fai, self._missing = None, None
        try:
            import flash_attn
            from flash_attn import flash_attn_interface as fai
        except Exception as exc:  # ImportError, or a binary built for another torch
            self._missing = (f"the flash-attn package does not import ({type(exc).__name__}: {exc}); "
                             f"install it with pip install '{FLASH_ATTN_RANGE}' (or moba-dist[flash])")
            return
        self._missing = flash_attn_version_problem(getattr(flash_attn, "__version__", None))
        if self._missing is None:
            self._fai = fai

    @property
    def installed(self) -> bool:
        """Whether a flash-attn in the checked range imports (whatever the inputs)."""
        return self._fai is not None

    def supports(self, device, dtype, head_dim):
        return self.why_not(device, dtype, head_dim) is None

    def why_not(self, device, dtype, head_dim) -> str | None:
        """Why these inputs cannot run here (``None``: they can)."""
        return self._missing or _cuda_half_why_not(self.name, device, dtype, head_dim)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        out, lse, _, _ = self._fai._flash_attn_varlen_forward(
            q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
        )
        return out, _empty_rows_to_neg_inf(lse)

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self._fai._flash_attn_varlen_backward(
            dout, q, k, v, out, lse, dq, dk, dv, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=0.0,
            softmax_scale=softmax_scale, causal=causal, window_size_left=-1, window_size_right=-1,
            softcap=0.0, alibi_slopes=None, deterministic=deterministic_mode(), rng_state=None,
        )
        return dq, dk, dv
