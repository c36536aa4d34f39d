"""Pure-PyTorch varlen attention with LSE: any device, any float dtype; the CPU and CI path.

Work is cut into query tiles of ``tile_q`` rows; each tile meets the keys of its own segment
only, so memory is ``O(tile_q * max_seqlen_k * Hq)`` per tile and tiles are processed in groups
under ``max_elems`` score elements. Nothing is ever ``O(Tq * Tk)``.

Host syncs: the tile table is built from ``cu_seqlens_q``/``cu_seqlens_k`` on the host (one
device-to-host copy of each per call). This backend is the portable reference path; the CUDA
backends have no such sync.

Deterministic: forward writes every output row once; backward adds key gradients of the query
tiles that share a key through :func:`moba_dist.kernels.reduce.index_add_rows` (sort-based on
CUDA under ``torch.use_deterministic_algorithms(True)``, in order on the CPU).
"""

from __future__ import annotations

import math

import torch

from .base import accum_dtype
from .reduce import index_add_rows


def _tile_table(cu_q: torch.Tensor, cu_k: torch.Tensor, tile: int):
    """Host tensors describing every query tile: first query row, #rows, first key row, #keys,
    and the causal shift (key position allowed = query position in tile + shift)."""
    cu_q = cu_q.to("cpu", torch.int64)
    cu_k = cu_k.to("cpu", torch.int64)
    lq, lk = cu_q.diff(), cu_k.diff()
    n_tiles = (lq + tile - 1) // tile
    seg = torch.repeat_interleave(torch.arange(lq.numel()), n_tiles)
    first_tile = torch.cumsum(n_tiles, 0) - n_tiles
    j = torch.arange(seg.numel()) - first_tile[seg]
    q0 = cu_q[seg] + j * tile
    qn = torch.clamp(cu_q[seg + 1] - q0, max=tile)
    shift = j * tile + lk[seg] - lq[seg]
    return q0, qn, cu_k[seg], lk[seg], shift


class TorchBackend:
    """Reference backend in plain PyTorch ops (float32/float64 accumulation)."""

    name = "torch"

    def __init__(self, tile_q: int = 64, max_elems: int = 1 << 24):
        self.tile_q = tile_q
        self.max_elems = max_elems

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return self.why_not(device, dtype, head_dim) is None

    def why_not(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why these inputs cannot run here (``None``: they can)."""
        if not dtype.is_floating_point:
            return f"the 'torch' backend runs floating-point inputs, got {dtype}"
        return None

    def _groups(self, cu_q, cu_k, hq: int):
        """Yield device index tensors for groups of tiles that fit the memory budget."""
        q0, qn, k0, kn, shift = _tile_table(cu_q, cu_k, self.tile_q)
        dev = cu_q.device
        ar_q = torch.arange(self.tile_q)
        start = 0
        while start < q0.numel():
            mk = int(kn[start:].max()) if kn.numel() else 0
            per_tile = max(1, self.tile_q * max(mk, 1) * hq)
            stop = min(q0.numel(), start + max(1, self.max_elems // per_tile))
            mk = max(int(kn[start:stop].max()), 1)
            ar_k = torch.arange(mk)
            sl = slice(start, stop)
            qvalid = ar_q[None, :] < qn[sl, None]
            kvalid = ar_k[None, :] < kn[sl, None]
            qi = torch.where(qvalid, q0[sl, None] + ar_q[None, :], 0)
            ki = torch.where(kvalid, k0[sl, None] + ar_k[None, :], 0)
            allowed = qvalid[:, :, None] & kvalid[:, None, :]
            causal_ok = ar_k[None, None, :] <= (shift[sl, None] + ar_q[None, :])[:, :, None]
            yield tuple(t.to(dev) for t in (qi, qvalid, ki, kvalid, allowed, causal_ok))
            start = stop

    @staticmethod
    def _scores(qt, kt, allowed, scale):
        # qt [n, t, Hkv, G, D], kt [n, m, Hkv, D] -> [n, Hkv, G, t, m]
        s = torch.einsum("ntkgd,nmkd->nkgtm", qt, kt) * scale
        return s.masked_fill(~allowed[:, None, None], float("-inf"))

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal):
        tq, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        acc = accum_dtype(q.dtype)
        out = torch.zeros(tq, hq, v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full((hq, tq), float("-inf"), dtype=acc, device=q.device)
        for qi, qvalid, ki, _kvalid, allowed, causal_ok in self._groups(cu_seqlens_q, cu_seqlens_k, hq):
            if causal:
                allowed = allowed & causal_ok
            n, t = qi.shape
            qt = q[qi].to(acc).view(n, t, hkv, g, d)
            s = self._scores(qt, k[ki].to(acc), allowed, softmax_scale)
            row_lse = torch.logsumexp(s, dim=-1)  # [n, Hkv, G, t]
            p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
            o = torch.einsum("nkgtm,nmkd->ntkgd", p, v[ki].to(acc)).reshape(n, t, hq, -1)
            rows = qi[qvalid]
            out[rows] = o[qvalid]
            lse[:, rows] = row_lse.reshape(n, hq, t).permute(1, 0, 2)[:, qvalid]
        return out.to(q.dtype), lse

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        tq, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        acc = accum_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dk = torch.zeros(k.shape, dtype=acc, device=q.device)
        dv = torch.zeros(v.shape, dtype=acc, device=q.device)
        lse = lse.to(acc)
        for qi, qvalid, ki, kvalid, allowed, causal_ok in self._groups(cu_seqlens_q, cu_seqlens_k, hq):
            if causal:
                allowed = allowed & causal_ok
            n, t = qi.shape
            qt = q[qi].to(acc).view(n, t, hkv, g, d)
            kt, vt = k[ki].to(acc), v[ki].to(acc)
            s = self._scores(qt, kt, allowed, softmax_scale)
            row_lse = lse[:, qi].reshape(hkv, g, n, t).permute(2, 0, 1, 3)  # [n, Hkv, G, t]
            p = torch.exp(s - torch.where(torch.isinf(row_lse), 0.0, row_lse)[..., None])
            do = dout[qi].to(acc).view(n, t, hkv, g, -1)
            delta = (do * out[qi].to(acc).view(n, t, hkv, g, -1)).sum(-1).permute(0, 2, 3, 1)
            dp = torch.einsum("ntkgd,nmkd->nkgtm", do, vt)
            ds = p * (dp - delta[..., None])
            dqt = torch.einsum("nkgtm,nmkd->ntkgd", ds, kt).reshape(n, t, hq, d) * softmax_scale
            dq[qi[qvalid]] = dqt[qvalid]
            kv_rows = ki[kvalid]  # tiles of one segment share its keys: rows repeat
            index_add_rows(dk, kv_rows, (torch.einsum("nkgtm,ntkgd->nmkd", ds, qt) * softmax_scale)[kvalid])
            index_add_rows(dv, kv_rows, torch.einsum("nkgtm,ntkgd->nmkd", p, do)[kvalid])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
