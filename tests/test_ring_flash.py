"""The ring-flash-attn path on CPU: the real ring-flash-attn algorithms, run over gloo on a CPU
stand-in for flash-attn's private varlen API (written here on moba_dist's torch backend).

This checks what a GPU run cannot isolate: our relayouts to its layouts, the local cu_seqlens
and max_seqlen we hand it, and its llama3 preparation, against the dense reference. Skipped
unless ring-flash-attn is installed (``pip install --no-deps ring-flash-attn``; its package
``__init__`` may fail to import, which is fine). Tolerance is float32-level because
ring-flash-attn merges partial results in float32 whatever the input dtype.
"""

import importlib.util
import sys
import textwrap

import pytest
import torch
from dist_utils import run_distributed
from helpers import make_cu

from moba_dist.reference import causal_attn_varlen_reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ring_flash_attn") is None,
                                reason="ring-flash-attn is not installed")

FAKE_FLASH_ATTN = textwrap.dedent('''
    """CPU stand-in for flash-attn 2.8's private varlen API, on moba_dist's torch backend."""
    from moba_dist.kernels.torch_backend import TorchBackend

    _be = TorchBackend()

    def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   dropout_p, softmax_scale, causal, window_size_left=-1,
                                   window_size_right=-1, softcap=0.0, alibi_slopes=None,
                                   return_softmax=False, block_table=None, leftpad_k=None,
                                   seqused_k=None, zero_tensors=False):
        assert dropout_p == 0 and (window_size_left, window_size_right) == (-1, -1)
        out, lse = _be.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale, causal)
        return out, lse.float(), None, None

    def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q,
                                    cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                                    causal, window_size_left, window_size_right, softcap, alibi_slopes,
                                    deterministic, rng_state=None, zero_tensors=False):
        grads = _be.backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                             max_seqlen_k, softmax_scale, causal)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)
''')

# (impl, sequence lengths, slice length per rank); zigzag needs lengths that are multiples of 2W
CASES = [
    ("rfa_zigzag", [12, 36, 0, 24], [10, 30, 32]),
    ("rfa_zigzag", [60], [0, 25, 35]),
    ("rfa_llama3", [10, 40, 13], [40, 1, 22]),
    ("rfa_llama3", [63], [21, 21, 21]),
]


def rfa_worker(rank, world, fake_dir):
    sys.path.insert(0, fake_dir)
    import moba_dist
    from moba_dist.parallel import ring_flash

    ring_flash._runnable = lambda q: True  # the stand-in runs any dtype on CPU
    assert ring_flash.load_ring_flash_attn() is not None, "ring-flash-attn did not import"
    for impl, lengths, slices in CASES:
        cu = make_cu(lengths)
        total = int(cu[-1])
        assert ring_flash.pick_impl(impl, torch.zeros(1, 1, 8), cu.long(), world, None) == impl
        g = torch.Generator().manual_seed(total)
        q, k, v, go = (torch.randn(total, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2, 4))
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = causal_attn_varlen_reference(*full, cu)
        ref.backward(go)
        a = sum(slices[:rank])
        b = a + slices[rank]
        local = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
        out = moba_dist.ring_attn_varlen_cp(*local, cu, impl=impl)
        out.backward(go[a:b])
        for name, got, want in [("out", out, ref[a:b]), ("dq", local[0].grad, full[0].grad[a:b]),
                                ("dk", local[1].grad, full[1].grad[a:b]),
                                ("dv", local[2].grad, full[2].grad[a:b])]:
            err = (got - want).abs().max().item() if got.numel() else 0.0
            assert err <= 1e-5, f"rank {rank} {impl} {lengths} {slices}: {name} max abs error {err}"


def test_ring_flash_attn_algorithms_through_our_relayouts(tmp_path):
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    (tmp_path / "flash_attn" / "flash_attn_interface.py").write_text(FAKE_FLASH_ATTN)
    run_distributed(rfa_worker, 3, str(tmp_path), fresh=True)  # a stand-in flash_attn on sys.path
