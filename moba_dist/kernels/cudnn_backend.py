"""cuDNN backend: varlen attention with LSE through NVIDIA's cuDNN frontend (``import cudnn``).

Install with ``pip install moba-dist[cudnn]`` (the ``nvidia-cudnn-frontend`` package). Runs on
Hopper or later (compute capability >= 9.0), fp16/bf16, head dims 16..128 in multiples of 16 (what
cuDNN's SDPA backward supports), cuDNN >= 9.6 (ragged offsets with GQA).

How a varlen call maps onto one cuDNN SDPA graph
------------------------------------------------
All segments go into one graph execution. cuDNN sees a padded batch ``[B, H, S, D]`` whose rows
live in the packed ``[T, H, D]`` tensors: each tensor gets a *ragged offset* column (int64
``[B + 1, 1, 1, 1]``, element offset of every batch's first row) and the batch lengths come from
``seq_len_q``/``seq_len_kv`` (int32 ``[B, 1, 1, 1]``). All of it is computed on the device from
``cu_seqlens``; nothing is read back to the host.

*Shape classes.* ``B`` (segments, padded with zero-length segments to a power of two) and ``S``
(``max_seqlen`` rounded up on a geometric grid) are bucketed, and so are the token totals the
backward sizes its dQ accumulator with. A graph is cached per (bucketed shape, heads, head dim,
dtype, causal, scale, device), so a training loop builds each graph once.

*Causal, bottom-right.* Query ``i`` of a segment with ``Lq`` queries and ``Lk`` keys sees keys
``j <= i + Lk - Lq``. When ``Lq > Lk`` the first ``Lq - Lk`` queries see nothing; cuDNN's
bottom-right mask is only specified for ``Lq <= Lk`` per batch, so those rows are cut off the
front of the batch (its ragged offset moves forward, its length shrinks to ``min(Lq, Lk)``).
Likewise a segment without keys hands cuDNN no queries. cuDNN never writes rows outside the
batches it is given, so outputs are pre-filled: ``out``/``dq`` with 0 and the LSE with ``-inf``,
which is the interface's value for rows that see no key.

*LSE.* cuDNN's "stats" are the natural-log log-sum-exp of the scaled scores per (row, head).
They are written token-major ``[Tq, Hq]`` through a ragged offset (or, when a cuDNN build rejects
ragged stats, padded ``[B, Hq, S]`` and gathered) and transposed to the interface's ``[Hq, Tq]``.
The backward takes the caller's (merged) LSE the same way and never recomputes it.

Graph construction is tried in a few *variants* (mask spelling, stats layout, shared or separate
offset tensors); the first that builds is used and remembered. ``MOBA_DIST_CUDNN_VARIANT`` pins
one, e.g. ``stats=padded,mask=legacy,share=0``. A shape class no variant can build falls back to
PyTorch's FlashAttention-2 with a warning (``CudnnBackend(fallback=False)`` raises instead).
The frontend ranks cuDNN's engines and its own Python-side ones per graph;
``MOBA_DIST_CUDNN_BACKEND_ONLY=1`` (or ``backend_only=True``) keeps to cuDNN's.

Host syncs: none. Host work per call: a dictionary lookup and ~15 small kernel launches.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

_HALF = (torch.float16, torch.bfloat16)
VARIANT_ENV = "MOBA_DIST_CUDNN_VARIANT"
GQA_BWD_ENV = "MOBA_DIST_CUDNN_GQA_BWD"  # "fa2" (default): GQA backward on FlashAttention-2; "cudnn"
BACKEND_ONLY_ENV = "MOBA_DIST_CUDNN_BACKEND_ONLY"
# Plan-name prefixes of the frontend's Python-side ("FROST") SDPA engines, excluded when only
# cuDNN's own engines should run.
_PYTHON_ENGINE_PREFIXES = ("sdpa_fwd_prefill", "sdpa_bwd_")
MIN_CUDNN_VERSION = 90600  # ragged offsets with Hq != Hkv


# --------------------------------------------------------------------------------------------
# Pure planning (host ints only; unit-tested on CPU)
# --------------------------------------------------------------------------------------------


def bucket(n: int, steps_per_octave: int = 1, granule: int = 1) -> int:
    """Round ``n >= 1`` up onto a geometric grid: in ``(2**e, 2**(e+1)]`` the grid step is
    ``max(granule, 2**e // steps_per_octave)``. ``steps_per_octave=1, granule=1`` is the next power
    of two; larger ``steps_per_octave`` wastes at most ``1/steps_per_octave`` of ``n``."""
    n = max(int(n), 1)
    e = (n - 1).bit_length() - 1 if n > 1 else 0
    step = max(granule, (1 << e) // steps_per_octave, 1)
    return -(-n // step) * step


@dataclass(frozen=True)
class ShapeClass:
    """Bucketed graph dimensions. ``total_q``/``total_k`` (packed token bounds that size the
    backward's dQ accumulator) are 0 for the forward, which does not need them."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    total_q: int = 0
    total_k: int = 0


# Token totals bound the backward's float32 accumulators (rows x heads x head dim x 4 bytes).
# Below this many accumulator bytes they share one class: the selected part of MoBA makes
# hundreds of small calls per layer whose totals differ by a few rows, and on a fine grid each
# new total was a new graph (tens per training step, up to seconds each to build).
TOTAL_GRANULE_BYTES = 32 << 20


def total_granule(heads: int, head_dim: int) -> int:
    """Rows of the totals' grid step at small totals: a power of two >= 64 whose float32
    accumulator (``heads x head_dim``) is at most :data:`TOTAL_GRANULE_BYTES`."""
    rows = TOTAL_GRANULE_BYTES // max(4 * heads * head_dim, 1)
    return max(64, 1 << max(rows.bit_length() - 1, 0))


def shape_class(n_segments: int, max_seqlen_q: int, max_seqlen_k: int, total_q: int = 0,
                total_k: int = 0, heads_q: int = 1, heads_k: int = 1, head_dim: int = 128) -> ShapeClass:
    """The shape class of a call: segments to the next power of two (padding segments are empty),
    max lengths to a quarter-octave grid of multiples of 64, totals to an eighth-octave grid whose
    step is at least :func:`total_granule` rows (an accumulator overshoot of at most 1/8 or 32 MiB)."""
    gq, gk = total_granule(heads_q, head_dim), total_granule(heads_k, head_dim)
    return ShapeClass(
        batch=bucket(n_segments),
        seqlen_q=bucket(max_seqlen_q, 4, 64),
        seqlen_k=bucket(max_seqlen_k, 4, 64),
        total_q=bucket(total_q, 8, gq) if total_q else 0,
        total_k=bucket(total_k, 8, gk) if total_k else 0,
    )


class RaggedMeta(NamedTuple):
    """Device tensors describing a call to cuDNN (``B`` = bucketed batch).

    ``seq_q``/``seq_k`` int32 ``[B, 1, 1, 1]``: rows given to cuDNN per batch (queries after the
    rows that see no key are cut off; 0 for padding batches). ``off_q`` int64 ``[B + 1, 1, 1, 1]``:
    element offset of each batch's first query row in ``[Tq, Hq, D]`` (also O, dO, dQ);
    ``off_kv`` the same for ``[Tk, Hkv, D]`` (K, V, dK, dV); ``off_stats`` for ``[Tq, Hq]``
    float32 stats. ``q_start`` int64 ``[B + 1]``: the first query row handed to cuDNN per batch.
    """

    seq_q: torch.Tensor
    seq_k: torch.Tensor
    off_q: torch.Tensor
    off_kv: torch.Tensor
    off_stats: torch.Tensor
    q_start: torch.Tensor


def ragged_metadata(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, batch: int, hq: int,
                    hkv: int, head_dim: int, causal: bool) -> RaggedMeta:
    """Lengths and ragged offsets for ``batch >= len(cu_seqlens_q) - 1`` batches, on the device of
    ``cu_seqlens_q``, without reading anything back to the host.

    Per segment ``s`` with ``Lq`` queries and ``Lk`` keys, cuDNN gets ``Lq' = min(Lq, Lk)``
    queries when causal (else ``Lq``, or 0 when ``Lk == 0``): the *last* ``Lq'`` rows, which are
    exactly the rows that see at least one key, so the bottom-right diagonal of the shortened
    batch is the segment's own.
    """
    cq = cu_seqlens_q.to(torch.int64)
    ck = cu_seqlens_k.to(torch.int64)
    n = cq.numel() - 1
    pad = batch - n
    if pad < 0:
        raise ValueError(f"batch: {batch} is smaller than the {n} segments")
    lq = cq[1:] - cq[:-1]
    lk = ck[1:] - ck[:-1]
    if causal:
        lq_run = torch.minimum(lq, lk)
    else:
        lq_run = torch.where(lk > 0, lq, torch.zeros_like(lq))
    tail_q, tail_k = cq[-1:].expand(pad + 1), ck[-1:].expand(pad + 1)
    q_start = torch.cat([cq[1:] - lq_run, tail_q])
    k_start = torch.cat([ck[:-1], tail_k])
    zeros = lq.new_zeros(pad)
    col = (-1, 1, 1, 1)
    return RaggedMeta(
        seq_q=torch.cat([lq_run, zeros]).to(torch.int32).view(col),
        seq_k=torch.cat([lk, zeros]).to(torch.int32).view(col),
        off_q=(q_start * (hq * head_dim)).view(col),
        off_kv=(k_start * (hkv * head_dim)).view(col),
        off_stats=(q_start * hq).view(col),
        q_start=q_start,
    )


def row_positions(cu_seqlens_q: torch.Tensor, q_start: torch.Tensor, total_q: int):
    """For every query row: its segment (int64 ``[Tq]``) and its row within the batch cuDNN saw
    (negative for rows cut off because they see no key). Only the padded-stats variant needs it."""
    cq = cu_seqlens_q.to(torch.int64)
    rows = torch.arange(total_q, device=cq.device)
    seg = torch.searchsorted(cq, rows, right=True) - 1
    return seg, rows - q_start[seg]


def gather_padded_stats(stats: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Padded stats ``[B, Hq, S, 1]`` -> per-row ``[Tq, Hq]``; rows with ``pos < 0`` get -inf."""
    vals = stats[..., 0][seg, :, pos.clamp(min=0)]
    return torch.where(pos[:, None] >= 0, vals, torch.full_like(vals, float("-inf")))


def scatter_padded_stats(lse_rows: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, batch: int,
                         seqlen_q: int) -> torch.Tensor:
    """Per-row ``[Tq, Hq]`` -> padded ``[B, Hq, S, 1]`` (entries no row maps to are 0). Rows with
    ``pos < 0`` are written to one spare element past the end, so no index repeats in the tensor
    (a boolean selection would need a host sync to size its result)."""
    hq = lse_rows.shape[1]
    size = batch * hq * seqlen_q
    flat = torch.zeros(size + 1, dtype=lse_rows.dtype, device=lse_rows.device)
    heads = torch.arange(hq, device=lse_rows.device)
    idx = (seg[:, None] * hq + heads[None, :]) * seqlen_q + pos[:, None]
    idx = torch.where(pos[:, None] >= 0, idx, torch.full_like(idx, size))
    flat[idx.reshape(-1)] = lse_rows.reshape(-1)
    return flat[:size].view(batch, hq, seqlen_q, 1)


# --------------------------------------------------------------------------------------------
# Graph variants and cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """How a graph is spelled. ``mask``: ``diagonal`` (``diagonal_alignment=BOTTOM_RIGHT`` with
    right bound 0), ``legacy`` (``use_causal_mask_bottom_right``) or ``none`` (not causal).
    ``stats``: ``ragged`` (token-major through a ragged offset) or ``padded`` (dense
    ``[B, Hq, S, 1]``). ``share``: one ragged-offset tensor for all tensors with the same layout."""

    mask: str = "diagonal"
    stats: str = "ragged"
    share: bool = True

    def __str__(self) -> str:
        return f"mask={self.mask},stats={self.stats},share={int(self.share)}"


def parse_variant(text: str) -> Variant:
    """``"mask=legacy,stats=padded,share=0"`` (any subset) -> :class:`Variant`."""
    fields: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name == "share":
            fields[name] = value.strip() not in ("0", "false", "False", "no")
        elif name in ("mask", "stats"):
            fields[name] = value.strip()
        else:
            raise ValueError(f"{VARIANT_ENV}: unknown field {name!r} in {text!r}")
    v = Variant(**fields)
    if v.mask not in ("diagonal", "legacy", "none") or v.stats not in ("ragged", "padded"):
        raise ValueError(f"{VARIANT_ENV}: bad value in {text!r}")
    return v


def adapt_variant(variant: Variant, causal: bool) -> Variant:
    """``variant`` with a mask that fits ``causal`` (``none`` when not causal)."""
    if not causal:
        mask = "none"
    else:
        mask = variant.mask if variant.mask != "none" else "diagonal"
    return Variant(mask, variant.stats, variant.share)


def candidate_variants(causal: bool, preferred: Variant | None = None,
                       pinned: Variant | None = None) -> list[Variant]:
    """Variants to try in order. ``pinned``: only that one. Otherwise ``preferred`` first, then
    ragged before padded stats, the current mask API before the deprecated one, shared offsets
    before separate ones. Masks are adapted to ``causal``."""
    if pinned is not None:
        return [adapt_variant(pinned, causal)]
    masks = ("diagonal", "legacy") if causal else ("none",)
    out = [Variant(m, s, sh) for s in ("ragged", "padded") for m in masks for sh in (True, False)]
    if preferred is not None:
        first = adapt_variant(preferred, causal)
        out = [first] + [v for v in out if v != first]
    return out


def graph_key(kind: str, cls: ShapeClass, hq: int, hkv: int, head_dim: int, dtype: torch.dtype,
              causal: bool, softmax_scale: float, device_index: int,
              deterministic: bool = False, kv_row_stride: int = 0) -> tuple:
    """Cache key of one graph: everything the graph bakes in, nothing that varies per call."""
    return (kind, cls, hq, hkv, head_dim, dtype, bool(causal), float(softmax_scale), device_index,
            bool(deterministic), int(kv_row_stride))


# Operand ids in the variant pack. The ragged offsets that a shared variant folds into off_q /
# off_kv get ids of their own otherwise.
UID = dict(q=1, k=2, v=3, o=4, stats=5, do=6, dq=7, dk=8, dv=9, seq_q=10, seq_k=11, off_q=12,
           off_kv=13, off_stats=14, off_k=15, off_v=16, off_o=17, off_do=18, off_dq=19, off_dk=20,
           off_dv=21)


@dataclass
class _Plan:
    graph: Any
    workspace: int
    variant: Variant
    binds: dict[int, str]  # operand id -> name of the tensor bound to it at execution
    engine: str = ""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    builds: int = 0
    failed_builds: int = 0
    build_seconds: float = 0.0
    fallbacks: int = 0
    variants: dict[str, str] = field(default_factory=dict)  # kind -> variant that built last
    errors: list[str] = field(default_factory=list)  # last build errors, newest last


def _cudnn_dtype(cudnn, dtype: torch.dtype):
    return {torch.float16: cudnn.data_type.HALF, torch.bfloat16: cudnn.data_type.BFLOAT16}[dtype]


def _mask_kwargs(cudnn, variant: Variant) -> dict:
    if variant.mask == "diagonal":
        return dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT, diagonal_band_right_bound=0)
    if variant.mask == "legacy":
        return dict(use_causal_mask_bottom_right=True)
    return {}


class _GraphBuilder:
    """Declares the tensors of one graph in packed ``[T, H, D]`` layout with ragged offsets."""

    def __init__(self, cudnn, handle, cls: ShapeClass, hq: int, hkv: int, d: int,
                 dtype: torch.dtype, variant: Variant, backend_only: bool = False, kv_row_stride: int = 0):
        self.cudnn, self.cls, self.hq, self.hkv, self.d, self.variant = cudnn, cls, hq, hkv, d, variant
        self.backend_only = backend_only
        self.kv_row_stride = kv_row_stride  # set: one kv head, its rows this many elements apart
        self.io = _cudnn_dtype(cudnn, dtype)
        f32 = cudnn.data_type.FLOAT
        self.g = cudnn.pygraph(io_data_type=self.io, intermediate_data_type=f32, compute_data_type=f32,
                               handle=handle)
        self.binds: dict[int, str] = {}
        b = cls.batch
        self.seq_q = self.column("seq_q", b, cudnn.data_type.INT32)
        self.seq_k = self.column("seq_k", b, cudnn.data_type.INT32)
        self._offsets: dict[str, Any] = {}

    def column(self, name: str, n: int, dt, bound: str | None = None):
        self.binds[UID[name]] = bound or name
        return self.g.tensor(name=name, dim=[n, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt, uid=UID[name])

    def offset(self, own: str, source: str):
        """Ragged offset tensor for operand ``own``, whose values are those of ``source``."""
        name = source if self.variant.share else own
        if name not in self._offsets:
            self._offsets[name] = self.column(name, self.cls.batch + 1, self.cudnn.data_type.INT64, source)
        return self._offsets[name]

    def dims(self, side: str):
        """``(dim, stride)`` of a packed tensor on the query (``q``) or key (``k``) side."""
        b, d = self.cls.batch, self.d
        h, s = (self.hq, self.cls.seqlen_q) if side == "q" else (self.hkv, self.cls.seqlen_k)
        # The batch stride is a placeholder: the ragged offset gives every batch's base.
        if side == "k" and self.kv_row_stride:
            return [b, 1, s, d], [s * self.kv_row_stride, d, self.kv_row_stride, 1]
        return [b, h, s, d], [s * h * d, d, h * d, 1]

    def input(self, name: str, side: str, source: str):
        dim, stride = self.dims(side)
        self.binds[UID[name]] = name
        t = self.g.tensor(name=name, dim=dim, stride=stride, data_type=self.io, uid=UID[name])
        t.set_ragged_offset(self.offset("off_" + name, source))
        return t

    def output(self, t, name: str, side: str, source: str):
        dim, stride = self.dims(side)
        self.binds[UID[name]] = name
        t.set_uid(UID[name]).set_output(True).set_dim(dim).set_stride(stride).set_data_type(self.io)
        t.set_ragged_offset(self.offset("off_" + name, source))
        return t

    def stats_layout(self):
        b, s, h = self.cls.batch, self.cls.seqlen_q, self.hq
        if self.variant.stats == "ragged":
            return [b, h, s, 1], [s * h, 1, h, 1]
        return [b, h, s, 1], [h * s, s, 1, 1]

    def finish(self) -> _Plan:
        g, cudnn = self.g, self.cudnn
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        if self.backend_only:
            g.deselect_engines(list(_PYTHON_ENGINE_PREFIXES))
        g.check_support()
        g.build_plans()
        engine = ""
        try:  # informational only: which engine/plan the frontend chose
            engine = g.get_plan_name_at_index(getattr(g, "_plan_index", 0))
        except Exception:  # noqa: BLE001
            pass
        return _Plan(g, int(g.get_workspace_size()), self.variant, dict(self.binds), engine)


def _build_forward(cudnn, handle, cls, hq, hkv, d, dtype, scale, variant, backend_only,
                   kv_row_stride: int = 0) -> _Plan:
    b = _GraphBuilder(cudnn, handle, cls, hq, hkv, d, dtype, variant, backend_only, kv_row_stride)
    q = b.input("q", "q", "off_q")
    k = b.input("k", "k", "off_kv")
    v = b.input("v", "k", "off_kv")
    o, stats = b.g.sdpa(name="fwd", q=q, k=k, v=v, attn_scale=scale, generate_stats=True,
                        use_padding_mask=True, seq_len_q=b.seq_q, seq_len_kv=b.seq_k,
                        **_mask_kwargs(cudnn, variant))
    b.output(o, "o", "q", "off_q")
    dim, stride = b.stats_layout()
    b.binds[UID["stats"]] = "stats"
    stats.set_uid(UID["stats"]).set_output(True).set_dim(dim).set_stride(stride)
    stats.set_data_type(cudnn.data_type.FLOAT)
    if variant.stats == "ragged":
        stats.set_ragged_offset(b.offset("off_stats", "off_stats"))
    return b.finish()


def _build_backward(cudnn, handle, cls, hq, hkv, d, dtype, scale, variant, backend_only,
                    deterministic) -> _Plan:
    b = _GraphBuilder(cudnn, handle, cls, hq, hkv, d, dtype, variant, backend_only)
    q = b.input("q", "q", "off_q")
    k = b.input("k", "k", "off_kv")
    v = b.input("v", "k", "off_kv")
    o = b.input("o", "q", "off_q")
    do = b.input("do", "q", "off_q")
    dim, stride = b.stats_layout()
    b.binds[UID["stats"]] = "stats"
    stats = b.g.tensor(name="stats", dim=dim, stride=stride, data_type=cudnn.data_type.FLOAT,
                       uid=UID["stats"])
    if variant.stats == "ragged":
        stats.set_ragged_offset(b.offset("off_stats", "off_stats"))
    dq, dk, dv = b.g.sdpa_backward(
        name="bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats, attn_scale=scale,
        use_padding_mask=True, seq_len_q=b.seq_q, seq_len_kv=b.seq_k,
        # The dQ accumulator lives in the workspace; without these bounds it is sized for the
        # padded B * S rows, which can be far more than the packed tokens.
        max_total_seq_len_q=cls.total_q, max_total_seq_len_kv=cls.total_k,
        use_deterministic_algorithm=deterministic, **_mask_kwargs(cudnn, variant))
    b.output(dq, "dq", "q", "off_q")
    b.output(dk, "dk", "k", "off_kv")
    b.output(dv, "dv", "k", "off_kv")
    return b.finish()


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


def _on(device: torch.device):
    """Make ``device`` current for cuDNN calls (a no-op when it already is, or off CUDA)."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _prep(x: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte aligned base, as cuDNN's descriptors need (a contiguous view with
    an odd storage offset is copied too)."""
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


def _segments_of(k: torch.Tensor, v: torch.Tensor, kv_offsets: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """The keys and values that ``kv_offsets`` addresses, gathered as packed ``[Tk, 1, D]`` (for
    a fallback backend, which reads packed segments only)."""
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    first = torch.repeat_interleave(kv_offsets.long(), lens)
    start = torch.repeat_interleave(cu_seqlens_k[:-1].long(), lens)
    elem = first + (torch.arange(first.numel(), device=first.device) - start) * k.stride(0)
    cols = torch.arange(k.shape[-1], device=k.device)

    def take(x):
        flat = torch.as_strided(x, (x.untyped_storage().nbytes() // x.element_size() - x.storage_offset(),),
                                (1,))
        return flat[elem[:, None] + cols].unsqueeze(1)

    return take(k), take(v)


class CudnnBackend:
    """Varlen attention with LSE on cuDNN's fused SDPA (see the module docstring)."""

    name = "cudnn"

    def __init__(self, fallback: bool = True, max_graphs: int = 1024, variant: Variant | str | None = None,
                 backend_only: bool | None = None):
        self.fallback = fallback
        self.max_graphs = max_graphs
        if backend_only is None:
            backend_only = os.environ.get(BACKEND_ONLY_ENV, "0") not in ("", "0")
        self.backend_only = backend_only
        if variant is None:
            variant = os.environ.get(VARIANT_ENV) or None
        self.pinned = parse_variant(variant) if isinstance(variant, str) else variant
        self._cudnn = None
        self._import_error: str | None = None
        self._imported = False
        self._device_ok: dict[int, bool] = {}
        self._graphs: OrderedDict[tuple, _Plan | None] = OrderedDict()
        self._preferred: dict[str, Variant] = {}
        self._lock = threading.Lock()
        self._tls = threading.local()
        self.stats = CacheStats()
        self._fallback_backend = None

    # -- availability -------------------------------------------------------------------------

    def module(self):
        """The ``cudnn`` module, imported on first use; None when it does not import."""
        if not self._imported:
            with self._lock:
                if not self._imported:
                    try:
                        import cudnn

                        if int(cudnn.backend_version()) < MIN_CUDNN_VERSION:
                            raise ImportError(f"cuDNN {cudnn.backend_version()} < {MIN_CUDNN_VERSION}")
                        self._cudnn = cudnn
                    except Exception as e:  # noqa: BLE001  ImportError, missing libcudnn, ...
                        self._import_error = f"{type(e).__name__}: {e}"
                    self._imported = True
        return self._cudnn

    def _require(self):
        cudnn = self.module()
        if cudnn is None:
            raise RuntimeError(f"cudnn backend: the cudnn module is unavailable ({self._import_error})")
        return cudnn

    @property
    def installed(self) -> bool:
        """Whether the cuDNN frontend imports (``pip install moba-dist[cudnn]``)."""
        return self.module() is not None

    def why_not(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this backend cannot run these inputs (``None``: it can)."""
        if self.supports(device, dtype, head_dim):
            return None
        if device.type == "cuda" and not self.installed:
            return (f"the cuDNN frontend does not import ({self.import_error}); "
                    "install it with pip install moba-dist[cudnn]")
        return (f"'cudnn' runs float16/bfloat16 with head_dim a multiple of 16 up to 128 on "
                f"Hopper or newer GPUs, not {dtype} with head_dim={head_dim} on {device}")

    @property
    def import_error(self) -> str | None:
        self.module()
        return self._import_error

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        if device.type != "cuda" or dtype not in _HALF or head_dim % 16 or not 16 <= head_dim <= 128:
            return False
        index = device.index
        ok = self._device_ok.get(index)
        if ok is None:
            try:
                if index is None:
                    index = torch.cuda.current_device()
                ok = self._device_ok.get(index)
                if ok is None:
                    ok = torch.cuda.get_device_capability(index)[0] >= 9 and self.module() is not None
                    self._device_ok[index] = ok
            except Exception:  # noqa: BLE001  no driver, CPU-only build, bad index
                ok = False
        return ok

    # -- handles and graphs -------------------------------------------------------------------

    def _handle(self, device: torch.device):
        """This thread's cuDNN handle for ``device``, bound to torch's current stream (autograd
        runs backward on its own thread, and a handle must not be shared between threads)."""
        cudnn = self._cudnn
        handles = self._tls.__dict__.setdefault("handles", {})
        h = handles.get(device)
        if h is None:
            with _on(device):
                h = handles[device] = cudnn.create_handle()
        if device.type == "cuda":
            cudnn.set_stream(handle=h, stream=torch.cuda.current_stream(device).cuda_stream)
        return h

    def _plan(self, kind: str, key: tuple, causal: bool, build) -> _Plan | None:
        # Least recently used graphs go first: a training step cycles through more shape classes
        # than one call has (every layer's selection differs); evicting in build order can throw
        # out graphs that every step needs, to be rebuilt (up to seconds each) step after step.
        with self._lock:
            plan = self._graphs.get(key, False)
            if plan is not False:
                self._graphs.move_to_end(key)
                self.stats.hits += 1
                return plan
            self.stats.misses += 1
            variants = candidate_variants(causal, self._preferred.get(kind), self.pinned)
            plan, errors = None, []
            for variant in variants:
                t0 = time.perf_counter()
                try:
                    plan = build(variant)
                except Exception as e:  # noqa: BLE001  a decline: try the next spelling
                    self.stats.failed_builds += 1
                    errors.append(f"{kind} [{variant}]: {type(e).__name__}: {str(e)[:400]}")
                    continue
                finally:
                    self.stats.build_seconds += time.perf_counter() - t0
                self.stats.builds += 1
                self._preferred[kind] = variant
                self.stats.variants[kind] = str(variant)
                break
            self.stats.errors = (self.stats.errors + errors)[-16:]
            if plan is None:
                msg = f"cuDNN could not build the {kind} graph for {key}:\n  " + "\n  ".join(errors)
                if not self.fallback:
                    raise RuntimeError(msg)
                warnings.warn(msg + "\nusing PyTorch's FlashAttention-2 for this shape class",
                              RuntimeWarning, stacklevel=3)
            self._graphs[key] = plan
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            return plan

    def _fallback(self):
        if self._fallback_backend is None:
            from .cuda_backends import AtenFlashBackend

            self._fallback_backend = AtenFlashBackend()
        self.stats.fallbacks += 1
        return self._fallback_backend

    def _execute(self, plan: _Plan, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        pack = {uid: tensors[name] for uid, name in plan.binds.items()}
        workspace = torch.empty(max(plan.workspace, 1), dtype=torch.uint8, device=device)
        with _on(device):
            plan.graph.execute(pack, workspace, handle=self._handle(device))

    def cache_info(self) -> dict:
        """Graph-cache counters: hits, misses, builds, failed builds, build seconds, fallbacks, the
        variant each kind last built with, recent build errors, and the number of cached graphs."""
        s = self.stats
        return dict(hits=s.hits, misses=s.misses, builds=s.builds, failed_builds=s.failed_builds,
                    build_seconds=round(s.build_seconds, 3), fallbacks=s.fallbacks,
                    variants=dict(s.variants), graphs=len(self._graphs), errors=list(s.errors))

    def clear_cache(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._preferred.clear()
            self.stats = CacheStats()

    def engines(self) -> dict:
        """Cache key -> (variant, engine name, workspace MiB) of every cached graph (None: no
        variant built, the shape class falls back)."""
        return {k: (str(p.variant), p.engine, round(p.workspace / 2**20, 1)) if p is not None else None
                for k, p in self._graphs.items()}

    # -- the interface ------------------------------------------------------------------------

    @staticmethod
    def _device(q: torch.Tensor) -> torch.device:
        if q.device.type == "cuda" and q.device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return q.device

    def kv_in_place_ok(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether :meth:`forward` can read segments of ``k, v [n, Hkv, D]`` in place
        (``kv_offsets``): same strides, unit-stride rows 16-byte aligned at every token and head."""
        align = 16 // k.element_size()
        return (k.dtype == v.dtype and k.stride() == v.stride() and k.stride(-1) == 1
                and k.stride(0) % align == 0 and k.stride(1) % align == 0
                and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0)

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, kv_offsets: torch.Tensor | None = None):
        """:class:`~moba_dist.kernels.base.AttnBackend` forward. With ``kv_offsets`` (int64
        ``[segments]``), one kv head, read in place: segment ``s``'s keys are the rows
        ``kv_offsets[s] + i * k.stride(0)`` (elements from ``k``'s first element; ``i <`` the
        segment's length in ``cu_seqlens_k``) of ``k``'s storage, likewise for ``v``, so a
        caller hands over segments of ``k, v [n, Hkv, D]`` without gathering them (check
        :meth:`kv_in_place_ok` first); ``q`` is then ``[Tq, 1, D]``."""
        tq, hq, d = q.shape
        tk, hkv = k.shape[0], k.shape[1]
        row_stride = 0
        if kv_offsets is not None:
            if hq != 1 or not self.kv_in_place_ok(k, v):
                raise ValueError("kv_offsets: one query head, and k, v laid out as kv_in_place_ok() accepts")
            row_stride, hkv = k.stride(0), 1
        n_seg = cu_seqlens_q.numel() - 1
        out = torch.zeros(tq, hq, v.shape[-1], dtype=q.dtype, device=q.device)
        lse_rows = torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=q.device)
        if tq == 0 or tk == 0 or n_seg < 1 or max_seqlen_q < 1 or max_seqlen_k < 1:
            return out, lse_rows.t().contiguous()
        if v.shape[-1] != d:
            raise ValueError(f"v: head dim {v.shape[-1]} differs from q's {d}")
        dev = self._device(q)
        cudnn = self._require()
        cls = shape_class(n_seg, max_seqlen_q, max_seqlen_k)
        key = graph_key("fwd", cls, hq, hkv, d, q.dtype, causal, softmax_scale, dev.index,
                        kv_row_stride=row_stride)

        def build(variant):
            with _on(dev):
                return _build_forward(cudnn, self._handle(dev), cls, hq, hkv, d, q.dtype, softmax_scale,
                                      variant, self.backend_only, row_stride)

        plan = self._plan("fwd", key, causal, build)
        if plan is None:
            if kv_offsets is not None:
                k, v = _segments_of(k, v, kv_offsets, cu_seqlens_k)
            return self._fallback().forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                            max_seqlen_k, softmax_scale, causal)
        meta = ragged_metadata(cu_seqlens_q, cu_seqlens_k, cls.batch, hq, hkv, d, causal)
        if kv_offsets is not None:
            # Padding batches (no keys) point at the first segment: any in-bounds base will do.
            pad = kv_offsets[:1].expand(cls.batch + 1 - n_seg)
            meta = meta._replace(off_kv=torch.cat([kv_offsets.to(torch.int64), pad]).view(-1, 1, 1, 1))
        else:
            k, v = _prep(k), _prep(v)
        ragged = plan.variant.stats == "ragged"
        stats = lse_rows if ragged else torch.empty(cls.batch, hq, cls.seqlen_q, 1, dtype=torch.float32,
                                                    device=q.device)
        self._execute(plan, dict(q=_prep(q), k=k, v=v, o=out, stats=stats, **meta._asdict()), dev)
        if not ragged:
            lse_rows = gather_padded_stats(stats, *row_positions(cu_seqlens_q, meta.q_start, tq))
        return out, lse_rows.t().contiguous()

    def backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, softmax_scale, causal):
        # FlashAttention-2's varlen backward pads its float32 dQ accumulator by 128 rows per
        # sequence: with many short sequences (MoBA's own blocks at chunk 128) that doubles it,
        # so such calls stay on cuDNN, whose accumulator is bounded by the rows themselves.
        fa2_pad_ok = 128 * (cu_seqlens_q.numel() - 1) <= q.shape[0] // 4
        if q.shape[1] != k.shape[1] and fa2_pad_ok and os.environ.get(GQA_BWD_ENV, "fa2") == "fa2":
            # cuDNN 9.19's ragged backward with GQA ran at 0.92-0.95x FlashAttention-2's speed on
            # an H200 (16/4 heads, causal, 32K-128K), also with K/V repeated to 16 heads, while its
            # forward is 1.6-1.8x faster and its single-head backward (MoBA's selected part) 1.6x.
            # FA2's backward takes the cuDNN forward's output and LSE as they are.
            fallback = self._fallback()
            if fallback.supports(q.device, q.dtype, q.shape[-1]):
                return fallback.backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        return self._backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, softmax_scale, causal)

    def _backward(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, softmax_scale, causal):
        tq, hq, d = q.shape
        tk, hkv = k.shape[0], k.shape[1]
        n_seg = cu_seqlens_q.numel() - 1
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
        # Zeros, not empty: keys of a segment without queries get no batch rows in cuDNN.
        dk = torch.zeros_like(k, memory_format=torch.contiguous_format)
        dv = torch.zeros_like(v, memory_format=torch.contiguous_format)
        if tq == 0 or tk == 0 or n_seg < 1 or max_seqlen_q < 1 or max_seqlen_k < 1:
            return dq, dk, dv
        if v.shape[-1] != d:
            raise ValueError(f"v: head dim {v.shape[-1]} differs from q's {d}")
        dev = self._device(q)
        cudnn = self._require()
        deterministic = torch.are_deterministic_algorithms_enabled()
        cls = shape_class(n_seg, max_seqlen_q, max_seqlen_k, tq, tk, hq, hkv, d)
        key = graph_key("bwd", cls, hq, hkv, d, q.dtype, causal, softmax_scale, dev.index, deterministic)

        def build(variant):
            with _on(dev):
                return _build_backward(cudnn, self._handle(dev), cls, hq, hkv, d, q.dtype, softmax_scale,
                                       variant, self.backend_only, deterministic)

        plan = self._plan("bwd", key, causal, build)
        if plan is None:
            return self._fallback().backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                             max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        meta = ragged_metadata(cu_seqlens_q, cu_seqlens_k, cls.batch, hq, hkv, d, causal)
        lse_rows = torch.empty(tq, hq, dtype=torch.float32, device=q.device).copy_(lse.t())
        # Rows cuDNN is given always see a key, so their LSE is finite; a -inf there could only
        # come from an inconsistent caller, and +inf turns it into P = 0 instead of NaN.
        lse_rows.masked_fill_(torch.isneginf(lse_rows), float("inf"))
        if plan.variant.stats == "ragged":
            stats = lse_rows
        else:
            seg, pos = row_positions(cu_seqlens_q, meta.q_start, tq)
            stats = scatter_padded_stats(lse_rows, seg, pos, cls.batch, cls.seqlen_q)
        dout = _prep(dout.to(q.dtype))
        self._execute(plan, dict(q=_prep(q), k=_prep(k), v=_prep(v), o=_prep(out.to(q.dtype)),
                                 do=dout, stats=stats, dq=dq, dk=dk, dv=dv, **meta._asdict()), dev)
        return dq, dk, dv
