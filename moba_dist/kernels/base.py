"""The attention-with-LSE interface every kernel backend implements.

One primitive: attention of query rows over key rows in varlen segments (flash-attn layout),
causal or not, returning the output and the log-sum-exp of each row; plus its backward, which
takes the *final* ``out``/``lse`` of a row. Passing the final values (after several partial
results were merged) is what lets a caller split one softmax over disjoint key sets and still get
exact gradients for each set: ``dS = P * (dP - rowsum(dO * O))`` only needs the merged ``O`` and
the merged LSE.

Conventions (flash-attn's):
  * ``q [Tq, Hq, D]``, ``k, v [Tk, Hkv, D]``, ``Hq % Hkv == 0``; query head ``h`` reads kv head
    ``h // (Hq // Hkv)``.
  * ``cu_seqlens_q``/``cu_seqlens_k`` int32 ``[S + 1]`` on the tensors' device; segment ``s`` is
    rows ``[cu_q[s], cu_q[s+1])`` against rows ``[cu_k[s], cu_k[s+1])``.
  * ``causal`` is aligned bottom-right: query ``i`` of a segment with ``Lq`` queries and ``Lk``
    keys sees keys ``j <= i + Lk - Lq``.
  * ``lse`` is ``[Hq, Tq]``, natural log, float32 (float64 for float64 inputs). A row that sees no
    key gets ``lse = -inf`` and output 0.
"""

from __future__ import annotations

from typing import Protocol

import torch


class AttnBackend(Protocol):
    """A kernel backend: stateless forward/backward of varlen attention with LSE."""

    name: str

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        """Whether this backend can run on ``device`` for ``dtype`` and ``head_dim``."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        softmax_scale: float,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``out [Tq, Hq, D]`` (q's dtype) and ``lse [Hq, Tq]``."""
        ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int,
        max_seqlen_k: int,
        softmax_scale: float,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``dq, dk, dv`` shaped and typed like ``q, k, v``."""
        ...


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
