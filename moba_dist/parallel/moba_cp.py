"""MoBA over a context-parallel group: summaries -> gate -> plan -> fetch -> attend.

The single-device function runs the same pipeline with a world of one and no collectives, so the
two paths cannot drift apart.

Communication per call, per rank (W ranks, N blocks, Hkv kv heads, D head dim):

  1. ``all_gather`` of local slice lengths with the cross-rank agreement check (W rows of 60
     int64; done by the caller, ``parallel/api.py`` through ``parallel/handshake.py``),
  2. ``all_gather`` of float64 key sums of the block parts held locally
     (``max parts x Hkv x D`` doubles),
  3. ``all_gather`` of per-(kv head, block) selection counts (``Hkv x N + 1`` ints),
  4. ``all_to_all_single`` of exactly the key/value rows other ranks selected (uneven splits),
     overlapped with the self-block kernel; backward fetches them again (unless
     ``keep_fetched``) while the self block's backward runs, then sends their gradients back the
     same way, summed at the owner.

Host syncs (both needed to size the all-to-all, nothing else waits on the device; counted in
``MoBAStats.host_syncs``):
  A. after (1): slice lengths and ``cu_seqlens`` to the host, in one copy (once per step with a
     :class:`~moba_dist.parallel.step.StepPlan`, which also skips (1) in later layers);
  B. after (3): the selection counts to the host (every MoBA layer; on one device only on the
     varlen path: the fused kernel's one-device plan is static, see ``_static_fused_meta``).
Host-planned index tables go to the device in one pinned, non-blocking copy per call, and the
layout-only tables (which depend on ``cu_seqlens``, the slice offsets and ``chunk`` alone) are
planned and uploaded once per layout and reused by every layer (``plan.stream_plan``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.profiler import record_function

from ..core import (
    CoreMeta,
    FusedSel,
    KVFetch,
    MoBACore,
    kernel_share,
    pair_row_bytes,
    row_window,
    self_pieces,
    use_fused_selected,
    window_batches,
    window_bytes,
)
from ..device import to_device, to_host
from ..gating import block_means, block_part_sums, gate_tile_elems, gate_tiles, select_blocks
from ..kernels import accum_dtype, get_backend
from ..memory import MIN_WORKSPACE, workspace_bytes, workspace_override
from ..settings import Settings
from ..stats import MoBAStats, record
from .balance import balanced_offsets, move_rows, should_balance
from .comm import Comm
from .plan import StreamPlan, expand_ranges, fetch_plan, stream_plan


def _cu(lengths: torch.Tensor) -> torch.Tensor:
    """int32 cumulative offsets ``[0, l0, l0+l1, ...]`` (host)."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu.to(torch.int32)


def _layout_tables(sp: StreamPlan, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Device copies of the layout-only tables of this rank, made once per layout and device."""
    key = ("tables", rank, str(device))
    cached = sp.device_cache.get(key)
    if cached is None:
        lp = sp.ranks[rank]
        names = ("start", "first_block", "length", "part_start", "part_len", "cu_self")
        host = [sp.layout.start, sp.layout.first_block, sp.layout.length, lp.part_start,
                lp.part_len, _cu(lp.part_len)]
        *dev, = to_device(host + [p.part_block for p in sp.ranks], device)
        cached = dict(zip(names, dev))
        cached["cu_self"] = cached["cu_self"].to(torch.int32)
        cached["part_blocks"] = dev[len(names):]  # every rank's, in rank order
        sp.device_cache[key] = cached
    return cached


def _block_summaries(k, sp: StreamPlan, tables, comm, dtype) -> torch.Tensor:
    """Mean key of every block of the stream, ``[N, Hkv, D]`` in ``dtype``. Each rank sums the
    block parts it holds in float64; the parts are added in float64, where bf16/fp16 sums are
    exact, so the means are bitwise those of the single-device call however blocks are cut."""
    layout = sp.layout
    sums_local = block_part_sums(k.detach(), tables["part_start"], tables["part_len"], layout.chunk)
    sums = torch.zeros(layout.num_blocks, *k.shape[1:], dtype=sums_local.dtype, device=k.device)
    blocks = tables["part_blocks"]
    if comm is None:
        sums.index_add_(0, blocks[0], sums_local)
    else:
        width = max(p.part_block.numel() for p in sp.ranks)
        padded = sums_local.new_zeros(width, *k.shape[1:])
        padded[: sums_local.shape[0]] = sums_local
        gathered = comm.all_gather(padded, "block_sums")
        for r, p in enumerate(sp.ranks):
            sums.index_add_(0, blocks[r], gathered[r, : p.part_block.numel()])
    return block_means(sums, tables["length"], dtype)


def _prefix_pairs(first_part: int, hq: int, hkv: int, device) -> torch.Tensor:
    """``[Hkv * first_part * G]`` rows ``t * Hq + h`` of the first local block part's queries,
    grouped by kv head (the order of the prefix segments)."""
    g = hq // hkv
    t = torch.arange(first_part, device=device)
    h = torch.arange(hq, device=device).view(hkv, 1, g)
    return (t.view(1, -1, 1) * hq + h).flatten()


def _gate_slices(sp: StreamPlan, offsets: torch.Tensor, mode: str) -> torch.Tensor | None:
    """Work-balanced slice cuts for the gate, or None to gate where the queries are (cached)."""
    key = ("gate_slices", mode)
    if key not in sp.device_cache:
        sp.device_cache[key] = (balanced_offsets(sp.layout, offsets.numel() - 1)
                                if should_balance(sp.layout, offsets, mode) else None)
    return sp.device_cache[key]


def _gate(q, summaries, layout, tables, begin: int, topk: int, budget: int, gate: str) -> torch.Tensor:
    """Selections ``[n, Hq, topk - 1]`` of queries at global positions ``begin + row``."""
    n, hq, _ = q.shape
    pos = begin + torch.arange(n, device=q.device)
    q_block = torch.searchsorted(tables["start"], pos, right=True) - 1
    q_first = tables["first_block"][q_block]
    tiles = gate_tiles(layout, begin, n, hq, gate_tile_elems(budget, summaries.dtype))
    return select_blocks(q, summaries, q_block, q_first, topk, tiles, gate)


def moba_pipeline(q, k, v, cu_seqlens: torch.Tensor, offsets: torch.Tensor, chunk: int, topk: int,
                  softmax_scale: float, comm: Comm | None, backend: str | None,
                  keep_fetched: bool | None = None, plan=None) -> torch.Tensor:
    """MoBA output of the local slice. ``cu_seqlens``/``offsets`` are host int64 tensors, already
    brought to the host by the caller (host sync A: this call's, or, with ``plan`` (a
    :class:`~moba_dist.parallel.step.StepPlan`), the step's, counted there)."""
    meta, sel, stats = moba_plan(q, k, v, cu_seqlens, offsets, chunk, topk, softmax_scale, comm, backend,
                                 keep_fetched, host_syncs=0 if plan is not None else 1,
                                 settings=plan.settings if plan is not None else None)
    del sel  # the gate's selection: not alive through the attention (the plan holds what it needs)
    out = MoBACore.apply(q, k, v, meta)
    stats.bytes_sent = comm.sent if comm else {}
    stats.bytes_received = comm.received if comm else {}
    if plan is not None:
        plan.host_syncs += stats.host_syncs
    record(stats)
    return out


def moba_plan(q, k, v, cu_seqlens: torch.Tensor, offsets: torch.Tensor, chunk: int, topk: int,
              softmax_scale: float, comm: Comm | None, backend: str | None,
              keep_fetched: bool | None = None, sel: torch.Tensor | None = None, host_syncs: int = 1,
              settings: Settings | None = None, forward_only: bool | None = None):
    """Gate (unless ``sel [n, Hq, topk - 1]``, an earlier gate's selection, is given) and plan:
    returns ``(meta, sel, stats)``, ``meta`` the :class:`~moba_dist.core.CoreMeta` of
    :func:`~moba_dist.core.core_forward`/``core_backward``. Collectives: the block-sum all-gather
    (only when gating) and the selection-count all-gather (host sync B). ``settings``: the step
    plan's (default: read from the environment now); ``keep_fetched`` overrides its field.
    ``forward_only``: no backward will follow (prefill: a quarter of the workspace budget);
    default: no gradient can be asked of ``q, k, v`` here. A custom operator passes it, since
    inside one the inputs never require gradients, whether or not its caller's do."""
    if settings is None:
        settings = Settings.from_env()
    world, rank = (comm.world, comm.rank) if comm else (1, 0)
    n, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    sp = stream_plan(cu_seqlens, offsets, chunk)
    layout, lp = sp.layout, sp.ranks[rank]
    tables = _layout_tables(sp, rank, dev)
    nblk = layout.num_blocks
    stats = MoBAStats(world_size=world, rank=rank, local_tokens=n, host_syncs=host_syncs)
    if keep_fetched is None:
        keep_fetched = settings.keep_fetched
    budget = workspace_bytes(q, k, v)
    if forward_only is None:
        forward_only = _forward_only(q, k, v)
    if forward_only and workspace_override() is None:
        # Prefill: the peak is the inputs and the output plus this scratch, set against an
        # inference kernel's, which has almost none; a quarter of the training budget.
        budget = max(MIN_WORKSPACE, budget // 4)

    # Gate: global block means, then each local query against its sequence's past blocks,
    # on work-balanced slices when the gate is heavy and the contiguous slices are uneven.
    if sel is None:
        sel = _select(q, k, sp, tables, offsets, comm, topk, budget, rank, settings)
    sel = sel.to(torch.int32)
    kk = sel.shape[-1]
    if settings.record_selection:
        stats.selection = sel.sort(-1).values

    # Count selections per (kv head, block); every rank learns every rank's needs (sync B).
    # The int32 selection is the plan's largest tensor (T x Hq x (topk - 1)); the keys derived
    # from it are made one kv-head group at a time, so no int64 copy of all of it exists.
    # The varlen path also counts per query window (see core.row_windows), in the same copy.
    group = hq // hkv
    fused = use_fused_selected(dev, q.dtype, chunk, settings.selected_kernel)
    stats.selected_kernel = "triton" if fused else "varlen"
    if fused and comm is None:
        return _static_fused_meta(q, k, v, sel, sp, tables, softmax_scale, backend, keep_fetched, budget,
                                  stats), sel, stats
    acc_elem = accum_dtype(q.dtype).itemsize
    pair_sel = pair_ids = None
    # Partial results per row in the varlen path's merge: one per selected block, one more for
    # the causal prefix of the slice's first block (context parallel).
    slots = kk + (1 if lp.prefix_len else 0)
    window = n if fused else row_window(budget, n, hq, d, chunk, slots, q.element_size(), acc_elem)
    nwin = max(1, -(-n // max(window, 1)))
    with record_function("moba.counts"):
        counts = torch.zeros(nwin, hkv, nblk, dtype=torch.int64, device=dev)
        for g in range(hkv):
            key = _group_keys(sel, g, group, nblk, window if nwin > 1 else 0)
            # A scatter, not bincount: bincount sizes its output on the host.
            part = torch.zeros(nwin * (nblk + 1), dtype=torch.int64, device=dev)
            part.scatter_add_(0, key, torch.ones_like(key))
            counts[:, g] = part.view(nwin, nblk + 1)[:, :nblk]
        del key, part
        mine = counts.sum(0).flatten()
        if comm is None:
            host = to_host(counts.flatten(), stats)
            all_counts = host.view(nwin, hkv * nblk).sum(0)[None]
        else:
            host = to_host(torch.cat([comm.all_gather(mine, "selection_counts").flatten(),
                                      counts.flatten()]), stats)
            all_counts = host[:world * hkv * nblk].view(world, hkv * nblk)
        win_counts = host[-nwin * hkv * nblk:].view(nwin, hkv, nblk)

    with record_function("moba.plan"):
        need = all_counts.view(world, hkv, nblk) > 0
        fp = fetch_plan(layout, offsets, need, rank, sp.ranks)
        num_pairs = int(all_counts[rank].sum())
        # Base segments: the selected (kv head, block)s in (head, block) order, then the causal
        # prefix of the first local block per head. Segments: a base segment's pairs in one
        # query window, in (head, window, block) order, then
        # the prefixes (window 0: a prefix's queries are the slice's first part, <= one block).
        seg_id = torch.full((hkv * nblk,), -1, dtype=torch.int64)
        seg_id[need[rank].flatten()] = torch.arange(int(need[rank].sum()))
        n_sel_seg = int(need[rank].sum())
        wc = win_counts.permute(1, 0, 2)  # [hkv, win, block]
        hit = (wc > 0).nonzero()
        seg_counts = wc[hit[:, 0], hit[:, 1], hit[:, 2]]
        seg_win = hit[:, 1]
        seg_base = seg_id[hit[:, 0] * nblk + hit[:, 2]]
        base_len = fp.seg_len
        first_part = int(lp.part_len[0]) if lp.prefix_len else 0
        if lp.prefix_len:
            seg_counts = torch.cat([seg_counts, torch.full((hkv,), first_part * group)])
            seg_win = torch.cat([seg_win, torch.zeros(hkv, dtype=torch.int64)])
            seg_base = torch.cat([seg_base, n_sel_seg + torch.arange(hkv)])
            base_len = torch.cat([base_len, torch.full((hkv,), lp.prefix_len)])
        # Window by window (each window's rows are finished before the next is started); in a
        # window, largest segments first: a varlen kernel's grid spans every segment of a call
        # at the longest one's length, so batching segments of similar size wastes little of it.
        order = torch.argsort(seg_counts, descending=True, stable=True)
        order = order[torch.argsort(seg_win[order], stable=True)]
        # Pool rows of the segments in that order, as runs of the base segments' pieces
        # (expanded on the device below).
        piece_seg, piece_start, piece_len = fp.piece_seg, fp.piece_start, fp.piece_len
        if lp.prefix_len:
            runs = fp.prefix_len.numel()
            piece_seg = torch.cat([piece_seg, (n_sel_seg + torch.arange(hkv)).repeat_interleave(runs)])
            piece_start = torch.cat([piece_start, fp.prefix_start.flatten()])
            piece_len = torch.cat([piece_len, fp.prefix_len.repeat(hkv)])
        by_seg = torch.argsort(piece_seg, stable=True)
        n_pieces = torch.bincount(piece_seg, minlength=base_len.numel())
        first_piece = torch.cumsum(n_pieces, 0) - n_pieces
        base = seg_base[order]
        take = by_seg[expand_ranges(first_piece[base], n_pieces[base])]
        runs = [fp.send_start, fp.send_len, piece_start[take], piece_len[take]]
        seg_counts, seg_len, seg_win = seg_counts[order], base_len[base], seg_win[order]
        num_rows = int(seg_len.sum())
        if fused:
            batches = []
            rank_of = torch.empty_like(order)
            rank_of[base] = torch.arange(order.numel())  # one window: segments are base segments
            # Segment of each (kv head, block) key, numbered in the final (ordered) segment order.
            lut = torch.full((hkv * nblk + 1,), -1, dtype=torch.int32)
            lut[need[rank].flatten().nonzero()[:, 0]] = rank_of[:n_sel_seg].to(torch.int32)
            host = runs + [torch.cumsum(seg_len, 0) - seg_len, seg_len, lut,
                           rank_of[n_sel_seg:].to(torch.int32)]
            *runs, seg_start, seg_len_dev, lut, prefix_seg = to_device(host, dev)
            sel_seg = torch.empty(n, hq, kk, dtype=torch.int32, device=dev)
            for g in range(hkv):
                key = _group_keys(sel, g, group, nblk)
                key = torch.where(key == nblk, hkv * nblk, key + g * nblk)  # last slot: -1
                sel_seg[:, g * group:(g + 1) * group] = lut[key].view(n, group, kk)
            del key
            if lp.prefix_len:  # the first local part's queries also read their block's prefix
                extra = torch.full((n, hq, 1), -1, dtype=torch.int32, device=dev)
                extra[:first_part, :, 0] = prefix_seg[torch.arange(hq, device=dev) // group]
                sel_seg = torch.cat([sel_seg, extra], -1)
            # Each segment one run of the pool (always on one device): the kernel reads K/V in
            # place, at the runs' pool rows, instead of from a segment-major copy.
            in_place = piece_seg.numel() == seg_len.numel()
            fused = FusedSel(sel_seg, runs[2] if in_place else seg_start, seg_len_dev.to(torch.int32),
                             num_rows, chunk, in_place=in_place, grad_start=seg_start)
        else:
            # A quarter of the budget for the window's merge buffers (more only when one block's
            # rows need it), a quarter for the kernel's tiles (core.kernel_share), the batches at
            # most half.
            batch_budget = max(budget // 4, min(budget // 2, budget - kernel_share(budget)
                                                - window_bytes(window, hq, d, slots, q.element_size(),
                                                               acc_elem)))
            batches = window_batches(seg_counts, seg_len, seg_win, batch_budget,
                                     *pair_row_bytes(d, q.element_size()))
            # Each window's pairs are rebuilt from the selection when the window is run (forward
            # and backward), so no T x Hq x (topk - 1) pair table exists: the start of every
            # segment inside its window's (head, block)-ordered pairs, in plan order.
            win_pairs = wc.sum(2)  # [hkv, win]
            local = ((win_pairs.cumsum(0) - win_pairs)[hit[:, 0], hit[:, 1]]
                     + (wc.cumsum(2) - wc)[hit[:, 0], hit[:, 1], hit[:, 2]])
            if lp.prefix_len:
                local = torch.cat([local, win_pairs[:, 0].sum() + torch.arange(hkv) * first_part * group])
            host = runs + [local[order], seg_counts]
            host += [t for b in batches for t in (b.cu_q, b.cu_k)]
            dev_tables = to_device(host, dev)
            runs, (local_dev, counts_dev), cus = dev_tables[:4], dev_tables[4:6], dev_tables[6:]
            if n * hq * slots >= 2**31:
                raise ValueError(f"{n} tokens x {hq} heads x {slots} slots: pair ids exceed int32; "
                                 "use more context-parallel ranks")
            pair_ids = PairIds(win_pairs, group, nblk, window, first_part, slots, seg_win, local_dev,
                               counts_dev, seg_counts)
            # int16 holds every block id (and -1) below 2**15 blocks: half the bytes kept.
            pair_sel = sel.to(torch.int16) if nblk < 2**15 else sel
            # Each batch's pool runs: the runs of its segments (several per segment only when a
            # segment's rows come from several ranks).
            run_cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(n_pieces[base], 0)]).tolist()
            batches = [replace(b, cu_q=cu_q.to(torch.int32), cu_k=cu_k.to(torch.int32),
                               runs=slice(run_cu[b.segs.start], run_cu[b.segs.stop]))
                       for b, cu_q, cu_k in zip(batches, cus[0::2], cus[1::2])]
            fused = None
        be = get_backend(dev, q.dtype, d, backend)
        # One device: every key segment is one run of local rows, which a backend that takes
        # segment offsets reads in place (no per-batch K/V gather in forward).
        in_place_ok = getattr(be, "kv_in_place_ok", None)
        kv_in_place = (not fused and comm is None and settings.kv_in_place and in_place_ok is not None
                       and piece_seg.numel() == seg_len.numel() and bool(in_place_ok(k, v)))
        send_index = expand_ranges(runs[0], runs[1], sum(fp.send_splits))
        run_start = run_len = None
        if fused:  # the fused kernel's segment-major rows: pool rows fit int32 (kept for backward)
            seg_index = expand_ranges(runs[2], runs[3], num_rows).to(torch.int32)
        else:  # expanded per batch (core._batch_rows)
            seg_index = torch.empty(0, dtype=torch.int32, device=dev)
            run_start, run_len = runs[2].to(torch.int32), runs[3].to(torch.int32)
        meta = CoreMeta(
            cu_self=tables["cu_self"],
            max_self=int(lp.part_len.max()) if n else 0,
            pair_sel=pair_sel,
            pair_ids=pair_ids,
            pair_slots=slots,
            seg_index=seg_index,
            sel_batches=batches,
            max_k_sel=chunk,
            fetch=KVFetch(comm, send_index, fp.send_splits, fp.recv_splits, k.dtype),
            softmax_scale=softmax_scale,
            backend=be,
            keep_fetched=keep_fetched,
            fused=fused,
            kv_in_place=kv_in_place,
            run_start=run_start,
            run_len=run_len,
            overlaps=bool(lp.prefix_len),
            workspace=budget,
            window_rows=window,
            self_pieces=self_pieces(lp.part_len, hq, d, budget),
        )
    row_bytes = 2 * d * k.element_size()
    other = layout.length - layout.overlap(offsets)[rank]
    stats.planned_fetch_bytes = fp.recv_rows * row_bytes
    stats.fetched_pairs = fp.recv_items
    stats.allgather_kv_pairs = hkv * int((other > 0).sum())
    stats.allgather_kv_bytes = int(other.sum()) * hkv * row_bytes
    stats.selected_blocks_per_query = 1.0 + num_pairs / max(n * hq, 1)
    return meta, sel, stats


def _static_fused_meta(q, k, v, sel, sp: StreamPlan, tables, softmax_scale: float, backend,
                       keep_fetched: bool, budget: int, stats: MoBAStats) -> CoreMeta:
    """One device, fused kernel: a plan that reads nothing from the device. Every (kv head,
    block) is a segment, numbered ``g * N + j`` (head-major row ``g * n + start[j]``, where its
    gradients go), read in place from ``k, v`` themselves when they share strides (no head-major
    copy); segments no query selected cost the kernels an early exit. The selection becomes
    segment ids by one elementwise op, so no counts are copied to the host."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    layout = sp.layout
    key = ("static_fused", n, hq, hkv, d, budget, str(q.device))
    cached = sp.device_cache.get(key)
    if cached is None:
        start = (torch.arange(hkv)[:, None] * n + layout.start[None, :]).flatten()
        length = layout.length.repeat(hkv)
        head_base = torch.arange(hq) // (hq // hkv) * layout.num_blocks
        cached = to_device([start, length, head_base], q.device)
        cached[1], cached[2] = cached[1].to(torch.int32), cached[2].to(torch.int32)
        cached.append(int(sp.ranks[0].part_len.max()) if n else 0)
        cached.append(self_pieces(sp.ranks[0].part_len, hq, d, budget))
        sp.device_cache[key] = cached
    seg_start, seg_len, head_base, max_self, pieces = cached
    offset = None
    if k.stride() == v.stride() and k.stride(-1) == 1:
        # The kernel reads k, v in place: segment (g, j) at token start[j], head g.
        okey = ("static_fused_offset", n, hkv, k.stride(), str(q.device))
        offset = sp.device_cache.get(okey)
        if offset is None:
            offset = seg_start % max(n, 1) * k.stride(0) + seg_start // max(n, 1) * k.stride(1)
            sp.device_cache[okey] = offset
    # Mean selected blocks per (query, head), resolved when the statistics are read.
    stats.pending["selected_blocks_per_query"] = ((sel >= 0).sum(), n * hq, 1.0)
    # The kernels map block ids to segment ids ``g * N + j`` one query window at a time.
    fused = FusedSel(sel, seg_start, seg_len, hkv * n, layout.chunk, in_place=True, grad_start=seg_start,
                     offset=offset, head_offset=head_base)
    empty = seg_start.new_empty(0)
    return CoreMeta(
        cu_self=tables["cu_self"], max_self=max_self, seg_index=empty, sel_batches=[],
        max_k_sel=layout.chunk, fetch=KVFetch(None, empty, [], [], k.dtype), softmax_scale=softmax_scale,
        backend=get_backend(q.device, q.dtype, d, backend), keep_fetched=keep_fetched, fused=fused,
        overlaps=False, workspace=budget, window_rows=n, self_pieces=pieces)


def _forward_only(q, k, v) -> bool:
    """No gradient can be asked of this call's output (``no_grad``/``inference_mode``, or inputs
    that do not require one)."""
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def _group_keys(sel: torch.Tensor, g: int, group: int, nblk: int, window: int = 0) -> torch.Tensor:
    """Keys of kv-head group ``g``'s selections, flattened in (token, head, slot) order, int64:
    the block id, ``nblk`` for an empty slot (``-1``), plus ``(t // window) * (nblk + 1)`` when
    ``window`` (so the keys count and sort by (query window, block))."""
    sub = sel[:, g * group:(g + 1) * group]
    key = torch.where(sub >= 0, sub, nblk).long()
    if window:
        win = torch.arange(sel.shape[0], device=sel.device) // window * (nblk + 1)
        key += win[:, None, None]
    return key.flatten()


class PairIds:
    """The varlen path's pair ids, ``row * slots + slot``, one query window at a time
    (:meth:`window_ids`), from the gate's selection (kept as ``CoreMeta.pair_sel``): the window's
    selected pairs by (kv head, block) (:func:`_pair_ids`), then (window 0) the causal prefix's
    pairs (slot ``topk - 1``), reordered into the plan's segment order. Host sizes and small
    device tables only: forward and backward call it on the same selection and get the same ids.

    ``win_pairs [Hkv, windows]``, ``seg_win``, ``seg_counts`` (host, segment order) and
    ``local, counts`` (device, plan order: each segment's start in its window's (head,
    block)-ordered pairs, and its pair count)."""

    def __init__(self, win_pairs: torch.Tensor, group: int, nblk: int, window: int, first_part: int,
                 slots: int, seg_win: torch.Tensor, local: torch.Tensor, counts: torch.Tensor,
                 seg_counts: torch.Tensor):
        self.win_pairs, self.group, self.nblk, self.window = win_pairs, group, nblk, window
        self.first_part, self.slots, self.local, self.counts = first_part, slots, local, counts
        nwin = win_pairs.shape[1]
        per_win = torch.bincount(seg_win, minlength=nwin)
        pairs_per_win = torch.zeros(nwin, dtype=torch.int64)
        pairs_per_win.index_add_(0, seg_win, seg_counts.to(torch.int64))
        # Segments and pairs of each window in plan order (window-major): [start, end) bounds.
        self.seg_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), per_win.cumsum(0)]).tolist()
        self.base = torch.cat([torch.zeros(1, dtype=torch.int64), pairs_per_win.cumsum(0)]).tolist()

    def window_ids(self, sel: torch.Tensor, w: int) -> torch.Tensor:
        """int32 ids of window ``w``'s pairs in plan order (``SelBatch.pairs`` minus ``base[w]``)."""
        n, hq, kk = sel.shape
        t0 = w * self.window
        sub = sel[t0:min(n, t0 + self.window)]
        ids = _pair_ids(sub, self.win_pairs[:, w], self.group, self.nblk, self.slots, t0, hq)
        if w == 0 and self.first_part:  # the prefix's queries are the slice's first part
            rows = _prefix_pairs(self.first_part, hq, hq // self.group, sel.device)
            ids = torch.cat([ids, (rows * self.slots + kk).to(torch.int32)])
        a, b = self.seg_bounds[w], self.seg_bounds[w + 1]
        return ids[expand_ranges(self.local[a:b], self.counts[a:b], self.base[w + 1] - self.base[w])]


def _pair_ids(sel: torch.Tensor, win_pairs: torch.Tensor, group: int, nblk: int, slots: int,
              t0: int, hq: int) -> torch.Tensor:
    """``(t * Hq + h) * slots + slot`` of every selected (query, head, slot) of ``sel``, the
    selection of tokens ``t0 ..``, int32, ordered by (kv head, block) and within that by row:
    one query window's segments. One stable sort per kv-head group (its keys are exactly that
    group's segments, so the groups concatenate in order). Empty slots sort last;
    ``win_pairs [Hkv]`` (host) counts the real ones, so the kept positions are known on the host
    (no data-dependent mask)."""
    kk = max(sel.shape[-1], 1)
    parts = []
    for g in range(win_pairs.shape[0]):
        order = torch.argsort(_group_keys(sel, g, group, nblk), stable=True)[:int(win_pairs[g])]
        # order: (t * group + head in group) * kk + slot within this group's columns
        row = (order // kk // group + t0) * hq + g * group + order // kk % group
        parts.append((row * slots + order % kk).to(torch.int32))
    return torch.cat(parts) if parts else sel.new_empty(0, dtype=torch.int32)


def _select(q, k, sp: StreamPlan, tables, offsets, comm, topk: int, budget: int, rank: int,
            settings: Settings) -> torch.Tensor:
    """The gate: global block means, then each local query against its sequence's past blocks,
    on work-balanced slices when the gate is heavy and the contiguous slices are uneven."""
    layout, lp = sp.layout, sp.ranks[rank]
    with record_function("moba.summaries"):
        summaries = _block_summaries(k, sp, tables, comm, accum_dtype(q.dtype))
    with record_function("moba.gate"):
        balanced = _gate_slices(sp, offsets, settings.gate_balance) if comm is not None else None
        if balanced is None:
            return _gate(q.detach(), summaries, layout, tables, lp.begin, topk, budget, settings.gate)
        q_g = move_rows(q.detach(), offsets, balanced, comm, "gate_balance")
        sel_g = _gate(q_g, summaries, layout, tables, int(balanced[rank]), topk, budget, settings.gate)
        return move_rows(sel_g, balanced, offsets, comm, "gate_balance.back")


__all__ = ["PairIds", "moba_pipeline", "moba_plan"]
