"""Ring attention over gloo (spawned processes) against the independent dense reference, the
MoBA-to-ring routing, ring-flash-attn's import fallback, and argument errors.

Each spawned run checks many cases: starting a process group costs seconds, a case milliseconds.
"""

import sys
import textwrap
import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from helpers import make_cu

from moba_dist import last_stats, moba_attn_varlen_cp, ring_attn_varlen_cp
from moba_dist.parallel import ring_flash
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference

# (sequence lengths, slice length per rank, hq, hkv)
CASES = [
    ([37], [37], 4, 2),
    ([9, 0, 40, 15], [64], 8, 2),
    ([64], [32, 32], 4, 4),  # one sequence over equal slices
    ([30, 34], [20, 44], 4, 2),  # unequal, a sequence crosses the boundary
    ([3, 50, 2], [0, 55], 4, 1),  # an empty slice, GQA 4:1
    ([64], [5, 27, 32], 4, 1),
    ([10, 23, 27], [13, 1, 46], 2, 1),  # a one-token slice
    ([9, 0, 40, 15], [20, 0, 44], 8, 2),  # an empty sequence and an empty slice
    ([60], [2, 28, 0, 30], 4, 2),
    ([33, 31], [11, 21, 17, 15], 4, 1),  # several sequences crossing boundaries
    ([1, 1, 1, 60, 1], [16, 16, 16, 16], 4, 4),
    ([3, 2], [1, 0, 2, 2], 2, 1),  # fewer tokens than zigzag chunks: most chunks empty
]


def _data(lengths, hq, hkv, dtype=torch.float64, d=8):
    cu = make_cu(lengths)
    total = int(cu[-1])
    g = torch.Generator().manual_seed(total * 31 + hq * 7 + hkv)
    q, k, v, go = (torch.randn(total, h, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv, hq))
    return cu, q, k, v, go


def _check(tag, pairs, tol):
    for name, got, want in pairs:
        assert got.shape == want.shape, f"{tag}: {name} shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.dtype == want.dtype, f"{tag}: {name} dtype {got.dtype} != {want.dtype}"
        diff = (got - want).abs()
        err = diff.max().item() if got.numel() else 0.0
        where = diff.flatten().argmax().item() if got.numel() else 0
        assert err <= tol, (f"{tag}: {name} max abs error {err} at flat index {where} "
                            f"(shape {tuple(got.shape)}): got {got.flatten()[where].item()!r} "
                            f"want {want.flatten()[where].item()!r}; rows off: "
                            f"{(diff.flatten(1).amax(1) > tol).nonzero().flatten().tolist()}")


def _run_case(rank, lengths, slices, hq, hkv, fn, ref_fn, dtype=torch.float64, tol=1e-10):
    cu, q, k, v, go = _data(lengths, hq, hkv, dtype)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ref_fn(*full, cu)
    ref.backward(go)
    a = sum(slices[:rank])
    b = a + slices[rank]
    local = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
    out = fn(*local, cu)
    out.backward(go[a:b])
    _check(f"rank {rank} lengths={lengths} slices={slices} hq={hq} hkv={hkv} {dtype}",
           [("out", out, ref[a:b]), ("dq", local[0].grad, full[0].grad[a:b]),
            ("dk", local[1].grad, full[1].grad[a:b]), ("dv", local[2].grad, full[2].grad[a:b])], tol)


def ring_worker(rank, world):
    n_cases = 0
    for lengths, slices, hq, hkv in CASES:
        if len(slices) != world:
            continue
        n_cases += 1
        _run_case(rank, lengths, slices, hq, hkv, ring_attn_varlen_cp, causal_attn_varlen_reference)
    assert n_cases >= 2
    # float32, a custom scale, our ring named explicitly
    lengths, slices = [7, 41], [48 // world + 48 % world] + [48 // world] * (world - 1)
    _run_case(rank, lengths, slices, 4, 2,
              lambda q, k, v, cu: ring_attn_varlen_cp(q, k, v, cu, softmax_scale=0.3, impl="ours"),
              lambda q, k, v, cu: causal_attn_varlen_reference(q, k, v, cu, softmax_scale=0.3),
              dtype=torch.float32, tol=2e-5)
    if world > 1:
        _check_ring_traffic(rank, world)


def _check_ring_traffic(rank, world):
    """Over the group, the forward ring delivers every rank's K/V to each of the W-1 others once,
    and the backward ring returns every token's dK/dV accumulator (float64) after W hops."""
    cu, q, k, v, go = _data([50, 30], 4, 2)
    total, row = 80, 2 * 2 * 8 * 8  # K and V, 2 kv heads, d=8, float64
    a, b = total * rank // world, total * (rank + 1) // world
    local = [t[a:b].clone().requires_grad_() for t in (q, k, v)]
    out = moba_attn_varlen_cp(*local, cu, 8, 10)  # 8 * 10 >= 50: full attention, via the ring
    st = last_stats()
    assert st.path == "ring" and st.world_size == world and st.rank == rank and st.local_tokens == b - a
    out.backward(go[a:b])
    sums = torch.tensor([st.bytes_received.get(n, 0) for n in ("ring_kv", "ring_kv.backward",
                                                               "ring_dkv.backward")] +
                        [st.bytes_sent.get(n, 0) for n in ("ring_kv", "ring_dkv.backward")])
    dist.all_reduce(sums)
    kv = (world - 1) * total * row
    assert sums.tolist() == [kv, kv, world * total * row, kv, world * total * row], sums.tolist()


def test_ring_world_1_and_2():
    run_distributed(ring_worker, 1)
    run_distributed(ring_worker, 2)


def test_ring_world_3():
    run_distributed(ring_worker, 3)


def test_ring_world_4():
    run_distributed(ring_worker, 4)


def routing_worker(rank, world):
    """``moba_attn_varlen_cp`` runs the ring exactly when topk * chunk >= the longest sequence."""
    lengths = [20, 45, 10]  # longest 45
    slices = [75 - 25 * (world - 1)] + [25] * (world - 1)
    for chunk, topk, path in [(9, 5, "ring"), (15, 3, "ring"), (4, 11, "moba"), (11, 4, "moba"),
                              (45, 1, "ring"), (44, 1, "moba"), (8, 6, "ring")]:
        assert (topk * chunk >= 45) == (path == "ring")
        _run_case(rank, lengths, slices, 4, 2,
                  lambda q, k, v, cu, c=chunk, t=topk: moba_attn_varlen_cp(q, k, v, cu, c, t),
                  lambda q, k, v, cu, c=chunk, t=topk: moba_attn_varlen_reference(q, k, v, cu, c, t))
        st = last_stats()
        assert st.path == path, f"chunk={chunk} topk={topk}: path {st.path}, expected {path}"
        if path == "ring":
            assert st.world_size == world and st.rank == rank and st.local_tokens == slices[rank]
            assert st.host_syncs == 1
            if world > 1:
                assert st.bytes_received["ring_kv"] > 0 and "ring_dkv.backward" in st.bytes_sent
    # The ring path equals full causal attention, not merely MoBA's reference.
    _run_case(rank, lengths, slices, 4, 2,
              lambda q, k, v, cu: moba_attn_varlen_cp(q, k, v, cu, 16, 3),
              causal_attn_varlen_reference)
    # Asking for ring-flash-attn on CPU warns and runs our ring.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run_case(rank, lengths, slices, 4, 2,
                  lambda q, k, v, cu: ring_attn_varlen_cp(q, k, v, cu, impl="rfa_zigzag"),
                  causal_attn_varlen_reference)
    assert any("rfa_zigzag" in str(w.message) for w in caught)
    # cu_seqlens must describe exactly the tokens the group holds.
    q = torch.zeros(slices[rank], 2, 8, dtype=torch.float64)
    kv = torch.zeros(slices[rank], 1, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="cu_seqlens"):
        ring_attn_varlen_cp(q, kv, kv, make_cu([20, 45, 11]))


def test_routing_between_moba_and_ring():
    run_distributed(routing_worker, 3)


def test_argument_errors_name_the_argument():
    q = torch.zeros(4, 2, 8, dtype=torch.float64)
    kv = torch.zeros(4, 1, 8, dtype=torch.float64)
    cu = make_cu([4])
    with pytest.raises(TypeError, match="q"):
        ring_attn_varlen_cp(q.long(), kv, kv, cu)
    with pytest.raises(ValueError, match="heads"):
        kv3 = torch.zeros(4, 3, 8, dtype=torch.float64)
        ring_attn_varlen_cp(q, kv3, kv3, cu)
    with pytest.raises(ValueError, match="impl"):
        ring_attn_varlen_cp(q, kv, kv, cu, impl="bogus")
    with pytest.raises(TypeError, match="softmax_scale"):
        ring_attn_varlen_cp(q, kv, kv, cu, softmax_scale="0.1")


# ----- ring-flash-attn loading and selection (no GPU needed) -----------------------------------

def _fake_package(tmp_path, name, init_body, algo_body):
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(init_body)
    (pkg / "zigzag_ring_flash_attn_varlen.py").write_text(
        algo_body + "\ndef zigzag_ring_flash_attn_varlen_func(*a, **k):\n    return 'zigzag'\n")
    (pkg / "llama3_flash_attn_varlen.py").write_text(textwrap.dedent("""
        from .helper import VALUE
        def llama3_flash_attn_varlen_func(*a, **k):
            return VALUE
        def llama3_flash_attn_prepare_cu_seqlens(*a, **k):
            return None
        """))
    (pkg / "helper.py").write_text("VALUE = 'llama3'\n")


def test_algorithms_import_without_running_the_broken_init(tmp_path, monkeypatch):
    # Like ring-flash-attn under transformers 5: __init__ fails, the algorithm modules are fine.
    _fake_package(tmp_path, "fake_rfa_ok", "raise ImportError('hf adapter is broken')\n", "")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        ns = ring_flash.import_algorithms("fake_rfa_ok")
        assert ns is not None
        assert ns.zigzag() == "zigzag" and ns.llama3() == "llama3"
    finally:
        for m in [m for m in sys.modules if m.startswith("fake_rfa_ok")]:
            del sys.modules[m]


def test_algorithms_that_fail_to_import_give_none_and_leave_nothing(tmp_path, monkeypatch):
    # Like a machine without flash-attn: the algorithm module's own import fails.
    _fake_package(tmp_path, "fake_rfa_bad", "", "import flash_attn_not_installed_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ring_flash.import_algorithms("fake_rfa_bad") is None
    assert not [m for m in sys.modules if m.startswith("fake_rfa_bad")]
    assert ring_flash.import_algorithms("no_such_package_for_moba_dist") is None


def test_pick_impl(monkeypatch):
    q = torch.zeros(8, 2, 8, dtype=torch.float32)
    cu = torch.tensor([0, 8, 16])
    # Here (CPU, no flash-attn) everything resolves to our ring; explicit rfa choices warn.
    assert ring_flash.pick_impl(None, q, cu, 2, None) == "ours"
    with pytest.warns(UserWarning, match="rfa_llama3"):
        assert ring_flash.pick_impl("rfa_llama3", q, cu, 2, None) == "ours"
    monkeypatch.setenv(ring_flash.IMPL_ENV, "bogus")
    with pytest.raises(ValueError, match="impl"):
        ring_flash.pick_impl(None, q, cu, 2, None)
    # Where ring-flash-attn could run, auto takes its zigzag if the lengths allow it.
    monkeypatch.delenv(ring_flash.IMPL_ENV)
    monkeypatch.setattr(ring_flash, "_runnable", lambda q: True)
    monkeypatch.setattr(ring_flash, "load_ring_flash_attn", lambda: object())
    assert ring_flash.pick_impl(None, q, cu, 2, None) == "rfa_zigzag"  # 8 % 4 == 0
    assert ring_flash.pick_impl(None, q, cu, 2, "torch") == "ours"  # a named kernel means ours
    assert ring_flash.pick_impl("ours", q, cu, 2, None) == "ours"
    assert ring_flash.pick_impl(None, q, torch.tensor([0, 6, 16]), 2, None) == "ours"  # 6 % 4
    assert ring_flash.pick_impl("rfa_llama3", q, torch.tensor([0, 6, 16]), 2, None) == "rfa_llama3"
    with pytest.warns(UserWarning, match="multiple"):
        assert ring_flash.pick_impl("rfa_llama3", q, torch.tensor([0, 6, 15]), 2, None) == "ours"
    monkeypatch.setenv(ring_flash.IMPL_ENV, "ours")
    assert ring_flash.pick_impl(None, q, cu, 2, None) == "ours"
