"""Every argument error names the argument, on one device and over a group (where every rank
raises, bad argument on one rank or on all), group errors, backend errors, one-time warnings, and
a rank that fails mid-call while the others leave within the process group's timeout.

Spawned worlds are few and each checks many cases: starting a process group costs seconds.
"""

import datetime
import sys
import time
import types
import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from helpers import make_cu

import moba_dist.kernels as kernels
from moba_dist import MoBAConfig, last_stats, moba_attn_varlen, moba_attn_varlen_cp, ring_attn_varlen_cp
from moba_dist.kernels.cuda_backends import FlashAttnBackend
from moba_dist.kernels.torch_backend import TorchBackend
from moba_dist.parallel.handshake import ROW_WORDS
from moba_dist.reference import moba_attn_varlen_reference

D64 = torch.float64
T, HQ, HKV, D = 24, 4, 2, 8
CHUNK, TOPK = 4, 2
FLASH_ATTN_IMPORTS = FlashAttnBackend().installed


def good_args(n=T):
    """Valid arguments of a stream of T tokens (the first ``n`` of them)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(T, h, D, generator=g, dtype=D64)[:n] for h in (HQ, HKV, HKV))
    return dict(q=q, k=k, v=v, cu_seqlens=make_cu([10, 14]), moba_chunk_size=CHUNK, moba_topk=TOPK)


def _set(**changes):
    return lambda a: {**a, **changes}


def _tensor(name, fn):
    return lambda a: {**a, name: fn(a[name])}


# (label, change to the arguments, exception, text the message must contain). Each is an error
# for every entry point that takes the argument (chunk and top-k: the MoBA functions only).
BAD = [
    ("q not a tensor", _set(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q 2-D", _tensor("q", lambda t: t[:, 0]), ValueError, "q must be [T, H, D]"),
    ("q int", _tensor("q", lambda t: t.long()), TypeError, "dtype"),
    ("k dtype differs", _tensor("k", lambda t: t.float()), TypeError, "share a dtype"),
    ("float16 on CPU", lambda a: {**a, **{n: a[n].half() for n in "qkv"}}, TypeError, "not supported on cpu"),
    ("v shape", _tensor("v", lambda t: t[:, :1]), ValueError, "same shape"),
    ("token counts", _tensor("q", lambda t: t[:-1]), ValueError, "same number of tokens"),
    ("head dims", _tensor("q", lambda t: t[..., :4]), ValueError, "head dim"),
    ("GQA ratio", lambda a: {**a, "k": torch.zeros(T, 3, D, dtype=D64), "v": torch.zeros(T, 3, D, dtype=D64)},
     ValueError, "multiple of k heads"),
    ("no q heads", _tensor("q", lambda t: t[:, :0]), ValueError, "multiple of k heads"),
    ("meta device", lambda a: {**a, **{n: a[n].to("meta") for n in "qkv"}}, ValueError, "q is on meta"),
    ("cu_seqlens list", _set(cu_seqlens=[0, 10, 24]), TypeError, "cu_seqlens must be a torch.Tensor"),
    ("cu_seqlens float", _set(cu_seqlens=torch.tensor([0.0, 10.0, 24.0])), TypeError,
     "cu_seqlens must be int32"),
    ("cu_seqlens 2-D", _set(cu_seqlens=torch.tensor([[0, 24]], dtype=torch.int32)), ValueError, "1-D"),
    ("cu_seqlens start", _set(cu_seqlens=make_cu([1, 9, 14])[1:]), ValueError, "cu_seqlens[0] must be 0"),
    ("cu_seqlens order", _set(cu_seqlens=torch.tensor([0, 12, 10, 24], dtype=torch.int32)), ValueError,
     "non-decreasing"),
    ("cu_seqlens end", _set(cu_seqlens=make_cu([10, 13])), ValueError, "cu_seqlens[-1]"),
    ("chunk 0", _set(moba_chunk_size=0), ValueError, "chunk_size must be an int >= 1"),
    ("chunk float", _set(moba_chunk_size=4.0), TypeError, "chunk_size must be an int"),
    ("chunk bool", _set(moba_chunk_size=True), TypeError, "chunk_size must be an int"),
    ("topk negative", _set(moba_topk=-2), ValueError, "topk must be an int >= 1"),
    ("scale negative", _set(softmax_scale=-0.1), ValueError, "softmax_scale must be a positive finite"),
    ("scale zero", _set(softmax_scale=0.0), ValueError, "softmax_scale must be a positive finite"),
    ("scale inf", _set(softmax_scale=float("inf")), ValueError, "softmax_scale must be a positive finite"),
    ("scale nan", _set(softmax_scale=float("nan")), ValueError, "softmax_scale must be a positive finite"),
    ("scale str", _set(softmax_scale="0.1"), TypeError, "softmax_scale must be a float"),
    ("scale tensor", _set(softmax_scale=torch.tensor(0.1)), TypeError, "softmax_scale must be a float"),
    ("backend unknown", _set(backend="nope"), ValueError, "backend='nope' is not an attention backend"),
    ("backend type", _set(backend=3), TypeError, "backend must be a str"),
    ("backend on CPU", _set(backend="aten_flash"), ValueError, "runs on CUDA only"),
    ("backend missing", _set(backend="flash_attn"), ValueError,
     "CUDA only" if FLASH_ATTN_IMPORTS else "flash-attn package does not import"),
]
NEEDS_CHUNK = ("chunk", "topk")
NOT_WITH_SHARDS = ("cu_seqlens end",)  # over a group the total is the sum of the slices


def _single(a):
    a = dict(a)
    return moba_attn_varlen(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"), 14,
                            a.pop("moba_chunk_size"), a.pop("moba_topk"), **a)


def _config(layer):
    def call(a):
        a = dict(a)
        cfg = MoBAConfig(a.pop("moba_chunk_size"), a.pop("moba_topk"), full_attention_layers=[1])
        return cfg.attention(layer, a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"), **a)
    return call


def _moba_cp(a):
    a = dict(a)
    return moba_attn_varlen_cp(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"),
                               a.pop("moba_chunk_size"), a.pop("moba_topk"), **a)


def _ring_cp(a):
    a = {key: val for key, val in a.items() if key not in ("moba_chunk_size", "moba_topk")}
    return ring_attn_varlen_cp(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("cu_seqlens"), **a)


@pytest.mark.parametrize("label, change, exc, text", BAD, ids=[b[0] for b in BAD])
def test_single_device_errors_name_the_argument(label, change, exc, text):
    calls = [_single, _config(0)]  # moba_attn_varlen, MoBAConfig's MoBA layer
    if not label.startswith(NEEDS_CHUNK):  # a full layer takes no chunk or top-k
        calls.append(_config(1))
    for call in calls:
        with pytest.raises(exc, match=_re(text)):
            call(change(good_args()))


def _re(text):
    import re
    return re.escape(text)


def test_environment_settings_are_named(monkeypatch):
    monkeypatch.setenv("MOBA_DIST_ATTN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$MOBA_DIST_ATTN_BACKEND='fast' is not an attention backend"):
        _single(good_args())
    monkeypatch.setenv("MOBA_DIST_ATTN_BACKEND", "aten_flash")
    with pytest.raises(ValueError, match=r"\$MOBA_DIST_ATTN_BACKEND='aten_flash' cannot run"):
        _config(1)(good_args())
    monkeypatch.setenv("MOBA_DIST_ATTN_BACKEND", "torch")
    assert _single(good_args()).shape == (T, HQ, D)


def test_context_parallel_without_a_process_group():
    """The CP functions need a process group (and say how to get one); an argument error, more
    specific, comes first. MoBAConfig.attention, the dispatcher, runs on one device instead."""
    assert not dist.is_initialized()
    for call in (_moba_cp, _ring_cp):
        with pytest.raises(ValueError, match="init_process_group"):
            call(good_args())
        with pytest.raises(ValueError, match="moba_topk" if call is _moba_cp else "softmax_scale"):
            call({**good_args(), "moba_topk": 0, "softmax_scale": -1.0})
        with pytest.raises(TypeError, match="group must be a torch.distributed.ProcessGroup"):
            call({**good_args(), "group": "world"})
    a = good_args()
    ref = moba_attn_varlen_reference(a["q"], a["k"], a["v"], a["cu_seqlens"], CHUNK, TOPK)
    out = _config(0)(a)
    assert (out - ref).abs().max() <= 1e-10 and last_stats().path == "moba"
    _config(1)(a)
    assert last_stats().path == "full" and last_stats().local_tokens == T


def test_flash_attn_version_and_absence_are_explained(monkeypatch):
    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = "2.6.3"
    pkg.flash_attn_interface = types.ModuleType("flash_attn.flash_attn_interface")
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", pkg.flash_attn_interface)
    old = FlashAttnBackend()
    assert not old.installed
    assert "flash-attn 2.6.3 is installed" in old.why_not(torch.device("cuda"), torch.bfloat16, 64)
    assert "flash-attn>=2.7,<2.9" in old.why_not(torch.device("cuda"), torch.bfloat16, 64)
    pkg.__version__ = "2.9.0"  # past the checked range: reported, and the automatic choice skips it
    assert not FlashAttnBackend().installed
    for ok in ("2.7.4.post1", "2.8.3"):
        pkg.__version__ = ok
        assert FlashAttnBackend().installed
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    gone = FlashAttnBackend()
    assert "flash-attn package does not import" in gone.why_not(torch.device("cuda"), torch.bfloat16, 64)


def test_flash_attn_private_functions_called_by_keyword(monkeypatch):
    """The adapter passes every argument after the tensors by name, so it runs against a stand-in
    whose parameters after the tensors are keyword-only, named as in flash-attn 2.7/2.8."""
    be_torch = kernels.TorchBackend()

    def fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None, seqused_k=None):
        out, lse = be_torch.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    softmax_scale, causal)
        return out, lse, None, None

    def bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left, window_size_right, softcap,
            alibi_slopes, deterministic, rng_state=None, zero_tensors=False):
        assert dropout_p == 0.0 and (window_size_left, window_size_right, softcap) == (-1, -1, 0.0)
        grads = be_torch.backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, softmax_scale, causal)
        for buf, g in zip((dq, dk, dv), grads):
            buf.copy_(g)

    pkg = types.ModuleType("flash_attn")
    pkg.__version__ = "2.8.3"
    fai = pkg.flash_attn_interface = types.ModuleType("flash_attn.flash_attn_interface")
    fai._flash_attn_varlen_forward, fai._flash_attn_varlen_backward = fwd, bwd
    monkeypatch.setitem(sys.modules, "flash_attn", pkg)
    monkeypatch.setitem(sys.modules, "flash_attn.flash_attn_interface", fai)
    be = FlashAttnBackend()
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(10, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    args = (cu, cu, 6, 6, 0.3, True)
    out, lse = be.forward(q, k, v, *args)
    want_out, want_lse = be_torch.forward(q, k, v, *args)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    got = be.backward(do, q, k, v, out, lse, *args)
    for a, b in zip(got, be_torch.backward(do, q, k, v, out, lse, *args)):
        assert torch.equal(a, b)


def test_float32_on_cuda_warns_once(monkeypatch):
    """Only the device matters to the choice, so this runs without a GPU."""
    monkeypatch.setattr(kernels, "_warned_slow_cuda", False)
    cuda = torch.device("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert kernels.get_backend(cuda, torch.float32, 64).name == "torch"
        assert kernels.get_backend(cuda, torch.float32, 64, "torch").name == "torch"
    slow = [w for w in caught if "pure-PyTorch" in str(w.message)]
    assert len(slow) == 1 and "bfloat16" in str(slow[0].message)
    monkeypatch.setattr(kernels, "_warned_slow_cuda", False)
    with warnings.catch_warnings(record=True) as caught:  # named: chosen knowingly, no warning
        warnings.simplefilter("always")
        kernels.get_backend(cuda, torch.float32, 64, "torch")
    assert not caught


# ----- over a group: every rank raises -----------------------------------------------------------

SLICES = [13, 11]  # rank r holds tokens [sum(SLICES[:r]), ...)


def _local(a, rank):
    lo = sum(SLICES[:rank])
    return {**a, **{n: a[n][lo:lo + SLICES[rank]] for n in "qkv" if isinstance(a[n], torch.Tensor)
                    and a[n].dim() >= 1 and a[n].shape[0] == T}}


PG_TIMEOUT = 4.0


def _fail_mid_call(rank, world):
    """Rank 1's attention kernel fails after the handshake; rank 1 then stays away from the group
    (as a rank stuck in its error handling would; here it waits in the final barrier of the
    default group). Rank 0 must not hang: its next collective on the group fails within the
    group's timeout. The group gets a short timeout of its own; the default group keeps a long
    one, so that a slow process start cannot fail the test."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    forward = TorchBackend.forward
    if rank == 1:
        def fail(self, *args):
            raise RuntimeError("injected kernel failure on rank 1")
        TorchBackend.forward = fail
    a = _local(good_args(), rank)
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as info:
            for _ in range(2):
                out = _moba_cp({**{n: (t.requires_grad_() if n in "qkv" else t) for n, t in a.items()},
                                "group": group})
                out.sum().backward()
    finally:
        TorchBackend.forward = forward
    elapsed = time.monotonic() - start
    if rank == 1:
        assert "injected kernel failure" in str(info.value)
    else:
        assert elapsed < PG_TIMEOUT + 10, f"rank 0 waited {elapsed:.1f}s"


def errors_worker(rank, world):
    cases = 0
    for label, change, exc, text in BAD:
        if label in NOT_WITH_SHARDS:
            continue
        for call in (_moba_cp, _ring_cp):
            if call is _ring_cp and label.startswith(NEEDS_CHUNK):
                continue
            # Bad on every rank: every rank raises, naming rank 0 (the first) and the argument.
            with pytest.raises(exc, match=_re(text)) as info:
                call(_local(change(good_args()), rank))
            assert "rank 0 of 2 rejected its arguments" in str(info.value), str(info.value)
            # Bad on rank 1 only: rank 0, whose arguments are fine, raises the same error.
            args = change(good_args()) if rank == 1 else good_args()
            with pytest.raises(exc, match=_re(text)) as info:
                call(_local(args, rank))
            assert "rank 1 of 2 rejected its arguments" in str(info.value), str(info.value)
            cases += 1
    assert cases > 40
    # The total tokens over the group must match cu_seqlens: all ranks see the same totals.
    short = _local(good_args(), rank)
    if rank == 1:
        short = {**short, **{n: short[n][:-1] for n in "qkv"}}
    for call in (_moba_cp, _ring_cp):
        with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] \(24\) must equal the total tokens over "
                                             r"the group \(23: slice lengths \[13, 10\]"):
            call(short)

    # Group errors raise at once on the rank concerned (no handshake is possible).
    only_rank_0 = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ValueError, match="group does not contain this process"):
            _moba_cp({**_local(good_args(), rank), "group": only_rank_0})
    else:  # a group of one: this rank's slice is then the whole stream
        a = good_args()
        out = _moba_cp({**good_args(), "group": only_rank_0})
        ref = moba_attn_varlen_reference(a["q"], a["k"], a["v"], a["cu_seqlens"], CHUNK, TOPK)
        assert (out - ref).abs().max() <= 1e-10
    with pytest.raises(TypeError, match="group must be"):
        _ring_cp({**_local(good_args(), rank), "group": [0, 1]})

    # After all that, the group is healthy: a good call is exact, and statistics describe it.
    a = good_args()
    ref = moba_attn_varlen_reference(a["q"], a["k"], a["v"], a["cu_seqlens"], CHUNK, TOPK)
    lo = sum(SLICES[:rank])
    out = _moba_cp(_local(a, rank))
    assert (out - ref[lo:lo + SLICES[rank]]).abs().max() <= 1e-10
    st = last_stats()
    assert st.path == "moba" and st.host_syncs == 2
    assert st.bytes_sent["handshake"] == ROW_WORDS * 8
    assert st.bytes_received["handshake"] == (world - 1) * ROW_WORDS * 8
    _ring_cp(_local(a, rank))
    st = last_stats()  # the ring call's own statistics, not the previous call's
    assert st.path == "ring" and st.rank == rank and st.local_tokens == SLICES[rank]
    assert st.bytes_sent["handshake"] == ROW_WORDS * 8 and "block_sums" not in st.bytes_sent
    _fail_mid_call(rank, world)


def test_errors_raise_on_every_rank_and_a_failing_rank_hangs_no_one():
    run_distributed(errors_worker, 2, timeout=120, fresh=True)  # a rank fails on purpose


def test_old_triton_is_named_with_the_minimum():
    from moba_dist.kernels.triton_version import TRITON_MIN, require_triton

    assert TRITON_MIN == (3, 4)
    with pytest.raises(ImportError, match=r"need triton>=3\.4, found triton 3\.3\.1"):
        require_triton("3.3.1")
    for ok in ("3.4.0", "3.9.0", "3.10.0+git1234", "4.0.0"):
        require_triton(ok)
