"""MoBA over a context-parallel group: summaries -> gate -> plan -> fetch -> attend.

The single-device function runs the same pipeline with a world of one and no collectives, so the
two paths cannot drift apart.

Communication per call, per rank (W ranks, N blocks, Hkv kv heads, D head dim):

  1. ``all_gather`` of local slice lengths (W ints),
  2. ``all_gather`` of key sums of the block parts held locally (``max parts x Hkv x D`` floats),
  3. ``all_gather`` of per-(kv head, block) selection counts (``Hkv x N + 1`` ints),
  4. ``all_to_all_single`` of exactly the key/value rows other ranks selected (uneven splits);
     backward sends their gradients back the same way, summed at the owner.

Host syncs (both needed to size the all-to-all, nothing else waits on the device):
  A. after (1): slice lengths and ``cu_seqlens`` to the host, in one copy;
  B. after (3): the selection counts to the host.
"""

from __future__ import annotations

import os

import torch

from ..blocks import BlockLayout
from ..core import CoreMeta, MoBACore, sel_batches
from ..gating import block_part_sums, gate_tiles, select_blocks
from ..kernels import get_backend
from ..stats import MoBAStats, record
from .comm import Comm
from .plan import fetch_plan, local_plan


def pair_batch_size() -> int:
    """(query, head) rows of the selected part gathered at once; ``$MOBA_DIST_PAIR_BATCH``."""
    return int(os.environ.get("MOBA_DIST_PAIR_BATCH", 1 << 23))


def _cu(lengths: torch.Tensor, device, first_extra: int = 0) -> torch.Tensor:
    """int32 cumulative offsets ``[0, l0, l0+l1, ...]`` with ``first_extra`` added after 0."""
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(lengths, 0) + first_extra
    return cu.to(device=device, dtype=torch.int32)


def _block_summaries(k, layout, plans, comm) -> torch.Tensor:
    """Mean key of every block of the stream, ``[N, Hkv, D]``; each rank contributes the sums of
    the block parts it holds, combined in rank order (deterministic)."""
    me = plans[comm.rank if comm else 0]
    dev = k.device
    sums_local = block_part_sums(k.detach(), me.part_start.to(dev), me.part_len.to(dev), layout.chunk)
    sums = torch.zeros(layout.num_blocks, *k.shape[1:], dtype=sums_local.dtype, device=dev)
    if comm is None:
        sums.index_add_(0, me.part_block.to(dev), sums_local)
    else:
        width = max(p.part_block.numel() for p in plans)
        padded = sums_local.new_zeros(width, *k.shape[1:])
        padded[: sums_local.shape[0]] = sums_local
        gathered = comm.all_gather(padded, "block_sums")
        for r, p in enumerate(plans):
            sums.index_add_(0, p.part_block.to(dev), gathered[r, : p.part_block.numel()])
    return sums / layout.length.to(dev, sums.dtype)[:, None, None]


def moba_pipeline(q, k, v, cu_seqlens: torch.Tensor, offsets: torch.Tensor, chunk: int, topk: int,
                  softmax_scale: float, comm: Comm | None, backend: str | None) -> torch.Tensor:
    """MoBA output of the local slice. ``cu_seqlens``/``offsets`` are host int64 tensors."""
    world, rank = (comm.world, comm.rank) if comm else (1, 0)
    n, hq, d = q.shape
    hkv = k.shape[1]
    dev = q.device
    layout = BlockLayout.build(cu_seqlens, chunk)
    nblk = layout.num_blocks
    plans = [local_plan(layout, offsets, r) for r in range(world)]
    lp = plans[rank]
    stats = MoBAStats(world_size=world, rank=rank, local_tokens=n, host_syncs=1)

    # Gate: global block means, then each local query against its sequence's past blocks.
    summaries = _block_summaries(k, layout, plans, comm)
    pos = lp.begin + torch.arange(n, device=dev)
    q_block = torch.searchsorted(layout.start.to(dev), pos, right=True) - 1
    q_first = layout.first_block.to(dev)[q_block]
    sel = select_blocks(q.detach(), summaries, q_block, q_first, topk,
                        gate_tiles(layout, lp.begin, n, hq))
    kk = sel.shape[-1]

    # Count selections per (kv head, block); every rank learns every rank's needs.
    head_group = (torch.arange(hq, device=dev) // (hq // hkv))[None, :, None]
    key = torch.where(sel >= 0, head_group * nblk + sel, hkv * nblk).flatten()
    counts = torch.zeros(hkv * nblk + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    all_counts = (comm.all_gather(counts, "selection_counts") if comm else counts[None]).cpu()
    stats.host_syncs += 1
    need = all_counts[:, :-1].view(world, hkv, nblk) > 0
    fp = fetch_plan(layout, offsets, need, rank)

    # Fetch the selected rows (and the causal prefix) from earlier ranks; head-major pools.
    k_hm = k.transpose(0, 1).reshape(hkv * n, d)
    v_hm = v.transpose(0, 1).reshape(hkv * n, d)
    if comm is not None:
        send = torch.stack([k_hm, v_hm], 1)[fp.send_index.to(dev)]
        recv = comm.all_to_all_rows(send, fp.send_splits, fp.recv_splits, "kv_fetch")
        k_hm = torch.cat([recv[:, 0], k_hm])
        v_hm = torch.cat([recv[:, 1], v_hm])
    seg_index = fp.seg_index.to(dev)
    k_sel, v_sel = k_hm[seg_index].unsqueeze(1), v_hm[seg_index].unsqueeze(1)
    k_self, v_self = k, v
    if lp.prefix_len:
        prefix = fp.prefix_index.to(dev)
        k_self, v_self = torch.cat([k_hm[prefix], k]), torch.cat([v_hm[prefix], v])

    # Pairs sorted by (kv head, block): segment s holds the pairs that selected segment s.
    num_pairs = int(all_counts[rank, :-1].sum())
    pair_row = torch.argsort(key, stable=True)[:num_pairs] // max(kk, 1)
    seg_counts = all_counts[rank, :-1][need[rank].flatten()]
    part_len = lp.part_len
    meta = CoreMeta(
        cu_q_self=_cu(part_len, dev),
        cu_k_self=_cu(part_len, dev, lp.prefix_len),
        max_q_self=int(part_len.max()) if n else 0,
        max_k_self=int(part_len.max()) + lp.prefix_len if n else 0,
        sel_batches=sel_batches(seg_counts, fp.seg_len, pair_batch_size(), dev),
        max_k_sel=chunk,
        softmax_scale=softmax_scale,
        backend=get_backend(dev, q.dtype, d, backend),
    )
    out = MoBACore.apply(q, k_self, v_self, k_sel, v_sel, pair_row, meta)

    row_bytes = 2 * d * k.element_size()
    other = layout.length - layout.overlap(offsets)[rank]
    stats.bytes_sent = comm.sent if comm else {}
    stats.bytes_received = comm.received if comm else {}
    stats.planned_fetch_bytes = fp.recv_rows * row_bytes
    stats.fetched_pairs = fp.recv_items
    stats.allgather_kv_pairs = hkv * int((other > 0).sum())
    stats.allgather_kv_bytes = int(other.sum()) * hkv * row_bytes
    stats.selected_blocks_per_query = 1.0 + num_pairs / max(n * hq, 1)
    record(stats)
    return out


def gather_offsets(n_local: int, cu_seqlens: torch.Tensor, comm: Comm) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' slice offsets ``[W + 1]`` and ``cu_seqlens``, both on the host, in one copy."""
    lens = comm.all_gather(torch.tensor([n_local], device=cu_seqlens.device), "slice_lengths")
    host = torch.cat([cu_seqlens.to(torch.int64), lens.flatten().to(torch.int64)]).cpu()
    cu, lens = host[: cu_seqlens.numel()], host[cu_seqlens.numel():]
    offsets = torch.zeros(comm.world + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    return cu, offsets


__all__ = ["moba_pipeline", "gather_offsets"]
