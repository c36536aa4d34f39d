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

from dataclasses import dataclass, field, replace

import torch
from torch.profiler import record_function

from .kernels import AttnBackend, accum_dtype, index_add_rows, merge_slots
from .memory import workspace_limit
from .parallel.comm import Comm
from .parallel.plan import expand_ranges
from .settings import SELECTED_ENV, Settings


@dataclass(frozen=True)
class SelBatch:
    """A run of consecutive selected-part segments processed together (bounds memory)."""

    pairs: slice  # of the plan's pairs, in segment order (see CoreMeta.pair_ids)
    rows: slice  # the key rows of its segments, numbered over all segments in plan order
    cu_q: torch.Tensor  # int32 [segments + 1], relative to the batch
    cu_k: torch.Tensor
    max_q: int
    window: int = 0  # the query window (``CoreMeta.window_rows`` tokens) every pair lies in
    segs: slice = field(default_factory=lambda: slice(0, 0))  # its segments, in plan order
    # Into CoreMeta.run_start/run_len: the pool runs of its segments.
    runs: slice = field(default_factory=lambda: slice(0, 0))


@dataclass(frozen=True)
class KVFetch:
    """The all-to-all that brings this rank the key/value rows it selected from other ranks.

    Rows are head-major pairs ``[rows, 2, D]`` (key, value). ``send_index [sum(send_splits)]``
    are head-major rows ``g * n + t`` of the local K/V (see :func:`head_major`; gathered from
    ``k, v`` directly, no head-major copy is made) sent to each destination in rank order;
    received rows come in source order. ``comm=None`` (one device) sends nothing.
    """

    comm: Comm | None
    send_index: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    wire_dtype: torch.dtype = torch.bfloat16  # K/V dtype: what gradients travel back in

    def start(self, k: torch.Tensor, v: torch.Tensor, name: str = "kv_fetch"):
        """Post the fetch of rows of the local ``k, v [n, Hkv, D]``; returns a handle to
        ``wait()``."""
        if self.comm is None:
            return _Ready(k.new_empty(0, 2, k.shape[-1]))
        rows = token_rows(self.send_index, k.shape[0], k.shape[1])
        send = torch.stack([_flat(k)[rows], _flat(v)[rows]], 1)
        return self.comm.start_all_to_all(send, self.send_splits, self.recv_splits, name)

    def return_grads(self, dk_recv: torch.Tensor, dv_recv: torch.Tensor, dk_loc: torch.Tensor,
                     dv_loc: torch.Tensor, hkv: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Send the gradients of the received rows (``[R, D]`` each) back and add what comes back
        to the owner's rows ``dk_loc, dv_loc [n * Hkv, D]`` (token-major, row ``t * Hkv + g``:
        ``dk.view(-1, D)``); returns those (in the accumulation dtype when anything came back).
        A row that several ranks fetched gets their contributions in source order, so the sum is
        deterministic."""
        if self.comm is None:
            return dk_loc, dv_loc
        back = self.comm.start_all_to_all(torch.stack([dk_recv, dv_recv], 1).to(self.wire_dtype),
                                          self.recv_splits, self.send_splits, "kv_fetch.backward").wait()
        if not sum(self.send_splits):
            return dk_loc, dv_loc
        acc = accum_dtype(self.wire_dtype)
        dk_loc, dv_loc = dk_loc.to(acc), dv_loc.to(acc)
        start = 0
        for count in self.send_splits:
            if count:
                # A source sends each row at most once: gather, add, scatter (no atomics).
                rows = token_rows(self.send_index[start:start + count], dk_loc.shape[0] // hkv, hkv)
                dk_loc[rows] = dk_loc[rows] + back[start:start + count, 0].to(acc)
                dv_loc[rows] = dv_loc[rows] + back[start:start + count, 1].to(acc)
            start += count
        return dk_loc, dv_loc


class _Ready:
    def __init__(self, value):
        self.value = value

    def wait(self):
        return self.value


FUSED_MAX_CHUNK = 512  # auto: blocks up to this size go to the fused kernel, larger to varlen ones


def use_fused_selected(device: torch.device, dtype: torch.dtype, chunk: int,
                       choice: str | None = None) -> bool:
    """Whether the selected part runs in the fused Triton kernel (``kernels/triton_moba.py``)
    rather than the varlen backend; ``choice`` (:attr:`moba_dist.Settings.selected_kernel`;
    default: ``$MOBA_DIST_SELECTED_KERNEL`` read now): ``auto`` (CUDA, bf16/fp16,
    ``chunk <= FUSED_MAX_CHUNK``), ``triton`` (also float32, and on CPU under
    ``TRITON_INTERPRET=1``, for tests) or ``varlen``."""
    if choice is None:
        choice = Settings.from_env().selected_kernel
    elif choice not in ("auto", "triton", "varlen"):
        raise ValueError(f"selected_kernel: expected auto, triton or varlen, got {choice!r}")
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
    seg_start: torch.Tensor  # int64 [segments]: first row in the kernel's K/V (see in_place)
    seg_len: torch.Tensor  # int32 [segments]
    rows: int  # len(seg_index), host
    chunk: int  # host bound on seg_len
    in_place: bool = False  # every segment is one run of the pool: seg_start are pool rows
    grad_start: torch.Tensor | None = None  # int64 [segments]: segment-major row of each segment
    # int64 [segments]: set on one device: the kernel reads ``k, v`` themselves (no head-major
    # pool), segment g at element offset[g] of ``k[:, 0]``/``v[:, 0]`` (row stride k.stride(0))
    offset: torch.Tensor | None = None
    # int32 [Hq]: set: ``sel`` holds block ids, segment ``sel + head_offset[h]`` (mapped per window)
    head_offset: torch.Tensor | None = None


@dataclass(frozen=True)
class CoreMeta:
    """Host sizes and device index tensors of one call's kernels and fetch."""

    cu_self: torch.Tensor  # int32 [P + 1]: the local block parts (self part, causal)
    max_self: int
    seg_index: torch.Tensor  # int32 [rows] pool rows of every key segment, in segment order (fused)
    sel_batches: list[SelBatch]
    max_k_sel: int
    fetch: KVFetch
    softmax_scale: float
    backend: AttnBackend
    keep_fetched: bool
    fused: FusedSel | None = None  # set: the selected part runs in the fused Triton kernel
    overlaps: bool = True  # some pool row is in two segments (a causal prefix overlaps a block)
    workspace: int = 1 << 30  # transient bytes allowed (moba_dist.memory.workspace_bytes)
    window_rows: int = 1 << 62  # tokens per query window of the varlen path (see row_window)
    # Host (first part, end part, first token, end token) of each piece the self part's backward
    # runs in (see self_pieces); empty: one call.
    self_pieces: tuple[tuple[int, int, int, int], ...] = ()
    # The varlen path's (query, head, slot) pairs: ``pair_ids.window_ids(pair_sel, w)`` gives
    # window ``w``'s ``(t * Hq + h) * pair_slots + slot`` ids in segment order (the batches'
    # ``pairs`` minus ``pair_ids.base[w]``), rebuilt from the gate's selection ``pair_sel``
    # (int16 below 2**15 blocks) in forward and backward (see parallel/moba_cp.PairIds).
    pair_sel: torch.Tensor | None = None
    pair_ids: object | None = None
    pair_slots: int = 1  # partial results per row: topk - 1, plus one for a causal prefix
    # Set: the varlen forward hands the backend its key segments in place (``kv_offsets``, one
    # device: every segment one run of local rows) instead of gathering them per batch.
    kv_in_place: bool = False
    # The varlen path's key segments as runs of pool rows, int32 (a batch's ``runs``), expanded
    # per batch: no table of every segment's rows is kept (4096/12 at 1M: 0.57 GiB).
    run_start: torch.Tensor | None = None
    run_len: torch.Tensor | None = None


def sel_batches(seg_counts: torch.Tensor, seg_len: torch.Tensor, budget: int, pair_bytes: int,
                key_bytes: int) -> list[SelBatch]:
    """Cut the selected part into batches whose buffers fit ``budget`` bytes.

    A batch gathers ``P`` (query, head) rows and the ``K`` key rows of their segments and holds
    ``P * pair_bytes + K * key_bytes`` bytes of scratch at most (see :func:`pair_row_bytes`).
    Segments are taken in order; a segment with more pairs than fit beside its keys is split into
    pieces (the same keys, disjoint query rows: each query's softmax over the segment does not
    depend on the others), each such piece a batch of its own. Host tensors in and out (the
    caller uploads the ``cu`` tables with the rest of the plan)."""
    n_seg = seg_counts.numel()
    if n_seg == 0:
        return []
    seg_counts, seg_len = seg_counts.to(torch.int64), seg_len.to(torch.int64)
    chunk = int(seg_len.max())
    max_pairs = max(1, (budget - chunk * key_bytes) // max(pair_bytes, 1))
    pieces = (seg_counts + max_pairs - 1) // max_pairs
    seg = torch.repeat_interleave(torch.arange(n_seg), pieces)
    first_piece = torch.cumsum(pieces, 0) - pieces
    j = torch.arange(seg.numel()) - first_piece[seg]
    pair_cu = torch.cumsum(seg_counts, 0) - seg_counts
    p_start = pair_cu[seg] + j * max_pairs
    p_len = torch.minimum(seg_counts[seg] - j * max_pairs, torch.tensor(max_pairs))
    # A piece of a split segment fills its batch (two pieces of one segment never share one).
    cost = torch.where(pieces[seg] > 1, budget, p_len * pair_bytes + seg_len[seg] * key_bytes)
    cost_cu = torch.cat([cost.new_zeros(1), torch.cumsum(cost, 0)])
    row_cu = torch.cat([seg_len.new_zeros(1), torch.cumsum(seg_len, 0)])
    batches, a, n_pieces = [], 0, seg.numel()
    while a < n_pieces:
        b = int(torch.searchsorted(cost_cu, cost_cu[a] + budget, right=True)) - 1
        b = min(max(b, a + 1), n_pieces)
        s = seg[a:b]
        k0 = row_cu[s[0]]
        cu_q = torch.cat([p_len.new_zeros(1), torch.cumsum(p_len[a:b], 0)])
        cu_k = torch.cat([row_cu[s] - k0, (row_cu[s[-1] + 1] - k0).view(1)])
        batches.append(SelBatch(
            pairs=slice(int(p_start[a]), int(p_start[b - 1] + p_len[b - 1])),
            rows=slice(int(k0), int(row_cu[s[-1] + 1])),
            cu_q=cu_q.to(torch.int32),
            cu_k=cu_k.to(torch.int32),
            max_q=int(p_len[a:b].max()),
            segs=slice(int(s[0]), int(s[-1]) + 1),
        ))
        a = b
    return batches


def window_bytes(window: int, hq: int, head_dim: int, slots: int, elem: int, acc_elem: int = 4) -> int:
    """Bytes of one query window's (``window`` tokens x ``hq`` heads) merge buffers on the varlen
    path: forward, each row's ``slots`` partial outputs in the input dtype (``elem`` bytes) and
    their LSEs (``acc_elem``); backward, the window's ``dq`` in the accumulation dtype (no more
    than the forward's once ``slots >= 2``). See :func:`row_window`."""
    return window * hq * max(slots * (head_dim * elem + acc_elem), head_dim * acc_elem)


def row_window(budget: int, n: int, hq: int, head_dim: int, chunk: int, slots: int, elem: int,
               acc_elem: int = 4) -> int:
    """Tokens per query window of the varlen selected part: the pairs are planned window by
    window, and the merge buffers (forward: every row's slot partials; backward: ``dq``) exist
    for one window's rows at a time, a quarter of the workspace budget. At least one block
    (``chunk``), so a causal prefix's queries share a window; at most ``n`` (one window)."""
    per_token = window_bytes(1, hq, head_dim, slots, elem, acc_elem)
    return max(min(chunk, max(n, 1)), min(max(n, 1), (budget // 4) // per_token))


def window_batches(seg_counts: torch.Tensor, seg_len: torch.Tensor, seg_win: torch.Tensor, budget: int,
                   pair_bytes: int, key_bytes: int) -> list[SelBatch]:
    """:func:`sel_batches` of each query window's segments (``seg_win``, ascending: the segments
    of a window are consecutive), with slices into the whole plan and the window recorded."""
    batches = []
    bounds = torch.cat([torch.zeros(1, dtype=torch.int64),
                        torch.cumsum(torch.bincount(seg_win), 0)]) if seg_win.numel() else [0]
    pair_cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(seg_counts.to(torch.int64), 0)])
    row_cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(seg_len.to(torch.int64), 0)])
    for w in range(len(bounds) - 1):
        a, b = int(bounds[w]), int(bounds[w + 1])
        if a == b:
            continue
        p0, r0 = int(pair_cu[a]), int(row_cu[a])
        for x in sel_batches(seg_counts[a:b], seg_len[a:b], budget, pair_bytes, key_bytes):
            batches.append(replace(x, pairs=slice(x.pairs.start + p0, x.pairs.stop + p0),
                                   rows=slice(x.rows.start + r0, x.rows.stop + r0), window=w,
                                   segs=slice(x.segs.start + a, x.segs.stop + a)))
    return batches


def pair_row_bytes(head_dim: int, elem: int) -> tuple[int, int]:
    """Scratch bytes per gathered (query, head) row and per key row of a selected-part batch
    (backward, the larger direction): the gathered ``dout, q, out`` rows and the row's ``dq`` in
    the input dtype, the kernel's float32 ``dq`` accumulator and its float32 copy, LSE and index;
    per key row: keys and values gathered, their gradients, and the pair written back."""
    return head_dim * (4 * elem + 8) + 16, 6 * head_dim * elem


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _gather(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``t * H + h`` of ``x [n, H, D]`` as ``[len(rows), D]``, read in place also when ``x``
    is a strided view (an HF layer's ``[B, H, S, D]`` transposed), where flattening it would copy
    all of ``x`` for every batch."""
    if x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1):  # (t, h) flatten to a view
        return _flat(x)[rows]
    h = x.shape[1]
    return x[rows // h, rows % h]


def _pick(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``t * Hq + h`` of ``x [n, Hq, D]`` as ``[len(rows), 1, D]``."""
    return _gather(x, rows).unsqueeze(1)


def head_major(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[Hkv * n, 2, D]``: row ``g * n + t`` holds (key, value) of local token ``t``, head ``g``;
    every (head, block part) is then a contiguous range of rows. The plan numbers local K/V rows
    this way; only the fused kernel reads such a copy (the varlen path gathers from ``k, v``
    through :func:`token_rows`)."""
    n, hkv, d = k.shape
    return torch.stack([k, v], 1).permute(2, 0, 1, 3).reshape(hkv * n, 2, d)


def token_rows(hm_rows: torch.Tensor, n: int, hkv: int) -> torch.Tensor:
    """Head-major rows ``g * n + t`` as rows ``t * Hkv + g`` of ``k.view(-1, D)``."""
    return hm_rows % max(n, 1) * hkv + hm_rows // max(n, 1)


def kv_offsets(hm_rows: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Element offsets from ``k[0, 0, 0]`` of head-major rows ``g * n + t`` of ``k [n, Hkv, D]``
    (any strides): where a segment starting at that row begins, for a backend that reads
    segments in place (``CudnnBackend.forward(kv_offsets=...)``)."""
    n = max(k.shape[0], 1)
    rows = hm_rows.long()
    return rows % n * k.stride(0) + rows // n * k.stride(1)


def _pool(recv: torch.Tensor, kv_hm: torch.Tensor) -> torch.Tensor:
    """Received rows then local head-major rows; on one device (nothing received) no copy."""
    return kv_hm if recv.shape[0] == 0 else torch.cat([recv, kv_hm])


def _segment_kv(recv: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of pool rows ``idx`` (received rows ``[0, R)``, then the local rows in
    head-major order) as two contiguous ``[len(idx), 1, D]`` tensors, gathered from ``recv`` and
    ``k, v`` without building the pool."""
    r, (n, hkv, _) = recv.shape[0], k.shape
    local = token_rows((idx - r).clamp_min(0), n, hkv)
    kb, vb = _gather(k, local), _gather(v, local)
    if r:
        here = (idx >= r)[:, None]
        far = idx.clamp_max(r - 1)
        kb = torch.where(here, kb, recv[:, 0][far])
        vb = torch.where(here, vb, recv[:, 1][far])
    return kb.unsqueeze(1), vb.unsqueeze(1)


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
        out, lse, recv = core_forward(q, k, v, meta)
        # The plan's index tensors go through save_for_backward like the activations, so that
        # activation checkpointing drops them with the rest (and recomputes them) instead of
        # keeping every layer's plan alive until its backward.
        plan, ctx.meta = split_plan(meta)
        kept = (recv,) if meta.keep_fetched else ()
        ctx.n_kept = len(kept)
        ctx.save_for_backward(q, k, v, out, lse, *kept, *plan)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        kept, plan = rest[:ctx.n_kept], rest[ctx.n_kept:]
        meta = join_plan(plan, ctx.meta)
        dq, dk, dv = core_backward(dout, q, k, v, out, lse, meta, kept[0] if kept else None)
        return dq, dk, dv, None


_PLAN_FIELDS = ("cu_self", "seg_index", "pair_sel", "run_start", "run_len")
_FUSED_FIELDS = ("sel", "seg_start", "seg_len", "grad_start", "offset", "head_offset")


def split_plan(meta: CoreMeta) -> tuple[list[torch.Tensor], CoreMeta]:
    """The device index tensors of ``meta`` (those that grow with the tokens) and ``meta``
    without them; :func:`join_plan` puts them back."""
    tensors = [getattr(meta, f) for f in _PLAN_FIELDS]
    fused = meta.fused
    if fused is not None:
        tensors += [getattr(fused, f) for f in _FUSED_FIELDS]
        fused = replace(fused, **dict.fromkeys(_FUSED_FIELDS))
    fetch = KVFetch(meta.fetch.comm, None, meta.fetch.send_splits, meta.fetch.recv_splits,
                    meta.fetch.wire_dtype)
    tensors.append(meta.fetch.send_index)
    present = tuple(t is not None for t in tensors)
    bare = replace(meta, fused=fused, fetch=fetch, **dict.fromkeys(_PLAN_FIELDS))
    return [t for t in tensors if t is not None], (bare, present)


def join_plan(tensors, split) -> CoreMeta:
    """Inverse of :func:`split_plan`."""
    bare, present = split
    it = iter(tensors)
    full = [next(it) if p else None for p in present]
    fused = bare.fused
    n = len(_PLAN_FIELDS)
    if fused is not None:
        fused = replace(fused, **dict(zip(_FUSED_FIELDS, full[n:n + len(_FUSED_FIELDS)])))
    fetch = KVFetch(bare.fetch.comm, full[-1], bare.fetch.send_splits, bare.fetch.recv_splits,
                    bare.fetch.wire_dtype)
    return replace(bare, fused=fused, fetch=fetch, **dict(zip(_PLAN_FIELDS, full[:n])))


def core_forward(q, k, v, meta: CoreMeta):
    """Forward of :class:`MoBACore` without autograd: ``(out [n, Hq, D], lse [Hq, n], recv)``,
    ``recv`` the fetched K/V rows (what ``keep_fetched`` keeps for backward)."""
    be, scale = meta.backend, meta.softmax_scale
    n, hq, _ = q.shape
    with record_function("moba.fetch.start"):
        pending = meta.fetch.start(k, v)  # in flight while the self part runs
    with record_function("moba.self"):
        if n:
            with workspace_limit(meta.workspace):
                out, lse = be.forward(q, k, v, meta.cu_self, meta.cu_self, meta.max_self,
                                      meta.max_self, scale, True)
        else:
            out, lse = torch.zeros_like(q), q.new_zeros(hq, 0, dtype=accum_dtype(q.dtype))
    with record_function("moba.fetch.wait"):
        recv = pending.wait()
    with record_function("moba.selected"):
        out, lse = _selected_forward(q, k, v, recv, out, lse, meta)
    return out, lse, recv


def core_backward(dout, q, k, v, out, lse, meta: CoreMeta, recv: torch.Tensor | None = None):
    """Backward of :class:`MoBACore` given the forward's ``out, lse`` (and ``recv`` if kept;
    otherwise the rows are fetched again): ``dq, dk, dv`` in the inputs' dtypes."""
    be, scale = meta.backend, meta.softmax_scale
    n = q.shape[0]
    dout = dout.contiguous()
    with record_function("moba.bwd.fetch.start"):
        pending = _Ready(recv) if recv is not None else meta.fetch.start(k, v, "kv_fetch.refetch")
    with record_function("moba.bwd.self"):
        if n and meta.self_pieces:
            dq, dk, dv = _self_backward_pieces(dout, q, k, v, out, lse, meta)
        elif n:
            with workspace_limit(meta.workspace):
                dq, dk, dv = be.backward(dout, q, k, v, out, lse, meta.cu_self, meta.cu_self,
                                         meta.max_self, meta.max_self, scale, True)
        else:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dk, dv = dk.contiguous(), dv.contiguous()  # the selected part adds into their flat views
    with record_function("moba.bwd.fetch.wait"):
        recv = pending.wait()
    with record_function("moba.bwd.selected"):
        # Adds the local rows' key and value gradients into the self part's ``dk, dv`` in place.
        dq, dk_recv, dv_recv = _selected_backward(dout, q, k, v, out, lse, recv, dq, dk, dv, meta)
    del recv
    with record_function("moba.bwd.return_grads"):
        dk_loc, dv_loc = meta.fetch.return_grads(dk_recv, dv_recv, _flat(dk), _flat(dv), k.shape[1])
    return dq.to(q.dtype), dk_loc.view(k.shape).to(k.dtype), dv_loc.view(v.shape).to(v.dtype)


def self_backward_bytes(tokens: int, hq: int, d: int) -> int:
    """Scratch of a flash-style varlen backward over ``tokens`` rows of ``hq`` heads: a float32
    dQ accumulator and, under GQA, float32 dK/dV per q head (what cuDNN's and FlashAttention-2's
    backward allocate)."""
    return 12 * tokens * hq * d


def self_pieces(part_len: torch.Tensor, hq: int, d: int, budget: int) -> tuple[tuple[int, ...], ...]:
    """Cut the self part (block parts of ``part_len`` tokens, host) into runs of whole parts whose
    backward scratch (:func:`self_backward_bytes`) is about ``budget`` (equal token counts, cut at
    part boundaries): ``(part_a, part_b, token_a, token_b)`` each, or ``()`` when one call fits.
    The own blocks are independent, so running them in pieces changes nothing but the scratch."""
    total = int(part_len.sum())
    pieces = -(-self_backward_bytes(total, hq, d) // max(budget, 1))
    if pieces <= 1 or part_len.numel() < 2:
        return ()
    ends = torch.cumsum(part_len.to(torch.int64), 0)
    cuts = torch.searchsorted(ends, torch.arange(1, pieces) * total // pieces, right=False) + 1
    cuts = sorted(set([0, *cuts.clamp(1, part_len.numel() - 1).tolist(), part_len.numel()]))
    starts = torch.cat([ends.new_zeros(1), ends]).tolist()
    return tuple((a, b, starts[a], starts[b]) for a, b in zip(cuts[:-1], cuts[1:]))


def _self_backward_pieces(dout, q, k, v, out, lse, meta: CoreMeta):
    """The self part's backward in the runs of :func:`self_pieces`: token slices of contiguous
    rows (no copies), each with its own ``cu_seqlens``."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for a, b, ta, tb in meta.self_pieces:
        cu = meta.cu_self[a:b + 1] - ta
        with workspace_limit(meta.workspace):
            dq_p, dk_p, dv_p = meta.backend.backward(
                dout[ta:tb], q[ta:tb], k[ta:tb], v[ta:tb], out[ta:tb], lse[:, ta:tb], cu, cu,
                meta.max_self, meta.max_self, meta.softmax_scale, True)
        dq[ta:tb], dk[ta:tb], dv[ta:tb] = dq_p, dk_p, dv_p
        del dq_p, dk_p, dv_p
    return dq, dk, dv


def kernel_share(budget: int) -> int:
    """The part of a call's workspace budget that the varlen kernel's tiles get while a
    selected-part batch is alive (``moba_dist.memory.workspace_limit``, read by the torch
    backend); the window's merge buffers and the batch's own buffers share the rest (see
    ``parallel/moba_cp.py``), so that all three together stay within the budget."""
    return budget // 4


def _selected_forward(q, k, v, recv, out, lse, meta: CoreMeta):
    """Merge the selected part into the self part's ``out [n, Hq, D]``, ``lse [Hq, n]``."""
    if meta.fused is not None:
        return _fused_forward(q, recv, k, v, out, lse, meta)
    if not meta.sel_batches:
        return out, lse
    n, hq, d = q.shape
    slots = meta.pair_slots
    out, lse = out.contiguous(), lse.contiguous()
    for w, batches in _by_window(meta):
        # Each (row, slot) pair's partial result lands in its slot of the window's buffers (one
        # write per pair, no accumulation), then one pass merges every row of the window with
        # its own block's result, over ``out, lse`` in place.
        r0, r1 = _window_range(w, meta.window_rows, n, hq)
        part_out = q.new_empty((r1 - r0) * slots, d)
        part_lse = lse.new_full(((r1 - r0) * slots,), float("-inf"))
        for b, ids in _window_pairs(meta, w, batches):
            if meta.kv_in_place:  # one run per segment
                kv, kw = (k, v), dict(kv_offsets=kv_offsets(meta.run_start[b.runs], k))
            else:
                kv, kw = _segment_kv(recv, k, v, _batch_rows(meta, b)), {}
            with workspace_limit(kernel_share(meta.workspace)):
                o_sel, lse_sel = meta.backend.forward(_pick(q, ids // slots), *kv, b.cu_q, b.cu_k, b.max_q,
                                                      meta.max_k_sel, meta.softmax_scale, False, **kw)
            del kv, kw
            ids -= r0 * slots
            part_out.index_copy_(0, ids, o_sel[:, 0].to(part_out.dtype))
            part_lse.index_copy_(0, ids, lse_sel[0].to(part_lse.dtype))
            del ids, o_sel, lse_sel  # before the next batch's buffers are made
        merge_slots(part_out, part_lse, slots, out, lse, r0 // hq)
        del part_out, part_lse
    return out.to(q.dtype), lse


def _batch_rows(meta: CoreMeta, b: SelBatch) -> torch.Tensor:
    """Pool rows (int64) of batch ``b``'s key segments, in order, from the plan's runs."""
    return expand_ranges(meta.run_start[b.runs].long(), meta.run_len[b.runs].long(),
                         b.rows.stop - b.rows.start)


def _by_window(meta: CoreMeta):
    """``(window, its batches)`` in plan order (a window's batches are consecutive)."""
    batches = meta.sel_batches
    i = 0
    while i < len(batches):
        j = i
        while j < len(batches) and batches[j].window == batches[i].window:
            j += 1
        yield batches[i].window, batches[i:j]
        i = j


def _window_pairs(meta: CoreMeta, w: int, batches):
    """``(batch, int64 pair ids)`` of window ``w``'s batches; the window's ids are rebuilt once
    from the plan's selection (``CoreMeta.pair_ids``)."""
    ids_w, base = meta.pair_ids.window_ids(meta.pair_sel, w), meta.pair_ids.base[w]
    for b in batches:
        yield b, ids_w[b.pairs.start - base:b.pairs.stop - base].long()


def _window_range(w: int, window: int, n: int, hq: int) -> tuple[int, int]:
    """Flat ``t * Hq + h`` rows of query window ``w``."""
    return w * window * hq, min(n, (w + 1) * window) * hq


def _selected_backward(dout, q, k, v, out, lse, recv, dq, dk, dv, meta: CoreMeta):
    """Selected part's backward: ``dq`` (the self part's ``dq`` plus the selected part's) and the
    key and value gradients of the received rows, ``dk_recv, dv_recv [R, D]``; those of the local
    rows are added into ``dk, dv [n, Hkv, D]`` (the self part's, contiguous) in place."""
    r, (n, hkv, d) = recv.shape[0], k.shape
    if meta.fused is not None:
        from .kernels.triton_moba import add_head_major_

        dq, dk_pool, dv_pool = _fused_backward(dout, q, out, lse, recv, k, v, dq, meta)
        add_head_major_(dk, dk_pool[r:])
        add_head_major_(dv, dv_pool[r:])
        return dq, dk_pool[:r], dv_pool[:r]
    # A key row gets one gradient per batch that reads it: from each piece of a split segment
    # and, where a causal prefix overlaps a selected block, from both. Batches add in order, and
    # within one batch ``index_put_(accumulate=True)`` adds duplicates deterministically (CPU:
    # in index order; CUDA: sorted), so the result does not vary from run to run. The local rows'
    # gradients go straight into the self part's ``dk, dv`` (no pool-sized gradient buffer).
    dkv_recv = k.new_zeros(r, 2, d)
    dk_flat, dv_flat = _flat(dk), _flat(dv)
    if meta.sel_batches:
        acc = accum_dtype(q.dtype)
        n, hq, _ = q.shape
        dq_rows = _flat(dq)
        lse_rows = lse.t().reshape(-1)
        for w, batches in _by_window(meta):
            # The self part's dq of the window in float32 plus every selected pair's, rounded
            # once (as a whole-tensor float32 dq would be), one window at a time.
            r0, r1 = _window_range(w, meta.window_rows, n, hq)
            # (In place when dq already is in the accumulation dtype.)
            dq_w = dq_rows[r0:r1].to(acc)
            for b, ids in _window_pairs(meta, w, batches):
                rows = ids // meta.pair_slots
                idx = _batch_rows(meta, b)
                k_b, v_b = _segment_kv(recv, k, v, idx)
                with workspace_limit(kernel_share(meta.workspace)):
                    dq_b, dk_b, dv_b = meta.backend.backward(
                        _pick(dout, rows), _pick(q, rows), k_b, v_b, _pick(out, rows),
                        lse_rows[rows].unsqueeze(0).contiguous(), b.cu_q, b.cu_k, b.max_q,
                        meta.max_k_sel, meta.softmax_scale, False)
                del k_b, v_b
                index_add_rows(dq_w, rows - r0, dq_b[:, 0].to(acc))  # a row repeats once per block
                dk_b, dv_b = dk_b[:, 0].to(dk.dtype), dv_b[:, 0].to(dv.dtype)
                local = token_rows((idx - r).clamp_min(0), n, hkv)
                if r:  # rows of both kinds in one batch: each side adds zeros for the other's rows
                    here = (idx >= r)[:, None]
                    far = idx.clamp_max(r - 1)
                    dkv_recv.index_put_((far,), torch.stack([dk_b, dv_b], 1) * ~here[:, :, None],
                                        accumulate=True)
                    dk_b, dv_b = dk_b * here, dv_b * here
                dk_flat.index_put_((local,), dk_b, accumulate=True)
                dv_flat.index_put_((local,), dv_b, accumulate=True)
                del rows, idx, dq_b, dk_b, dv_b, local
            if dq_w.dtype != dq_rows.dtype:
                dq_rows[r0:r1] = dq_w
            del dq_w
        dq = dq_rows.view(q.shape)
    return dq, dkv_recv[:, 0], dkv_recv[:, 1]


def _fused_pools(recv, k, v, meta: CoreMeta):
    """Keys and values ``[rows, D]`` the fused kernel reads: ``k, v`` themselves on one device
    (``FusedSel.offset``: no copy at all), the head-major pool when every segment is one run of
    it (``FusedSel.in_place``: one copy of the local K/V), else a segment-major gathered copy."""
    if meta.fused.offset is not None:
        return k[:, 0], v[:, 0]
    pool = _pool(recv, head_major(k, v))
    if meta.fused.in_place:
        return pool[:, 0], pool[:, 1]
    kv_seg = pool[meta.seg_index]
    return kv_seg[:, 0], kv_seg[:, 1]


def _partial_bytes(meta: CoreMeta) -> int:
    """Float32 partial results (forward) and dq parts (backward) of the fused kernel at once: a
    quarter of the workspace, the rest covering the kernel's other buffers (delta, dk/dv, the
    pair order) and the own block's gradients alive beside them. (A forward-only call's
    workspace is itself a quarter of the training budget: see ``parallel/moba_cp.py``.)"""
    return max(1 << 20, meta.workspace // 4)


def _fused_forward(q, recv, k, v, out, lse, meta: CoreMeta):
    """The selected part and its LSE merge with the self part in one fused Triton kernel."""
    from .kernels.triton_moba import DEFAULT_CONFIG, selected_attn_fwd

    f = meta.fused
    k_seg, v_seg = _fused_pools(recv, k, v, meta)
    cfg = replace(DEFAULT_CONFIG, max_partial_bytes=_partial_bytes(meta))
    # The self part's output is dead after the merge: the result is written over it.
    return selected_attn_fwd(q, k_seg, v_seg, f.seg_start, f.seg_len, f.sel, f.chunk, meta.softmax_scale,
                             self_out=out, self_lse=lse, out_dtype=q.dtype, config=cfg, in_place=True,
                             seg_offset=f.offset, head_offset=f.head_offset)


def _fused_backward(dout, q, out, lse, recv, k, v, dq, meta: CoreMeta):
    """Backward of :func:`_fused_forward`'s selected part, outputs as :func:`_selected_backward`.
    The self part's ``dq`` is added inside the kernel; key and value gradients come back in
    pool rows directly when segments are runs of the pool that do not overlap."""
    from .kernels.triton_moba import DEFAULT_CONFIG, selected_attn_bwd

    f = meta.fused
    k_seg, v_seg = _fused_pools(recv, k, v, meta)
    rows = recv.shape[0] + k.shape[0] * k.shape[1]
    direct = f.in_place and not meta.overlaps
    cfg = replace(DEFAULT_CONFIG, max_partial_bytes=_partial_bytes(meta))
    dq, dk, dv = selected_attn_bwd(dout, q, k_seg, v_seg, f.seg_start, f.seg_len, f.sel, f.chunk,
                                   out, lse, meta.softmax_scale, config=cfg, dq_base=dq, dq_dtype=q.dtype,
                                   grad_start=f.seg_start if direct else f.grad_start,
                                   grad_rows=rows if direct else f.rows, seg_offset=f.offset,
                                   head_offset=f.head_offset)
    if direct:
        return dq, dk, dv
    # Segment-major gradients to pool rows. A pool row belongs to at most two segments, and to
    # two only when a causal-prefix segment overlaps a selected block: two additions onto zero
    # give the same sum in either order (deterministic); otherwise a plain scatter.
    dk_pool = dk.new_zeros(rows, dk.shape[-1])
    dv_pool = dv.new_zeros(rows, dv.shape[-1])
    dk_pool.index_put_((meta.seg_index,), dk, accumulate=meta.overlaps)
    dv_pool.index_put_((meta.seg_index,), dv, accumulate=meta.overlaps)
    return dq, dk_pool, dv_pool
