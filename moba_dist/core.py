"""The MoBA attention step, given a plan: fetch, attend, merge, as one autograd Function.

Per direction, two groups of kernel calls:

  * *self part*: every query over its own block, causal, on **local** rows only (a block cut by
    the slice boundary contributes its local rows here);
  * *selected part*: (query, head) pairs gathered into one row each and grouped by the key
    segment they read: a selected past (kv head, block), or the causal prefix of the first local
    block that lives on earlier ranks (all of it precedes every query that reads it, so it is
    not causal). Either one fused Triton kernel over all of them with the LSE merge built in
    (``FusedSel``, small blocks on CUDA), or one varlen segment per key segment on gathered
    rows (``SelBatch``, the other cases).

The two are merged by log-sum-exp. The self part needs nothing from other ranks, so it runs
while the all-to-all of the selected rows is in flight, in forward and in backward.

Memory: forward keeps ``q, k, v, out, lse`` and the integer plan (selected pairs, pool rows),
about what FlashAttention keeps for the local slice. The fetched rows are *fetched again* in
backward (one more all-to-all, overlapped with the self part's backward) unless
``keep_fetched`` is set, which keeps them instead (memory: up to an all-gather of K and V).
Backward calls each kernel's backward with the *merged* output and LSE, which yields exact
gradients for each key set (see ``kernels/base.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from .kernels import AttnBackend, LSEAccumulator, accum_dtype, index_add_rows
from .parallel.comm import Comm


@dataclass(frozen=True)
class SelBatch:
    """A run of consecutive selected-part segments processed together (bounds memory)."""

    pairs: slice  # into pair_row
    rows: slice  # into seg_index
    cu_q: torch.Tensor  # int32 [segments + 1], relative to the batch
    cu_k: torch.Tensor
    max_q: int


@dataclass(frozen=True)
class KVFetch:
    """The all-to-all that brings this rank the key/value rows it selected from other ranks.

    Rows are head-major pairs ``[rows, 2, D]`` (key, value). ``send_index [sum(send_splits)]``
    are rows of the local head-major K/V sent to each destination in rank order; received rows
    come in source order. ``comm=None`` (one device) sends nothing.
    """

    comm: Comm | None
    send_index: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]

    def start(self, kv_hm: torch.Tensor, name: str = "kv_fetch"):
        """Post the fetch of rows from ``kv_hm [Hkv * n, 2, D]``; returns a handle to ``wait()``."""
        if self.comm is None:
            return _Ready(kv_hm.new_empty(0, *kv_hm.shape[1:]))
        return self.comm.start_all_to_all(kv_hm[self.send_index], self.send_splits,
                                          self.recv_splits, name)

    def return_grads(self, dkv_recv: torch.Tensor, dkv_hm: torch.Tensor) -> None:
        """Send gradients of the received rows back and add them to their owner's rows of
        ``dkv_hm`` (accumulation dtype). A row that several ranks fetched gets their
        contributions in source order, one index_add per source, so the sum is deterministic."""
        if self.comm is None:
            return
        back = self.comm.start_all_to_all(dkv_recv, self.recv_splits, self.send_splits,
                                          "kv_fetch.backward").wait()
        start = 0
        for count in self.send_splits:
            if count:
                # A source sends each row at most once: gather, add, scatter (no atomics).
                rows = self.send_index[start:start + count]
                dkv_hm[rows] = dkv_hm[rows] + back[start:start + count].to(dkv_hm.dtype)
            start += count


class _Ready:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


SELECTED_ENV = "MOBA_DIST_SELECTED_KERNEL"
FUSED_MAX_CHUNK = 512  # auto: blocks up to this size go to the fused kernel, larger to varlen ones


def use_fused_selected(device: torch.device, dtype: torch.dtype, chunk: int) -> bool:
    """Whether the selected part runs in the fused Triton kernel (``kernels/triton_moba.py``)
    rather than the varlen backend; ``$MOBA_DIST_SELECTED_KERNEL``: ``auto`` (default: CUDA,
    bf16/fp16, ``chunk <= FUSED_MAX_CHUNK``), ``triton`` (also float32, and on CPU under
    ``TRITON_INTERPRET=1``, for tests) or ``varlen``."""
    choice = os.environ.get(SELECTED_ENV, "auto")
    if choice not in ("auto", "triton", "varlen"):
        raise ValueError(f"{SELECTED_ENV}: expected auto, triton or varlen, got {choice!r}")
    if choice == "varlen" or (choice == "auto" and (
            device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16)
            or chunk > FUSED_MAX_CHUNK)):
        return False
    try:
        from .kernels import triton_moba  # noqa: F401
    except Exception as e:  # no Triton, or one that cannot build here
        if choice == "triton":
            raise ValueError(f"{SELECTED_ENV}=triton: the Triton kernel does not import ({e})") from e
        return False
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{SELECTED_ENV}=triton: runs bfloat16, float16 or float32, got {dtype}")
    return True


@dataclass(frozen=True)
class FusedSel:
    """The selected part in the fused Triton kernel's index format (``kernels/triton_moba.py``):
    segment ``g`` is rows ``[seg_start[g], seg_start[g] + seg_len[g])`` of the segment-major
    K/V that ``CoreMeta.seg_index`` gathers from the pool."""

    sel: torch.Tensor  # int32 [n, Hq, S]: segment read by (query, head, slot), -1 for none
    seg_start: torch.Tensor  # int64 [segments]
    seg_len: torch.Tensor  # int32 [segments]
    rows: int  # len(seg_index), host
    chunk: int  # host bound on seg_len


@dataclass(frozen=True)
class CoreMeta:
    """Host sizes and device index tensors of one call's kernels and fetch."""

    cu_self: torch.Tensor  # int32 [P + 1]: the local block parts (self part, causal)
    max_self: int
    pair_row: torch.Tensor | None  # [pairs] int32 flat ``t * Hq + h`` row of each selected pair, by segment
    seg_index: torch.Tensor  # [rows] pool rows of every key segment, in segment order
    sel_batches: list[SelBatch]
    max_k_sel: int
    fetch: KVFetch
    softmax_scale: float
    backend: AttnBackend
    keep_fetched: bool
    fused: FusedSel | None = None  # set: the selected part runs in the fused Triton kernel
    overlaps: bool = True  # some pool row is in two segments (a causal prefix overlaps a block)


def sel_batches(seg_counts: torch.Tensor, seg_len: torch.Tensor, max_pairs: int) -> list[SelBatch]:
    """Group consecutive segments so each batch gathers at most ``max_pairs`` (query, head) rows
    (a single larger segment gets a batch of its own). Host tensors in and out (the caller
    uploads the ``cu`` tables together with the rest of the plan)."""
    batches = []
    n_seg = seg_counts.numel()
    pair_cu = torch.cat([seg_counts.new_zeros(1), torch.cumsum(seg_counts, 0)])
    row_cu = torch.cat([seg_len.new_zeros(1), torch.cumsum(seg_len, 0)])
    a = 0
    while a < n_seg:
        b = int(torch.searchsorted(pair_cu, pair_cu[a] + max_pairs, right=True)) - 1
        b = min(max(b, a + 1), n_seg)
        if int(pair_cu[b] - pair_cu[a]):
            batches.append(SelBatch(
                pairs=slice(int(pair_cu[a]), int(pair_cu[b])),
                rows=slice(int(row_cu[a]), int(row_cu[b])),
                cu_q=(pair_cu[a:b + 1] - pair_cu[a]).to(torch.int32),
                cu_k=(row_cu[a:b + 1] - row_cu[a]).to(torch.int32),
                max_q=int(seg_counts[a:b].max()),
            ))
        a = b
    return batches


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _pick(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``t * Hq + h`` of ``x [n, Hq, D]`` as ``[len(rows), 1, D]``."""
    return _flat(x)[rows].unsqueeze(1)


def head_major(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[Hkv * n, 2, D]``: row ``g * n + t`` holds (key, value) of local token ``t``, head ``g``;
    every (head, block part) is then a contiguous range of rows."""
    n, hkv, d = k.shape
    return torch.stack([k, v], 1).permute(2, 0, 1, 3).reshape(hkv * n, 2, d)


def _segment_kv(pool: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of pool rows ``idx`` as two contiguous ``[len(idx), 1, D]`` tensors."""
    return pool[:, 0][idx].unsqueeze(1), pool[:, 1][idx].unsqueeze(1)


class MoBACore(torch.autograd.Function):
    """``out = softmax attention over (own block, causal) ∪ (selected blocks, fetched)``.

    Inputs: ``q [n, Hq, D]``, ``k, v [n, Hkv, D]`` (this rank's slice) and the plan in ``meta``.
    Output ``[n, Hq, D]`` in q's dtype. Communicated: the selected rows (``meta.fetch``), again
    in backward unless ``keep_fetched``, and their gradients back to their owners.

    The selected part runs in batches of consecutive segments (``meta.sel_batches``) so that the
    gathered query rows, key segments, partial outputs and gradients never exceed one batch.
    """

    @staticmethod
    def forward(ctx, q, k, v, meta: CoreMeta):
        be, scale = meta.backend, meta.softmax_scale
        n, hq, _ = q.shape
        with record_function("moba.fetch.start"):
            kv_hm = head_major(k, v)
            pending = meta.fetch.start(kv_hm)  # in flight while the self part runs
        with record_function("moba.self"):
            if n:
                out, lse = be.forward(q, k, v, meta.cu_self, meta.cu_self, meta.max_self,
                                      meta.max_self, scale, True)
            else:
                out, lse = torch.zeros_like(q), q.new_zeros(hq, 0, dtype=accum_dtype(q.dtype))
        with record_function("moba.fetch.wait"):
            recv = pending.wait()
        with record_function("moba.selected"):
            out, lse = _selected_forward(q, recv, kv_hm, out, lse, meta)
        ctx.meta = meta
        kept = (recv,) if meta.keep_fetched else ()
        ctx.save_for_backward(q, k, v, out, lse, *kept)
        return out

    @staticmethod
    def backward(ctx, dout):
        meta = ctx.meta
        q, k, v, out, lse, *kept = ctx.saved_tensors
        be, scale = meta.backend, meta.softmax_scale
        n = q.shape[0]
        acc = accum_dtype(q.dtype)
        dout = dout.contiguous()
        with record_function("moba.bwd.fetch.start"):
            kv_hm = head_major(k, v)
            pending = _Ready(kept[0]) if kept else meta.fetch.start(kv_hm, "kv_fetch.refetch")
        with record_function("moba.bwd.self"):
            if n:
                dq, dk, dv = be.backward(dout, q, k, v, out, lse, meta.cu_self, meta.cu_self,
                                         meta.max_self, meta.max_self, scale, True)
            else:
                dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        with record_function("moba.bwd.fetch.wait"):
            recv = pending.wait()
        with record_function("moba.bwd.selected"):
            dq, dpool = _selected_backward(dout, q, out, lse, recv, kv_hm, dq, meta)
        with record_function("moba.bwd.return_grads"):
            n_recv = recv.shape[0]
            dkv_hm = dpool[n_recv:].to(acc)
            meta.fetch.return_grads(dpool[:n_recv], dkv_hm)
        hkv = k.shape[1]
        dkv = dkv_hm.view(hkv, n, 2, k.shape[-1]).permute(1, 2, 0, 3)  # [n, 2, Hkv, D]
        dk = (dk.to(acc) + dkv[:, 0]).to(k.dtype)
        dv = (dv.to(acc) + dkv[:, 1]).to(v.dtype)
        return dq.to(q.dtype), dk, dv, None


def _selected_forward(q, recv, kv_hm, out, lse, meta: CoreMeta):
    """Merge the selected part into the self part's ``out [n, Hq, D]``, ``lse [Hq, n]``."""
    if meta.fused is not None:
        return _fused_forward(q, recv, kv_hm, out, lse, meta)
    if not meta.sel_batches:
        return out, lse
    n, hq, _ = q.shape
    pool = torch.cat([recv, kv_hm])
    merged = LSEAccumulator(_flat(out), lse.t().reshape(-1))
    for b in meta.sel_batches:
        rows = meta.pair_row[b.pairs].long()
        k_b, v_b = _segment_kv(pool, meta.seg_index[b.rows])
        o_sel, lse_sel = meta.backend.forward(_pick(q, rows), k_b, v_b, b.cu_q, b.cu_k, b.max_q,
                                              meta.max_k_sel, meta.softmax_scale, False)
        merged.add(o_sel[:, 0], lse_sel[0], rows)
    acc_out, acc_lse = merged.result()
    return acc_out.to(q.dtype).view(n, hq, -1), acc_lse.view(n, hq).t().contiguous()


def _selected_backward(dout, q, out, lse, recv, kv_hm, dq, meta: CoreMeta):
    """Selected part's backward: ``dq`` (accumulation dtype) and the gradient of every pool row
    ``dpool [R + Hkv * n, 2, D]`` (q's dtype; received rows first, then local head-major)."""
    if meta.fused is not None:
        return _fused_backward(dout, q, out, lse, recv, kv_hm, dq, meta)
    pool = torch.cat([recv, kv_hm])
    # A pool row is written by at most two segments (a selected block and the causal prefix
    # that overlaps it), and two additions onto zero give the same result in either order, so
    # the accumulating write below is deterministic; without a prefix it is a plain scatter.
    dpool = torch.zeros_like(pool)
    if not meta.sel_batches:
        return dq, dpool
    acc = accum_dtype(q.dtype)
    dq = _flat(dq).to(acc)
    lse_rows = lse.t().reshape(-1)
    for b in meta.sel_batches:
        rows = meta.pair_row[b.pairs].long()
        idx = meta.seg_index[b.rows]
        k_b, v_b = _segment_kv(pool, idx)
        dq_b, dk_b, dv_b = meta.backend.backward(
            _pick(dout, rows), _pick(q, rows), k_b, v_b, _pick(out, rows),
            lse_rows[rows].unsqueeze(0).contiguous(), b.cu_q, b.cu_k, b.max_q, meta.max_k_sel,
            meta.softmax_scale, False)
        index_add_rows(dq, rows, dq_b[:, 0].to(acc))  # a row repeats once per selected block
        dpool.index_put_((idx,), torch.cat([dk_b, dv_b], 1), accumulate=meta.overlaps)
    return dq.view(q.shape), dpool


def _segment_pools(recv, kv_hm, meta: CoreMeta):
    """The pool, and keys and values of every segment, segment-major ``[rows, D]`` each."""
    pool = torch.cat([recv, kv_hm])
    kv_seg = pool[meta.seg_index]
    return pool, kv_seg[:, 0], kv_seg[:, 1]


def _fused_forward(q, recv, kv_hm, out, lse, meta: CoreMeta):
    """The selected part and its LSE merge with the self part in one fused Triton kernel."""
    from .kernels.triton_moba import selected_attn_fwd

    f = meta.fused
    _, k_seg, v_seg = _segment_pools(recv, kv_hm, meta)
    return selected_attn_fwd(q, k_seg, v_seg, f.seg_start, f.seg_len, f.sel, f.chunk, meta.softmax_scale,
                             self_out=out, self_lse=lse, out_dtype=q.dtype)


def _fused_backward(dout, q, out, lse, recv, kv_hm, dq, meta: CoreMeta):
    """Backward of :func:`_fused_forward`'s selected part: ``dq`` (accumulation dtype) plus
    ``dpool`` as in :func:`_selected_backward`."""
    from .kernels.triton_moba import selected_attn_bwd

    f = meta.fused
    pool, k_seg, v_seg = _segment_pools(recv, kv_hm, meta)
    dq_sel, dk, dv = selected_attn_bwd(dout, q, k_seg, v_seg, f.seg_start, f.seg_len, f.sel, f.chunk,
                                       out, lse, meta.softmax_scale, grad_start=f.seg_start,
                                       grad_rows=f.rows)
    # As in _selected_backward: a pool row belongs to at most two segments, and to two only
    # when a causal-prefix segment overlaps a selected block; otherwise a plain scatter.
    dpool = torch.zeros_like(pool)
    dpool.index_put_((meta.seg_index,), torch.stack([dk, dv], 1).to(pool.dtype), accumulate=meta.overlaps)
    return dq.to(dq_sel.dtype) + dq_sel, dpool
