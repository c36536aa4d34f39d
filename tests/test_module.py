"""MoBAAttention: both layouts against moba_attn_varlen and the dense references, the hybrid
schedule, softmax_scale, errors, and context parallel (explicit group, or an open
moba_dist.hf.context_parallel block) on 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from helpers import make_cu, rand_qkv

import moba_dist.hf
from moba_dist import MoBAAttention, MoBAConfig, moba_attn_varlen
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference

CFG = MoBAConfig(chunk_size=4, topk=2, full_attention_layers=[1])
LENGTHS = [21, 9, 31]


def _leaf(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _check(got, want, what):
    err = (got - want).abs().max().item()
    assert err <= 1e-10, f"{what}: max abs error {err}"


def _out_and_grads(fn, q, k, v, go):
    leaves = _leaf(q, k, v)
    out = fn(*leaves)
    out.backward(go)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("layer", [0, 1])
def test_varlen_layout(layer):
    cu = make_cu(LENGTHS)
    g = torch.Generator().manual_seed(0)
    q, k, v = rand_qkv(int(cu[-1]), 4, 2, 8, gen=g)
    go = torch.randn(q.shape, generator=g, dtype=q.dtype)
    module = MoBAAttention(CFG, layer_idx=layer)
    got = _out_and_grads(lambda *t: module(*t, cu), q, k, v, go)
    if layer == 0:
        want = _out_and_grads(lambda *t: moba_attn_varlen_reference(*t, cu, 4, 2), q, k, v, go)
        _check(got[0], moba_attn_varlen(q, k, v, cu, max(LENGTHS), 4, 2), "out vs moba_attn_varlen")
    else:
        want = _out_and_grads(lambda *t: causal_attn_varlen_reference(*t, cu), q, k, v, go)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        _check(a, b, f"layer {layer} {name}")


def test_rows_layout_and_scale():
    b, s = 3, 18
    g = torch.Generator().manual_seed(1)
    q, k, v = (x.view(b, s, *x.shape[1:]) for x in rand_qkv(b * s, 4, 1, 8, gen=g))
    go = torch.randn(q.shape, generator=g, dtype=q.dtype)
    module = MoBAAttention(CFG, layer_idx=0, softmax_scale=0.3)
    got = _out_and_grads(module, q, k, v, go)
    assert got[0].shape == q.shape

    def per_row(*t):
        one = torch.tensor([0, s], dtype=torch.int32)
        return torch.stack([moba_attn_varlen_reference(*(x[i] for x in t), one, 4, 2, 0.3) for i in range(b)])

    want = _out_and_grads(per_row, q, k, v, go)
    for name, a, c in zip(("out", "dq", "dk", "dv"), got, want):
        _check(a, c, f"rows {name}")
    flat = moba_attn_varlen(*(x.reshape(b * s, *x.shape[2:]) for x in (q, k, v)), make_cu([s] * b), s, 4, 2,
                            softmax_scale=0.3)
    _check(got[0].reshape(flat.shape), flat, "rows vs moba_attn_varlen")
    # Default cu_seqlens of the varlen layout: one sequence.
    one = MoBAAttention(CFG)(q[0], k[0], v[0])
    _check(one, moba_attn_varlen(q[0], k[0], v[0], make_cu([s]), s, 4, 2), "one sequence")


def test_errors_name_the_argument():
    q, k, v = rand_qkv(8, 2, 1, 4)
    with pytest.raises(TypeError, match="config"):
        MoBAAttention({"chunk_size": 4})
    with pytest.raises(ValueError, match="layer_idx"):
        MoBAAttention(CFG, layer_idx=-1)
    with pytest.raises(TypeError, match="softmax_scale"):
        MoBAAttention(CFG, softmax_scale="0.1")
    module = MoBAAttention(CFG)
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(q[None], k[None], v[None], make_cu([8]))
    with pytest.raises(ValueError, match="k"):
        module(q, k[None], v)
    with pytest.raises(ValueError, match="k and v"):
        module(q[None], k[None, :4], v[None, :4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        module(q, k, v, make_cu([3, 4]))
    assert "moba" in repr(module) and "full" in repr(MoBAAttention(CFG, layer_idx=1))


def cp_worker(rank, world):
    cu = make_cu(LENGTHS)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(2)
    q, k, v = rand_qkv(total, 4, 2, 8, gen=g)
    go = torch.randn(q.shape, generator=g, dtype=q.dtype)
    a, b = [0, 31, total][rank:rank + 2]  # cp.shard's cut (61 tokens): inside sequence 3's first block
    refs = {0: _out_and_grads(lambda *t: moba_attn_varlen_reference(*t, cu, 4, 2), q, k, v, go),
            1: _out_and_grads(lambda *t: causal_attn_varlen_reference(*t, cu), q, k, v, go)}
    for layer in (0, 1):
        want = [x[a:b] for x in refs[layer]]
        world_module = MoBAAttention(CFG, layer, group=dist.group.WORLD)
        runs = {
            "group=WORLD, [n, H, D]": lambda *t, m=world_module: m(*t, cu),
            "group=WORLD, [1, n, H, D]": lambda *t, m=world_module: m(*(x[None] for x in t), cu)[0],
        }
        for name, fn in runs.items():
            got = _out_and_grads(fn, q[a:b], k[a:b], v[a:b], go[a:b])
            for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
                _check(x, y, f"rank {rank} layer {layer} {name} {what}")
        with moba_dist.hf.context_parallel() as cp:
            cp.shard(torch.zeros(total, dtype=torch.long), torch.cat([torch.arange(n) for n in LENGTHS]))
            assert cp.local_slice == slice(a, b)
            got = _out_and_grads(MoBAAttention(CFG, layer), q[a:b], k[a:b], v[a:b], go[a:b])
        for what, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            _check(x, y, f"rank {rank} layer {layer} context {what}")
        # No group and no block: one device, even with a process group initialized.
        local = MoBAAttention(CFG, layer)
        got = _out_and_grads(lambda *t, m=local: m(*t, cu), q, k, v, go)
        for what, x, y in zip(("out", "dq", "dk", "dv"), got, refs[layer]):
            _check(x, y, f"rank {rank} layer {layer} single device {what}")


def test_context_parallel_2_ranks():
    run_distributed(cp_worker, 2)
