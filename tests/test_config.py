"""MoBAConfig: validation, layer selection, and that attention() runs the right function."""

import pytest
import torch
from dist_utils import run_distributed
from helpers import make_cu

from moba_dist import MoBAConfig, last_stats
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference


def test_validation_names_the_argument():
    with pytest.raises(ValueError, match="chunk_size"):
        MoBAConfig(0, 2)
    with pytest.raises(TypeError, match="topk"):
        MoBAConfig(4, 2.0)
    with pytest.raises(TypeError, match="full_attention_layers"):
        MoBAConfig(4, 2, full_attention_layers=3)
    with pytest.raises(ValueError, match="full_attention_layers"):
        MoBAConfig(4, 2, full_attention_layers=[1, -1])
    with pytest.raises(TypeError, match="full_attention_layers"):
        MoBAConfig(4, 2, full_attention_layers=[True])
    with pytest.raises(TypeError, match="all_full"):
        MoBAConfig(4, 2, all_full=1)
    with pytest.raises(ValueError, match="layer_idx"):
        MoBAConfig(4, 2).is_full(-1)


def test_is_full():
    cfg = MoBAConfig(4096, 12, full_attention_layers=[31, 30, 30])
    assert cfg.full_attention_layers == (30, 31)
    assert [cfg.is_full(i) for i in (0, 29, 30, 31)] == [False, False, True, True]
    assert MoBAConfig(8, 2, all_full=True).is_full(0)
    assert hash(cfg) == hash(MoBAConfig(4096, 12, full_attention_layers=(30, 31)))


def _inputs(hq=4, hkv=2, lengths=(20, 29)):
    cu = make_cu(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(int(cu[-1]), h, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    return cu, q, k, v


def test_attention_on_one_device_without_a_process_group():
    cu, q, k, v = _inputs()
    cfg = MoBAConfig(4, 2, full_attention_layers=[1])
    moba = cfg.attention(0, q, k, v, cu)
    full = cfg.attention(1, q, k, v, cu)
    assert (moba - moba_attn_varlen_reference(q, k, v, cu, 4, 2)).abs().max() <= 1e-10
    assert (full - causal_attn_varlen_reference(q, k, v, cu)).abs().max() <= 1e-10


def config_worker(rank, world):
    cu, q, k, v = _inputs()
    a, b = [0, 30, 49][rank], [30, 49][rank]
    cfg = MoBAConfig(4, 2, full_attention_layers=[1])
    for layer, ref, path in [(0, moba_attn_varlen_reference(q, k, v, cu, 4, 2), "moba"),
                             (1, causal_attn_varlen_reference(q, k, v, cu), None)]:
        out = cfg.attention(layer, q[a:b], k[a:b], v[a:b], cu)
        assert (out - ref[a:b]).abs().max() <= 1e-10, f"rank {rank} layer {layer}"
        if path:
            assert last_stats().path == path


def test_attention_over_a_process_group():
    run_distributed(config_worker, 2)
