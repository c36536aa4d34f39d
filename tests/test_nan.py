"""NaN policy: a NaN in q, k or v gives NaN in the outputs it affects, on every path (sparse
varlen, the fused Triton kernel, the full-attention cover case), never a silent finite value.

What a NaN affects, independently of the gate: a NaN query row ``(t, h)`` makes output ``(t, h)``
NaN (every key it attends is scored against it); a NaN value at token ``j`` makes NaN every
output of the heads sharing its kv head at the positions of ``j``'s own block from ``j`` on
(their causal own block always contains ``j``). Other sequences and other kv heads stay finite.
"""

import pytest
import torch

from moba_dist import moba_attn_varlen
from moba_dist.core import SELECTED_ENV

T, HQ, HKV, D = 300, 4, 2, 16
PATHS = [("varlen", 32, 3, torch.float64), ("triton", 32, 3, torch.float32),
         ("varlen", 256, 4, torch.float64)]


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, h, D, generator=g).to(dtype) for h in (HQ, HKV, HKV)]


@pytest.mark.parametrize("kernel,chunk,topk,dtype", PATHS)
def test_nan_query_row_gives_nan_in_its_output_only(monkeypatch, kernel, chunk, topk, dtype):
    if kernel == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv(SELECTED_ENV, kernel)
    q, k, v = _inputs(dtype)
    q[250, 1] = float("nan")
    cu = torch.tensor([0, 100, T], dtype=torch.int32)
    out = moba_attn_varlen(q, k, v, cu, 200, chunk, topk)
    assert out[250, 1].isnan().all()
    nan_rows = out.isnan().any(-1)
    nan_rows[250, 1] = False
    assert not nan_rows.any()  # the query alone is NaN: nobody else reads it


@pytest.mark.parametrize("kernel,chunk,topk,dtype", PATHS)
def test_nan_value_reaches_its_own_block_from_its_position(monkeypatch, kernel, chunk, topk, dtype):
    if kernel == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv(SELECTED_ENV, kernel)
    q, k, v = _inputs(dtype, seed=1)
    j = 170  # in the second sequence [100, 300), at its position 70
    v[j, 0] = float("nan")
    cu = torch.tensor([0, 100, T], dtype=torch.int32)
    out = moba_attn_varlen(q, k, v, cu, 200, chunk, topk)
    own_end = 100 + min(200, ((j - 100) // chunk + 1) * chunk)
    heads = slice(0, HQ // HKV)  # the query heads of kv head 0
    assert out[j:own_end, heads].isnan().any(-1).all()
    # The other sequence and the query heads of the other kv head never see it. (Earlier rows of
    # j's own sequence may: a kernel tile that masks j out still multiplies 0 by NaN, as a
    # mask-based reference does; flash-attn kernels may skip such tiles.)
    assert not out[:100].isnan().any()
    assert not out[:, HQ // HKV:].isnan().any()
