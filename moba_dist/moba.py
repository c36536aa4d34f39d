"""Single-device MoBA: ``moba_attn_varlen`` (MoonshotAI's interface, exact semantics)."""

from __future__ import annotations

import torch

from ._validation import (
    check_cu_seqlens,
    check_cu_seqlens_form,
    check_max_seqlen,
    check_max_seqlen_form,
    check_positive_int,
    check_qkv,
    check_scale,
)
from .kernels import get_backend, varlen_attn_with_lse
from .ops import moba_attention
from .parallel.moba_cp import moba_pipeline
from .parallel.step import StepPlan
from .stats import MoBAStats, record


def causal_attn_varlen(q, k, v, cu_seqlens_host: torch.Tensor, softmax_scale: float,
                       backend: str | None) -> torch.Tensor:
    """Full causal attention within each packed sequence on one device (one varlen kernel)."""
    longest = int(cu_seqlens_host.diff().max())
    cu = cu_seqlens_host.to(device=q.device, dtype=torch.int32)
    return varlen_attn_with_lse(q, k, v, cu, cu, longest, longest, softmax_scale=softmax_scale,
                                causal=True, backend=backend)[0]


def moba_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    moba_chunk_size: int,
    moba_topk: int,
    *,
    softmax_scale: float | None = None,
    backend: str | None = None,
    plan: StepPlan | None = None,
) -> torch.Tensor:
    """Mixture of Block Attention over a packed varlen batch on one device.

    Each sequence is cut into blocks of ``moba_chunk_size`` tokens; query ``i`` attends causally
    to its own block plus the ``moba_topk - 1`` past blocks of its sequence whose mean key scores
    highest against it (``<q_i, mean(K_j)>`` in float32, ties to the lower block). The README's
    semantics section states the full contract.

    Args:
        q: ``[T, Hq, D]``; k, v: ``[T, Hkv, D]`` with ``Hq % Hkv == 0``. float32/float64 on CPU,
            bf16/fp16/float32 on CUDA.
        cu_seqlens: int32 ``[B + 1]`` sequence boundaries (``0``, non-decreasing, ``T``).
        max_seqlen: longest sequence (kept for interface compatibility; validated against
            ``cu_seqlens``).
        moba_chunk_size: block size in tokens.
        moba_topk: blocks per query including its current block; 1 means the current block only.
        softmax_scale: positive and finite; defaults to ``D ** -0.5``.
        backend: attention kernel backend (see ``moba_dist.kernels``); default automatic.
        plan: a :class:`moba_dist.StepPlan` shared by the layers of a step (made for this
            ``cu_seqlens``): ``cu_seqlens`` is then read on the host once per step instead of
            once per call. Default: the call plans alone.

    Returns:
        ``[T, Hq, D]`` in q's dtype; differentiable in q, k, v.

    Raises:
        TypeError, ValueError: naming the argument and the expected form (shapes, head counts,
            dtypes the device or backend cannot run, ``cu_seqlens``, chunk/top-k, scale, an
            unknown or missing backend).

    Selected part: on CUDA with bf16/fp16 and ``moba_chunk_size <= 512`` it runs in the fused
    Triton kernel (``kernels/triton_moba.py``: no gathers, LSE merge fused); otherwise in the
    varlen backend on gathered (query, head) rows. ``$MOBA_DIST_SELECTED_KERNEL`` (``auto``,
    ``triton``, ``varlen``) overrides the choice; ``last_stats().selected_kernel`` says which ran.

    Memory: every transient buffer (gate tiles, gathered (query, head) rows and key segments,
    partial outputs, the fused kernel's float32 partial windows, gradient batches, the
    pure-PyTorch kernels' score tiles) is sized from one byte budget, by default the call's own
    ``q + k + v + out`` bytes, a quarter of it when no gradient can be asked (``no_grad``:
    prefill) (``moba_dist.memory``; ``$MOBA_DIST_WORKSPACE_BYTES`` or
    ``set_workspace_bytes`` fix it). Besides that: the selection (``T * Hq * (topk - 1)``
    int32; the fused path maps it to segment ids one query window at a time, the varlen path
    keeps it in int16 and rebuilds each window's pair ids from it), and, in
    backward, the gradients themselves (float32 ``dq`` on the varlen path, float32 key/value
    gradients on the fused path). The fused kernel reads ``k, v`` where they are (any strides,
    the same for both; otherwise one head-major copy); so does the varlen path's forward on the
    cuDNN backend (ragged offsets into ``k, v``; ``Settings.kv_in_place``), whose backward
    gathers each batch's key segments. The varlen plan keeps its key segments as runs of rows
    (a few int32 per segment), expanded batch by batch.
    Nothing is ``O(T^2)``, no mask is built, and the only Python loops run over memory-bounded
    tiles and batches.

    Host syncs: ``cu_seqlens`` is read on the host once (once per step with ``plan``), and, on
    the varlen path only, the per-(head, block) selection counts once, to size its kernels. The
    fused kernel's plan is static: with ``plan`` such a call reads nothing from the device.

    Under ``torch.compile`` the call is one custom operator (``moba_dist.ops.moba_fwd``, its
    backward ``moba_bwd``): no graph break; the checks that read ``cu_seqlens`` and the host
    syncs run inside it, and its backward plans again from the forward's selection.
    """
    check_qkv(q, k, v)
    chunk = check_positive_int("moba_chunk_size", moba_chunk_size)
    topk = check_positive_int("moba_topk", moba_topk)
    scale = check_scale(softmax_scale, q.shape[-1])
    if torch.compiler.is_compiling():
        check_cu_seqlens_form(cu_seqlens, q.device)
        return moba_attention(q, k, v, cu_seqlens, chunk, topk, scale,
                              max_seqlen=check_max_seqlen_form(max_seqlen), backend=backend)
    get_backend(q.device, q.dtype, q.shape[-1], backend)  # an unusable backend fails before any work
    if plan is not None:
        cu = plan.one_device(cu_seqlens, q)
    else:
        cu = check_cu_seqlens(cu_seqlens, q.shape[0], q.device)
    longest = int(cu.diff().max())
    check_max_seqlen(max_seqlen, longest)
    offsets = torch.tensor([0, q.shape[0]], dtype=torch.int64)
    if topk * chunk >= longest:
        # Every past block is selected: MoBA is exactly full causal attention.
        record(MoBAStats(path="full", local_tokens=q.shape[0], host_syncs=0 if plan else 1,
                         selected_blocks_per_query=float("nan")))
        return causal_attn_varlen(q, k, v, cu, scale, backend)
    return moba_pipeline(q, k, v, cu, offsets, chunk, topk, scale, None, backend, plan=plan)
