"""Pure-PyTorch varlen attention with LSE: any device, any float dtype; the CPU and CI path.

Work is cut into *tiles*: a run of query rows of one segment against the key rows that run can
see (all the segment's keys; with ``causal``, only up to the last row's diagonal). A tile reads
its queries and keys as views of the inputs where the layout allows (no gather; GQA query heads
are regrouped by kv head in one copy of the tile's rows) and holds its ``[Hq, rows, keys]``
scores once: the softmax runs in place on them. Nothing is ever ``O(Tq * Tk)``.

Memory: every tile's buffers fit the workspace budget (``moba_dist.memory``): the innermost
:func:`moba_dist.memory.workspace_limit` in force (MoBA's selected part sets its share), else the
call's own ``q + k + v + out`` bytes. :func:`tile_bytes` is the accounting (an upper bound on
what one tile holds at once, each buffer counted whether or not it is alive at the same time as
the others); a tile is as tall as the budget allows (causal tiles at most ``tile_q`` rows, to
skip the masked triangle), and only a single row beside its keys may exceed it. Besides the
tiles: the outputs (``out``/``lse``, or ``dq, dk, dv``) in the accumulation dtype, and, for
inputs narrower than it, their copy in the input dtype.

Host syncs: the tile table is built from ``cu_seqlens_q``/``cu_seqlens_k`` on the host (one
device-to-host copy of each per call). This backend is the portable reference path; the CUDA
backends have no such sync.

Deterministic: forward writes every output row once, backward writes every ``dq`` row once and
adds the key gradients of the tiles that share a key in tile order, one tile after the other.
"""

from __future__ import annotations

import math

import torch

from ..memory import kernel_workspace
from .base import accum_dtype


def tile_bytes(rows: int, keys: int, hq: int, hkv: int, d: int, dv: int, elem: int, in_elem: int,
               causal: bool, backward: bool) -> int:
    """Upper bound on the bytes one tile of ``rows`` queries and ``keys`` keys holds at once.

    ``elem`` is the accumulation dtype's size, ``in_elem`` the inputs'. Counted per tile:
    scores (forward: one buffer, the softmax in place; backward: the probabilities and ``dP``,
    then ``dS`` in place of ``dP``); the causal mask (one byte per (row, key), built with two
    int64 index vectors and a temporary of the same size); the query rows regrouped by kv head
    (and their copy in the accumulation dtype when the inputs are narrower); in backward the
    same for ``dout`` plus the ``dout * out`` product behind ``delta``; per-row statistics
    (row max, sum, LSE and their safe copies: five vectors forward, four backward); the tile's
    output (forward ``o``; backward ``dq``, ``dk`` and ``dv`` of the tile); keys and values in
    the accumulation dtype when the inputs are narrower (views otherwise)."""
    conv = 1 if in_elem != elem else 0
    scores = (2 if backward else 1) * hq * rows * keys * elem
    mask = (2 * rows * keys + 8 * (rows + keys)) if causal else 0
    q_rows = hq * rows * d * elem * (1 + conv)
    kv = conv * hkv * keys * (d + dv) * elem
    if backward:
        do_rows = hq * rows * dv * elem * (1 + conv)
        delta = hq * rows * dv * elem * (1 + 2 * conv)
        stats = 4 * hq * rows * elem
        grads = hq * rows * d * elem + hkv * keys * (d + dv) * elem
        return scores + mask + q_rows + kv + do_rows + delta + stats + grads
    return scores + mask + q_rows + kv + 5 * hq * rows * elem + hq * rows * dv * elem


def plan_tiles(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool, tile_q: int, fits) -> list:
    """Host list of tiles ``(q0, rows, k0, keys, shift)``: query rows ``[q0, q0 + rows)``
    against key rows ``[k0, k0 + keys)``; with ``causal``, row ``i`` of the tile (0-based) sees
    tile keys ``j <= i + shift``. ``fits(keys)`` is the most rows a tile with ``keys`` keys may
    have within the budget (at least 1). Tiles without a visible key are left out (their rows
    keep output 0, LSE ``-inf``, gradient 0)."""
    cu_q = cu_q.to("cpu", torch.int64).tolist()
    cu_k = cu_k.to("cpu", torch.int64).tolist()
    tiles = []
    for s in range(len(cu_q) - 1):
        qa, lq, ka, lk = cu_q[s], cu_q[s + 1] - cu_q[s], cu_k[s], cu_k[s + 1] - cu_k[s]
        if lq <= 0 or lk <= 0:
            continue
        if not causal:
            step = max(1, min(lq, fits(lk)))
            # Equal heights: the same number of tiles, none much shorter than the others.
            n_tiles = -(-lq // step)
            step = -(-lq // n_tiles)
            for a in range(0, lq, step):
                tiles.append((qa + a, min(step, lq - a), ka, lk, 0))
            continue
        shift = lk - lq  # bottom-right: row i of the segment sees keys j <= i + shift
        step = max(1, min(tile_q, lq, fits(lk)))
        for a in range(0, lq, step):
            rows = min(step, lq - a)
            keys = min(lk, a + rows + shift)
            if keys > 0:
                tiles.append((qa + a, rows, ka, keys, a + shift))
    return tiles


def _by_kv_head(x: torch.Tensor, hkv: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``x [L, Hq, D]`` as ``[Hkv, G * L, D]`` in ``dtype`` (query head ``h = kv * G + g``
    at row ``g * L + i``): a view for ``G == 1``, one copy otherwise."""
    n, hq, d = x.shape
    x = x.to(dtype)
    return x.view(n, hkv, hq // hkv, d).permute(1, 2, 0, 3).reshape(hkv, hq // hkv * n, d)


def _causal_mask(rows: int, keys: int, shift: int, device) -> torch.Tensor:
    """``[rows, keys]`` True where key ``j`` is *not* visible to row ``i`` (``j > i + shift``)."""
    limit = torch.arange(rows, device=device) + shift
    return torch.arange(keys, device=device)[None, :] > limit[:, None]


class TorchBackend:
    """Reference backend in plain PyTorch ops (float32/float64 accumulation)."""

    name = "torch"

    def __init__(self, tile_q: int = 64):
        self.tile_q = tile_q

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return self.why_not(device, dtype, head_dim) is None

    def why_not(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why these inputs cannot run here (``None``: they can)."""
        if not dtype.is_floating_point:
            return f"the 'torch' backend runs floating-point inputs, got {dtype}"
        return None

    def tiles(self, q, k, v, cu_q, cu_k, causal: bool, backward: bool) -> list:
        """The tiles of one call within its workspace budget (see :func:`plan_tiles`)."""
        hq, d = q.shape[1], q.shape[2]
        hkv, dv = k.shape[1], v.shape[2]
        budget = kernel_workspace(q, k, v)
        elem, in_elem = torch.empty(0, dtype=accum_dtype(q.dtype)).element_size(), q.element_size()

        def cost(rows, keys):
            return tile_bytes(rows, keys, hq, hkv, d, dv, elem, in_elem, causal, backward)

        def fits(keys):
            per_row = cost(2, keys) - cost(1, keys)
            return max(1, (budget - (cost(1, keys) - per_row)) // per_row)

        return plan_tiles(cu_q, cu_k, causal, self.tile_q, fits)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        tq, hq, _ = q.shape
        hkv = k.shape[1]
        acc = accum_dtype(q.dtype)
        out = torch.zeros(tq, hq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((hq, tq), float("-inf"), dtype=acc, device=q.device)
        for q0, rows, k0, keys, shift in self.tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, False):
            qt = _by_kv_head(q[q0:q0 + rows], hkv, acc)  # [Hkv, G * rows, D]
            kt = k[k0:k0 + keys].transpose(0, 1).to(acc)  # [Hkv, keys, D], a view
            s = torch.bmm(qt, kt.transpose(1, 2)).mul_(softmax_scale)
            del qt, kt
            if causal:
                s.view(hq, rows, keys).masked_fill_(_causal_mask(rows, keys, shift, q.device), float("-inf"))
            # Softmax in place: p = exp(s - max) / sum, lse = max + log(sum); a row that sees
            # no key has max -inf (shifted by 0 instead) and sum 0 (divided by 1 instead).
            mx = s.amax(-1, keepdim=True)
            mx = mx.masked_fill_(torch.isinf(mx), 0.0)
            s.sub_(mx).exp_()
            total = s.sum(-1, keepdim=True)
            row_lse = mx.add_(total.log())
            s.div_(total.masked_fill_(total == 0, 1.0))
            o = torch.bmm(s, v[k0:k0 + keys].transpose(0, 1).to(acc))  # [Hkv, G * rows, Dv]
            del s
            out[q0:q0 + rows] = o.view(hq, rows, -1).transpose(0, 1)
            lse[:, q0:q0 + rows] = row_lse.view(hq, rows)
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        acc = accum_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        for q0, rows, k0, keys, shift in self.tiles(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, True):
            rs = slice(q0, q0 + rows)
            kt = k[k0:k0 + keys].transpose(0, 1).to(acc)  # [Hkv, keys, D], a view
            vt = v[k0:k0 + keys].transpose(0, 1).to(acc)
            qt = _by_kv_head(q[rs], hkv, acc)
            p = torch.bmm(qt, kt.transpose(1, 2)).mul_(softmax_scale)
            if causal:
                p.view(hq, rows, keys).masked_fill_(_causal_mask(rows, keys, shift, q.device), float("-inf"))
            row_lse = lse[:, rs].to(acc)
            row_lse = torch.where(torch.isinf(row_lse), 0.0, row_lse).reshape(hkv, -1, 1)
            p.sub_(row_lse).exp_()  # with the final LSE: P of this key set in the merged softmax
            delta = (dout[rs].to(acc) * out[rs].to(acc)).sum(-1)  # [rows, Hq]
            delta = delta.t().reshape(hkv, -1, 1)
            dot = _by_kv_head(dout[rs], hkv, acc)  # [Hkv, G * rows, Dv]
            ds = torch.bmm(dot, vt.transpose(1, 2)).sub_(delta).mul_(p)
            del delta, vt
            dq_t = torch.bmm(ds, kt).mul_(softmax_scale)
            dq[rs] = dq_t.view(hq, rows, d).transpose(0, 1)
            del dq_t, kt
            dk[k0:k0 + keys] += torch.bmm(ds.transpose(1, 2), qt).mul_(softmax_scale).transpose(0, 1)
            del ds, qt
            dv[k0:k0 + keys] += torch.bmm(p.transpose(1, 2), dot).transpose(0, 1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
