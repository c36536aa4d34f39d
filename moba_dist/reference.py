"""Dense, mask-based references written straight from the semantics (docs/semantics.md).

For tests only: each builds the full ``[H, L, L]`` score matrix of every sequence, so memory is
``O(H * L^2)``. Gradients come from autograd through plain ops.
"""

from __future__ import annotations

import math

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1)


def masked_attention(q, k, v, mask, softmax_scale=None):
    """Softmax attention of ``q [Lq, Hq, D]`` over ``k, v [Lk, Hkv, D]`` restricted to
    ``mask [Hq or 1, Lq, Lk]`` (True = may attend); rows with no allowed key give 0."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = _acc(q.dtype)
    hq = q.shape[1]
    s = torch.einsum("ihd,jhd->hij", q.to(acc), _expand_kv(k, hq).to(acc)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", p, _expand_kv(v, hq).to(acc)).to(q.dtype)


def moba_selection_reference(q, k, chunk: int, topk: int) -> torch.Tensor:
    """Selected-block mask ``[Hq, L, nblocks]`` of one sequence, per docs/semantics.md."""
    length, hq, _ = q.shape
    acc = _acc(q.dtype)
    nb = -(-length // chunk)
    means = torch.stack([k[j * chunk:(j + 1) * chunk].to(acc).mean(0) for j in range(nb)])
    # Each score by the same elementwise product and sum whatever its position (a GEMM may
    # round equal scores of equal blocks differently in different tiles, deciding ties).
    qa, ma = q.detach().to(acc), _expand_kv(means.detach(), hq)
    gate = torch.stack([(qa * ma[j]).sum(-1) for j in range(nb)], -1).permute(1, 0, 2)  # [Hq, L, nb]
    dev = q.device
    qblock = torch.arange(length, device=dev) // chunk
    past = torch.arange(nb, device=dev)[None, :] < qblock[:, None]  # [L, nb]
    gate = gate.masked_fill(~past[None], float("-inf"))
    # A stable descending sort keeps the lower block first among equal scores.
    order = torch.sort(gate, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(nb, device=dev).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(-1, order, ranks)
    chosen = past[None] & (rank < topk - 1)
    chosen[:, torch.arange(length, device=dev), qblock] = True
    return chosen


def moba_attn_varlen_reference(q, k, v, cu_seqlens, moba_chunk_size: int, moba_topk: int,
                               softmax_scale=None):
    """Single-device MoBA by explicit masks; same signature order as ``moba_attn_varlen``."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs, ks, vs = q[s:e], k[s:e], v[s:e]
        length = e - s
        chosen = moba_selection_reference(qs, ks, moba_chunk_size, moba_topk)
        kblock = torch.arange(length, device=q.device) // moba_chunk_size
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        mask = chosen[:, :, kblock] & causal[None]
        outs.append(masked_attention(qs, ks, vs, mask, softmax_scale))
    return torch.cat(outs) if outs else torch.empty_like(q)


def causal_attn_varlen_reference(q, k, v, cu_seqlens, softmax_scale=None):
    """Full causal attention within each packed sequence."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        mask = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()[None]
        outs.append(masked_attention(q[s:e], k[s:e], v[s:e], mask, softmax_scale))
    return torch.cat(outs) if outs else torch.empty_like(q)
