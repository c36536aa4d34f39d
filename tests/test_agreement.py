"""Cross-rank agreement: every disagreement that must not pass is caught in the first collective
and raised on every rank, naming the field and the ranks; harmless differences pass; the
``cu_seqlens`` hash and the messages are checked on synthetic tables without processes."""

import os
import re

import pytest
import torch
from dist_utils import run_distributed
from helpers import make_cu

from moba_dist import moba_attn_varlen_cp, ring_attn_varlen_cp
from moba_dist.memory import set_workspace_bytes
from moba_dist.parallel import handshake as hs
from moba_dist.reference import moba_attn_varlen_reference

D64 = torch.float64
T, HQ, HKV, D = 24, 4, 2, 8
CHUNK, TOPK = 4, 2
SLICES = [13, 11]


def _data():
    g = torch.Generator().manual_seed(5)
    return [torch.randn(T, h, D, generator=g, dtype=D64) for h in (HQ, HKV, HKV)]


def _local(tensors, rank):
    lo = sum(SLICES[:rank])
    return [t[lo:lo + SLICES[rank]] for t in tensors]


def _moba(q, k, v, cu=None, chunk=CHUNK, topk=TOPK, **kw):
    return moba_attn_varlen_cp(q, k, v, make_cu([10, 14]) if cu is None else cu, chunk, topk, **kw)


def _ring(q, k, v, cu=None, **kw):
    return ring_attn_varlen_cp(q, k, v, make_cu([10, 14]) if cu is None else cu, **kw)


# (label, text the message must contain, what rank 1 does differently: fn(q, k, v) -> output,
#  environment of rank 1, rank 1 in deterministic mode). Rank 0 always makes the plain call.
DISAGREE = [
    ("cu_seqlens values", "cu_seqlens differs (ranks [0]: value hash",
     lambda q, k, v: _moba(q, k, v, cu=make_cu([11, 13])), {}, False),
    ("cu_seqlens length", "cu_seqlens differs (ranks [0]: length 3; ranks [1]: length 4)",
     lambda q, k, v: _moba(q, k, v, cu=make_cu([10, 4, 10])), {}, False),
    ("chunk", "moba_chunk_size differs (ranks [0]: 4; ranks [1]: 8)",
     lambda q, k, v: _moba(q, k, v, chunk=8), {}, False),
    ("topk", "moba_topk differs (ranks [0]: 2; ranks [1]: 3)",
     lambda q, k, v: _moba(q, k, v, topk=3), {}, False),
    ("scale", "softmax_scale differs (ranks [0]: 0.3535533905932738; ranks [1]: 0.5)",
     lambda q, k, v: _moba(q, k, v, softmax_scale=0.5), {}, False),
    ("Hq", "q heads (Hq) differs (ranks [0]: 4; ranks [1]: 2)",
     lambda q, k, v: _moba(q[:, :2], k, v), {}, False),
    ("Hkv", "k/v heads (Hkv) differs (ranks [0]: 2; ranks [1]: 1)",
     lambda q, k, v: _moba(q, k[:, :1], v[:, :1]), {}, False),
    ("D", "head dim (D) differs (ranks [0]: 8; ranks [1]: 4)",
     lambda q, k, v: _moba(q[..., :4], k[..., :4], v[..., :4]), {}, False),
    ("dtype", "dtype of q, k, v differs (ranks [0]: torch.float64; ranks [1]: torch.float32)",
     lambda q, k, v: _moba(q.float(), k.float(), v.float()), {}, False),
    ("entry point", "function called differs",
     lambda q, k, v: _ring(q, k, v), {}, False),
    ("backend variable", "$MOBA_DIST_ATTN_BACKEND differs (ranks [0]: unset; ranks [1]: 'torch'; this rank:",
     lambda q, k, v: _moba(q, k, v), {"MOBA_DIST_ATTN_BACKEND": "torch"}, False),
    ("ring impl", "ring implementation (impl= or $MOBA_DIST_RING_IMPL) differs (ranks [0]: 'auto'; "
     "ranks [1]: 'ours')", lambda q, k, v: _ring(q, k, v), {"MOBA_DIST_RING_IMPL": "ours"}, False),
    ("keep fetched", "$MOBA_DIST_KEEP_FETCHED differs (ranks [0]: unset; ranks [1]: '1'; this rank:",
     lambda q, k, v: _moba(q, k, v), {"MOBA_DIST_KEEP_FETCHED": "1"}, False),
    ("gate balance", "$MOBA_DIST_GATE_BALANCE differs (ranks [0]: unset; ranks [1]: '0'; this rank:",
     lambda q, k, v: _moba(q, k, v), {"MOBA_DIST_GATE_BALANCE": "0"}, False),
    ("another setting", "other MOBA_DIST_* environment variables differs",
     lambda q, k, v: _moba(q, k, v), {"MOBA_DIST_SOMETHING_NEW": "1"}, False),
    ("deterministic mode", "torch.use_deterministic_algorithms differs (ranks [0]: False; ranks [1]: True)",
     lambda q, k, v: _moba(q, k, v), {}, True),
]


def _plain(label):
    return (lambda q, k, v: _ring(q, k, v)) if label == "ring impl" else (lambda q, k, v: _moba(q, k, v))


def agreement_worker(rank, world):
    q, k, v = _local(_data(), rank)
    for label, text, variant, env, deterministic in DISAGREE:
        call = variant if rank == 1 else _plain(label)
        saved = {name: os.environ.get(name) for name in env}
        if rank == 1:
            os.environ.update(env)
            torch.use_deterministic_algorithms(deterministic)
        try:
            with pytest.raises(hs.RankMismatchError) as info:
                call(q, k, v)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            torch.use_deterministic_algorithms(False)
        msg = str(info.value)
        assert isinstance(info.value, ValueError)
        assert text in msg, f"{label}: {msg}"
        assert "every rank raises this error" in msg

    # A local error on one rank takes precedence over the disagreement it also causes.
    with pytest.raises(ValueError, match=re.escape("rank 1 of 2 rejected its arguments: moba_topk")):
        _moba(q, k, v, topk=0 if rank == 1 else TOPK, chunk=8 if rank == 1 else CHUNK)

    # Differences that change nothing pass: the default scale spelled out, int64 cu_seqlens,
    # a backend named on one rank that the other resolves too, a recording-only setting, a
    # workspace budget of one rank's own (it only sizes that rank's batches).
    full = _data()
    ref = moba_attn_varlen_reference(*full, make_cu([10, 14]), CHUNK, TOPK)
    lo = sum(SLICES[:rank])
    if rank == 1:
        os.environ["MOBA_DIST_RECORD_SELECTION"] = "1"
        set_workspace_bytes(1 << 12)
        try:
            out = _moba(q, k, v, cu=make_cu([10, 14]).long(), softmax_scale=D ** -0.5, backend="torch")
        finally:
            set_workspace_bytes(None)
    else:
        out = _moba(q, k, v)
    assert (out - ref[lo:lo + SLICES[rank]]).abs().max() <= 1e-10


def test_disagreements_raise_on_every_rank():
    run_distributed(agreement_worker, 2)


# ----- the handshake's pieces, without processes ------------------------------------------------

def test_cu_seqlens_hash_sees_every_change():
    g = torch.Generator().manual_seed(0)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64),
                    torch.randint(0, 5000, (40,), generator=g).cumsum(0)])
    h = hs.cu_seqlens_hash(cu)
    assert torch.equal(h, hs.cu_seqlens_hash(cu.int()))
    seen = {tuple(h.tolist())}
    for i in range(cu.numel()):
        for delta in (1, -1, 1 << 20, (1 << 31) - 1, 1 << 31):
            changed = cu.clone()
            changed[i] += delta
            seen.add(tuple(hs.cu_seqlens_hash(changed).tolist()))
    swapped = cu.clone()
    swapped[[3, 7]] = cu[[7, 3]]
    seen.add(tuple(hs.cu_seqlens_hash(swapped).tolist()))
    seen.add(tuple(hs.cu_seqlens_hash(cu[:-1]).tolist()))
    assert len(seen) == 2 + 5 * cu.numel() + 1


def _table(world, rows):
    """Synthetic handshake rows: ``rows[r]`` maps field keys to words (others equal)."""
    table = []
    for r in range(world):
        words = {key: 7 for key, _ in hs.FIELDS}
        words.update(rows.get(r, {}))
        head = [3, 0, 0] + [0] * (hs.MSG_BYTES // 8)
        table.append(head + [words[key] for key, _ in hs.FIELDS] + [1, 2])
    return table


def test_mismatch_message_groups_ranks():
    table = _table(4, {1: {"topk": 3}, 3: {"topk": 3, "hq": 16}})
    with pytest.raises(hs.RankMismatchError) as info:
        hs._raise_mismatch("f", table, {})
    msg = str(info.value)
    assert "moba_topk differs (ranks [0, 2]: 7; ranks [1, 3]: 3)" in msg
    assert "q heads (Hq) differs (ranks [0, 1, 2]: 7; ranks [3]: 16)" in msg
    hs._raise_mismatch("f", _table(3, {}), {})  # all equal: no error


def test_reported_error_reaches_every_rank_with_its_type():
    table = _table(3, {})
    for rank, error in ((1, TypeError("q must be a torch.Tensor, got list")),
                        (2, ValueError("é" * 200))):  # 400 bytes of UTF-8: cut at 256
        table[rank][1:hs._HEAD + hs.MSG_BYTES // 8] = hs._encode_error(error)
    with pytest.raises(TypeError) as info:
        hs._raise_reported_errors("f", table, None)
    msg = str(info.value)
    assert msg.startswith("f: rank 1 of 3 rejected its arguments: q must be a torch.Tensor, got list")
    assert "ranks [2] rejected theirs too" in msg
    table[1][1] = 0
    with pytest.raises(ValueError, match="rank 2 of 3 rejected its arguments: (é){100,128}"):
        hs._raise_reported_errors("f", table, None)
