"""Context-parallel decode (moba_dist/parallel/decode_cp.py) on gloo against one process.

Each rank holds a slice of every row (cut inside blocks, some empty), folds the boundary block
sums once as after a prefill, then decodes several steps, appending each new token on the tail
rank; every step must equal ``moba_decode`` on the whole cache (float64, 1e-12).
"""

from __future__ import annotations

import torch
from dist_utils import run_distributed

from moba_dist.decode import moba_decode, update_block_sums
from moba_dist.parallel.decode_cp import fold_boundary_sums, moba_decode_cp

TOL = 1e-12

# (prefill lengths per row, slice lengths per row per rank, chunk, topk, hq, hkv, steps, ties)
CASES = [
    ([30, 21], [[13, 17], [6, 15]], 4, 3, 4, 2, 5, False),  # cuts inside blocks
    ([40], [[40, 0]], 5, 3, 2, 2, 4, False),  # the last rank empty: rank 0 holds the tail
    ([33, 9], [[1, 32], [9, 0]], 4, 4, 4, 2, 4, False),  # one-token slice
    ([29], [[15, 14]], 3, 1, 4, 2, 3, False),  # topk 1
    ([26, 30], [[10, 16], [12, 18]], 2, 3, 4, 2, 4, True),  # ties: repeated keys
    ([37, 16], [[9, 3, 25], [5, 6, 5]], 4, 3, 4, 2, 4, False),  # 3 ranks, middle slice in a block
    ([31], [[2, 0, 29]], 4, 9, 4, 4, 3, False),  # 3 ranks, empty middle, topk covers the length
    ([45, 12], [[14, 14, 17], [0, 5, 7]], 7, 3, 8, 2, 4, True),  # 3 ranks, GQA 4:1, ties
]


def full_rows(case):
    lengths, _, chunk, topk, hq, hkv, steps, ties = case
    g = torch.Generator().manual_seed(sum(lengths) * 13 + chunk)
    bsz, total, d = len(lengths), max(lengths) + steps, 8
    if ties:
        # Integer keys, every block of a row the same: exact sums, all scores tie.
        base = torch.randint(-2, 3, (bsz, chunk, hkv, d), generator=g).double()
        k = base.repeat(1, -(-total // chunk), 1, 1)[:, :total].clone()
    else:
        k = torch.randn(bsz, total, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(bsz, total, hkv, d, generator=g, dtype=torch.float64)
    q = torch.randn(steps + 1, bsz, hq, d, generator=g, dtype=torch.float64)
    return k, v, q


def check(rank, world, cases):
    for case in cases:
        lengths, slices, chunk, topk, hq, hkv, steps, _ = case
        if len(slices[0]) != world:
            continue
        k, v, qs = full_rows(case)
        bsz, total = k.shape[:2]
        off = torch.tensor([sum(s[:rank]) for s in slices])
        n = torch.tensor([s[rank] for s in slices])
        tail = [max(r for r in range(world) if s[r] > 0) for s in slices]
        first = off // chunk
        lloc = total  # room for appends
        nloc = -(-(lloc + chunk) // chunk)
        kc = torch.zeros(bsz, lloc, hkv, k.shape[-1], dtype=torch.float64)
        vc = torch.zeros_like(kc)
        sums = torch.zeros(bsz, nloc, hkv, k.shape[-1], dtype=torch.float64)
        for b in range(bsz):
            a, m = int(off[b]), int(n[b])
            kc[b, :m], vc[b, :m] = k[b, a:a + m], v[b, a:a + m]
        # Positions relative to the first local block's start, -1 past the slice.
        ar = torch.arange(lloc)
        rel = torch.where(ar < n[:, None], ar + off[:, None] - first[:, None] * chunk, -1)
        update_block_sums(sums, kc, rel, chunk)
        fold_boundary_sums(sums, off, n, chunk)
        length = torch.tensor(lengths)
        for step in range(steps + 1):
            if step:
                # Append token `length` of each row on its tail rank.
                for b in range(bsz):
                    if rank == tail[b]:
                        p = int(n[b])
                        kc[b, p], vc[b, p] = k[b, length[b]], v[b, length[b]]
                        pos = torch.full((bsz, 1), -1, dtype=torch.int64)
                        pos[b, 0] = int(length[b]) - int(first[b]) * chunk
                        update_block_sums(sums, kc[:, p:p + 1], pos, chunk)
                        n[b] += 1
                length = length + 1
            q = qs[step]
            out = moba_decode_cp(q, kc, vc, n.to(torch.int32), sums, off, chunk, topk)
            # One process: the whole cache.
            full_sums = torch.zeros(bsz, -(-total // chunk), hkv, k.shape[-1], dtype=torch.float64)
            pos = torch.where(torch.arange(total) < length[:, None], torch.arange(total), -1)
            update_block_sums(full_sums, k, pos, chunk)
            ref = moba_decode(q, k, v, length.to(torch.int32), full_sums, chunk, topk)
            err = (out - ref).abs().max().item()
            assert err <= TOL, f"rank {rank} case {case} step {step}: {err}"


def test_decode_cp_2_ranks():
    run_distributed(check, 2, CASES)


def test_decode_cp_3_ranks():
    run_distributed(check, 3, CASES)
