"""The fused Triton gate + top-k (moba_dist/kernels/triton_gate.py) against independent references.

Without a GPU the kernel runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported). The interpreter evaluates ``tl.dot`` with numpy, not with the kernel's fp32
FMA chain, so CPU cases use small integer-valued inputs: every float32 score is then exact in any
order, and many scores tie, which exercises the tie-breaking. GPU cases (``-m gpu``) use random
bf16 inputs against a float64 reference and check bitwise invariance under re-slicing and TF32.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if not CUDA and not triton.knobs.runtime.interpret:  # pragma: no cover - depends on import order
    # Triton was imported in compiled mode by an earlier module; its language functions were
    # decorated for the compiler. Re-import it (and the kernel) so they are decorated for the
    # interpreter.
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]
    sys.modules.pop("moba_dist.kernels.triton_gate", None)
    triton = importlib.import_module("triton")

tg = importlib.import_module("moba_dist.kernels.triton_gate")
from moba_dist.reference import moba_selection_reference  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
# Interpreter time grows with the number of programs and tiles, not their size: few large tiles.
INSERT = tg.GateConfig(block_m=16, block_n=32, block_d=16)
BITONIC = tg.GateConfig(block_m=16, block_n=16, block_d=16, merge="bitonic")
NARROW = tg.GateConfig(block_m=4, block_n=16, block_d=16)  # many tiles: rows span tile edges


def reference_selection(q, summaries, q_block, q_first_block, topk):
    """Float64 dense scores, stable descending sort (lower block first among equals), the first
    ``topk - 1`` valid blocks, ``-1`` padded: ``[n, Hq, topk - 1]`` int64 on the CPU."""
    q, s = q.double().cpu(), summaries.double().cpu()
    qb, qf = q_block.cpu().long(), q_first_block.cpu().long()
    n, hq, _ = q.shape
    nb, hkv, _ = s.shape
    k = max(topk - 1, 0)
    scores = torch.einsum("ihd,jhd->ihj", q, s.repeat_interleave(hq // hkv, dim=1))
    j = torch.arange(nb)
    valid = ((j >= qf[:, None]) & (j < qb[:, None]))[:, None, :].expand(n, hq, nb)
    order = torch.sort(scores.masked_fill(~valid, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    out = torch.full((n, hq, k), -1, dtype=torch.int64)
    width = min(k, nb)
    count = valid.sum(-1, keepdim=True)
    out[..., :width] = torch.where(torch.arange(width) < count, order[..., :width], -1)
    return out


def int_inputs(gen, n, hq, hkv, d, nb, lo=-2, hi=2, qdtype=torch.float32):
    q = torch.randint(lo, hi + 1, (n, hq, d), generator=gen).to(qdtype)
    s = torch.randint(lo, hi + 1, (nb, hkv, d), generator=gen).float()
    return q, s


def packed_blocks(lengths, chunk):
    """Per-token global block and first block of its sequence for a packed stream of sequences."""
    qb, qf, first = [], [], 0
    for length in lengths:
        nb = -(-length // chunk)
        qb += [first + i // chunk for i in range(length)]
        qf += [first] * length
        first += nb
    return torch.tensor(qb), torch.tensor(qf), first


def run(q, s, qb, qf, topk, config=None):
    out = tg.gate_topk(q.to(DEV), s.to(DEV), qb.to(DEV), qf.to(DEV), topk, config=config)
    return out.cpu()


@pytest.mark.parametrize("config,topks", [(INSERT, (1, 2, 4, 9, 33)), (BITONIC, (3,))],
                         ids=["insert", "bitonic"])
def test_packed_sequences_gqa_against_reference(config, topks):
    gen = torch.Generator().manual_seed(0)
    qb, qf, nb = packed_blocks([21, 3, 30], chunk=2)  # 11 + 2 + 15 blocks, partial last blocks
    q, s = int_inputs(gen, qb.numel(), hq=6, hkv=2, d=12, nb=nb)  # G = 3: padded head group
    for topk in topks:
        got = run(q, s, qb, qf, topk, config)
        assert torch.equal(got, reference_selection(q, s, qb, qf, topk)), f"topk={topk}"


def test_matches_moba_selection_reference_from_keys():
    """Summaries built as block means of integer keys (chunk 4: exact in float32) give the blocks
    of the dense single-sequence reference, current block aside."""
    gen = torch.Generator().manual_seed(1)
    length, chunk, hq, hkv, d, topk = 37, 4, 4, 2, 8, 4
    q = torch.randint(-3, 4, (length, hq, d), generator=gen).float()
    k = torch.randint(-3, 4, (length, hkv, d), generator=gen).float()
    nb = -(-length // chunk)
    means = torch.stack([k[j * chunk:(j + 1) * chunk].mean(0) for j in range(nb)])
    qb, qf, _ = packed_blocks([length], chunk)
    got = run(q, means, qb, qf, topk, INSERT)
    mask = torch.zeros(hq, length, nb, dtype=torch.bool)
    for i in range(length):
        for h in range(hq):
            for b in got[i, h].tolist():
                if b >= 0:
                    mask[h, i, b] = True
            mask[h, i, qb[i]] = True
    assert torch.equal(mask, moba_selection_reference(q, k, chunk, topk))


@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_hypothesis_many_ties(data):
    """Scores from {-1, 0, 1} inputs tie constantly; ties must go to the lower block."""
    hkv = data.draw(st.integers(1, 2))
    group = data.draw(st.sampled_from([1, 2, 3]))
    d = data.draw(st.integers(1, 16))
    nb = data.draw(st.integers(1, 40))
    n = data.draw(st.integers(1, 40))
    topk = data.draw(st.integers(1, min(nb + 2, 17)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    config = data.draw(st.sampled_from([INSERT, NARROW]))
    gen = torch.Generator().manual_seed(seed)
    q, s = int_inputs(gen, n, hkv * group, hkv, d, nb, lo=-1, hi=1)
    qb = torch.randint(0, nb, (n,), generator=gen)
    qf = torch.minimum(torch.randint(0, nb, (n,), generator=gen), qb)
    got = run(q, s, qb, qf, topk, config)
    assert torch.equal(got, reference_selection(q, s, qb, qf, topk))


def test_same_queries_in_other_slices_and_rows_give_identical_selections():
    gen = torch.Generator().manual_seed(2)
    qb, qf, nb = packed_blocks([40, 24], chunk=3)
    q, s = int_inputs(gen, qb.numel(), hq=4, hkv=1, d=16, nb=nb, lo=-3, hi=3, qdtype=torch.bfloat16)
    whole = run(q, s, qb, qf, 6, INSERT)
    for a, b in [(0, 13), (13, 64), (5, 6), (29, 47)]:
        part = run(q[a:b], s, qb[a:b], qf[a:b], 6, INSERT)
        assert torch.equal(part, whole[a:b]), (a, b)
    # Another tiling: same selection.
    assert torch.equal(run(q, s, qb, qf, 6, NARROW), whole)
    assert torch.equal(whole, reference_selection(q, s, qb, qf, 6))


def test_no_candidates_and_empty_inputs():
    gen = torch.Generator().manual_seed(3)
    q, s = int_inputs(gen, 5, 2, 1, 4, 3)
    qb = torch.tensor([0, 1, 1, 2, 2])
    qf = torch.tensor([0, 1, 0, 2, 1])  # rows 0, 1 and 3 have no past block
    got = run(q, s, qb, qf, 3, INSERT)
    assert got.shape == (5, 2, 2)
    assert (got[[0, 1, 3]] == -1).all()
    assert torch.equal(got, reference_selection(q, s, qb, qf, 3))
    assert run(q, s, qb, qf, 1).shape == (5, 2, 0)
    assert run(q[:0], s, qb[:0], qf[:0], 4).shape == (0, 2, 3)


def test_argument_errors():
    q = torch.zeros(4, 2, 8, device=DEV)
    s = torch.zeros(3, 1, 8, device=DEV)
    b = torch.zeros(4, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="topk"):
        tg.gate_topk(q, s, b, b, 0)
    with pytest.raises(TypeError, match="summaries"):
        tg.gate_topk(q, s.double(), b, b, 2)
    with pytest.raises(TypeError, match="q"):
        tg.gate_topk(q.double(), s, b, b, 2)
    with pytest.raises(ValueError, match="summaries"):
        tg.gate_topk(q, torch.zeros(3, 3, 8, device=DEV), b, b, 2)
    with pytest.raises(ValueError, match="q_first_block"):
        tg.gate_topk(q, s, b, b[:3], 2)
    with pytest.raises(ValueError, match="config"):
        tg.gate_topk(q, s, b, b, 2, config=tg.GateConfig(merge="heap"))


# --- GPU: random bf16 inputs, the real FMA chain -------------------------------------------------


def _margin_rows(q, s, qb, qf, topk):
    """Rows (query, head) whose (topk-1)-th and topk-th best float64 scores differ by more than
    float32 rounding can move a score: their selection is unambiguous."""
    qd, sd = q.double().cpu(), s.double().cpu()
    hq, hkv = q.shape[1], s.shape[1]
    scores = torch.einsum("ihd,jhd->ihj", qd, sd.repeat_interleave(hq // hkv, dim=1))
    j = torch.arange(s.shape[0])
    valid = ((j >= qf.cpu()[:, None]) & (j < qb.cpu()[:, None]))[:, None, :]
    top = scores.masked_fill(~valid, float("-inf")).sort(-1, descending=True).values
    k = topk - 1
    if top.shape[-1] <= k:
        return torch.ones(q.shape[:2], dtype=torch.bool)
    gap = top[..., k - 1] - top[..., k]
    scale = torch.einsum("ihd,jhd->ihj", qd.abs(), sd.abs().repeat_interleave(hq // hkv, 1)).amax(-1)
    return ~(gap <= 1e-5 * scale)  # -inf - -inf is nan: no competitor, unambiguous


@pytest.mark.gpu
@pytest.mark.parametrize("merge", ["insert", "bitonic"])
def test_gpu_bf16_against_float64_reference_and_invariance(merge):
    gen = torch.Generator().manual_seed(4)
    qb, qf, nb = packed_blocks([3000, 1700, 4100], chunk=64)
    n, hq, hkv, d, topk = qb.numel(), 16, 4, 128, 8
    q = torch.randn(n, hq, d, generator=gen).to(torch.bfloat16)
    s = torch.randn(nb, hkv, d, generator=gen) / 8
    cfg = tg.GateConfig(merge=merge)
    got = run(q, s, qb, qf, topk, cfg)
    ref = reference_selection(q, s, qb, qf, topk)
    sure = _margin_rows(q, s, qb, qf, topk)
    assert sure.float().mean() > 0.95
    assert torch.equal(got.sort(-1).values[sure], ref.sort(-1).values[sure])
    for a, b in [(0, 777), (777, n), (1, n - 3)]:
        assert torch.equal(run(q[a:b], s, qb[a:b], qf[a:b], topk, cfg), got[a:b]), (a, b)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for flag in (True, False):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert torch.equal(run(q, s, qb, qf, topk, cfg), got)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
