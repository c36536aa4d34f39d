"""Small hand-worked cases pinning the semantics (docs/semantics.md), and argument validation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moba_dist import moba_attn_varlen
from moba_dist.gating import topk_lowest_index_ties
from moba_dist.reference import masked_attention

D64 = torch.float64


def blocks_keys(*means):
    """Keys of blocks of 2 tokens whose two rows both equal the given 2-d vector."""
    return torch.tensor([[m, m] for m in means], dtype=D64).reshape(-1, 1, 2)


def expected(q, k, v, allowed_keys_per_query):
    mask = torch.zeros(1, q.shape[0], k.shape[0], dtype=torch.bool)
    for i, keys in enumerate(allowed_keys_per_query):
        mask[0, i, list(keys)] = True
    return masked_attention(q, k, v, mask)


def run(q, k, v, chunk, topk):
    cu = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return moba_attn_varlen(q, k, v, cu, q.shape[0], chunk, topk)


# Three blocks of two tokens (chunk 2); queries all point along +x.
Q = torch.tensor([[1.0, 0.0]] * 6, dtype=D64).reshape(6, 1, 2)
V = torch.arange(12, dtype=D64).reshape(6, 1, 2)


def test_current_block_always_selected_and_counts_toward_topk():
    # Block means along x: 10, 3, -100. Block 2 scores worst, yet its queries attend to it; with
    # topk=2 they get exactly one past block (the best, block 0), not two.
    k = blocks_keys([10.0, 0.0], [3.0, 0.0], [-100.0, 0.0])
    allowed = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5]]
    torch.testing.assert_close(run(Q, k, V, 2, 2), expected(Q, k, V, allowed), atol=1e-12, rtol=0)


def test_better_later_block_wins():
    k = blocks_keys([3.0, 0.0], [10.0, 0.0], [0.0, 0.0])
    allowed = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [2, 3, 4], [2, 3, 4, 5]]
    torch.testing.assert_close(run(Q, k, V, 2, 2), expected(Q, k, V, allowed), atol=1e-12, rtol=0)


def test_ties_go_to_the_lower_block():
    k = blocks_keys([5.0, 1.0], [5.0, 1.0], [0.0, 0.0])  # blocks 0 and 1 tie exactly
    allowed = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5]]
    torch.testing.assert_close(run(Q, k, V, 2, 2), expected(Q, k, V, allowed), atol=1e-12, rtol=0)


def test_topk_one_is_current_block_only():
    k = blocks_keys([10.0, 0.0], [3.0, 0.0], [0.0, 0.0])
    allowed = [[0], [0, 1], [2], [2, 3], [4], [4, 5]]
    torch.testing.assert_close(run(Q, k, V, 2, 1), expected(Q, k, V, allowed), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_ties_kernel_by_position(dtype):
    s = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=dtype)
    valid = torch.ones_like(s, dtype=torch.bool)
    pick = lambda sc, ok, k: topk_lowest_index_ties(sc, ok, k).sort(-1).values.tolist()  # noqa: E731
    assert pick(s, valid, 2) == [[1, 2], [0, 1]]
    valid[0, 1] = False
    assert pick(s, valid, 3) == [[0, 2, 3], [0, 1, 2]]
    few = torch.tensor([[True, False, False, False, True], [False] * 5])
    assert pick(s, few, 3) == [[-1, 0, 4], [-1, -1, -1]]
    neg = torch.tensor([[-0.0, 0.0, -1.0, -1e-30, float("-inf"), -2.0]], dtype=dtype)
    assert pick(neg, torch.ones_like(neg, dtype=torch.bool), 5) == [[0, 1, 2, 3, 5]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([-3.5, -1.0, -0.0, 0.0, 1e-38, 2.0, 7.25]), min_size=1, max_size=12),
       st.integers(1, 12), st.data())
def test_topk_matches_stable_sort(values, k, data):
    k = min(k, len(values))
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    for dtype in (torch.float32, torch.float64):
        s = torch.tensor(values, dtype=dtype)
        order = [i for i in torch.sort(s, descending=True, stable=True).indices.tolist() if valid[i]][:k]
        got = topk_lowest_index_ties(s[None], valid[None], k)[0].tolist()
        assert sorted(i for i in got if i >= 0) == sorted(order), (dtype, values, valid, got, order)


def test_no_gradient_through_the_gate():
    """Gradients equal those of attention under the *fixed* selected mask: the gate is a hard,
    non-differentiable choice (a soft or straight-through gate would change dq and dk)."""
    g = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(6, 1, 2, generator=g, dtype=D64)
    k = blocks_keys([10.0, 0.0], [3.0, 0.0], [0.0, 0.0]) + noise
    q = (Q + 0.1 * torch.randn(6, 1, 2, generator=g, dtype=D64)).requires_grad_()
    k.requires_grad_()
    v = V.clone().requires_grad_()
    allowed = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 4], [0, 1, 4, 5]]
    out = run(q, k, v, 2, 2)
    ref = expected(q, k, v, allowed)
    go = torch.randn(out.shape, generator=g, dtype=D64)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_sequences_are_gated_separately():
    # Two sequences of 4 tokens: a query of sequence 1 never sees sequence 0's blocks.
    k = blocks_keys([100.0, 0.0], [1.0, 0.0], [0.0, 0.0], [2.0, 0.0])
    q = torch.tensor([[1.0, 0.0]] * 8, dtype=D64).reshape(8, 1, 2)
    v = torch.arange(16, dtype=D64).reshape(8, 1, 2)
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    out = moba_attn_varlen(q, k, v, cu, 4, 2, 1)
    allowed = [[0], [0, 1], [2], [2, 3], [4], [4, 5], [6], [6, 7]]
    torch.testing.assert_close(out, expected(q, k, v, allowed), atol=1e-12, rtol=0)


def _args():
    q = torch.randn(8, 2, 4, dtype=D64)
    k = torch.randn(8, 1, 4, dtype=D64)
    return q, k, k.clone(), torch.tensor([0, 8], dtype=torch.int32), 8, 2, 2


@pytest.mark.parametrize(
    "mutate, exc, word",
    [
        (lambda a: (a[0][:, :, :2], *a[1:]), ValueError, "head dim"),
        (lambda a: (a[0], a[1].float(), *a[2:]), TypeError, "dtype"),
        (lambda a: (a[0], a[1], a[2][:4], *a[3:]), ValueError, "same shape"),
        (lambda a: (a[0], torch.randn(8, 3, 4, dtype=D64), torch.randn(8, 3, 4, dtype=D64), *a[3:]),
         ValueError, "multiple"),
        (lambda a: (*a[:3], torch.tensor([0, 7], dtype=torch.int32), *a[4:]), ValueError, "cu_seqlens"),
        (lambda a: (*a[:3], torch.tensor([1, 8], dtype=torch.int32), *a[4:]), ValueError, "cu_seqlens"),
        (lambda a: (*a[:3], torch.tensor([0, 8.0]), *a[4:]), TypeError, "cu_seqlens"),
        (lambda a: (*a[:3], [0, 8], *a[4:]), TypeError, "cu_seqlens"),
        (lambda a: (*a[:4], 3, *a[5:]), ValueError, "max_seqlen"),
        (lambda a: (*a[:5], 0, a[6]), ValueError, "moba_chunk_size"),
        (lambda a: (*a[:5], 2.0, a[6]), TypeError, "moba_chunk_size"),
        (lambda a: (*a[:6], 0), ValueError, "moba_topk"),
        (lambda a: (a[0].half(), a[1].half(), a[2].half(), *a[3:]), TypeError, "dtype"),
        (lambda a: (a[0][0], *a[1:]), ValueError, "q must be"),
    ],
)
def test_bad_arguments_name_the_argument(mutate, exc, word):
    with pytest.raises(exc, match=word):
        moba_attn_varlen(*mutate(_args()))


def test_bad_softmax_scale():
    with pytest.raises(TypeError, match="softmax_scale"):
        moba_attn_varlen(*_args(), softmax_scale="big")
