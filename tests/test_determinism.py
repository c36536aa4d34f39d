"""Determinism: identical inputs give bitwise identical outputs and gradients, run after run, on
the CPU always (and identical with ``torch.use_deterministic_algorithms(True)``), and on CUDA
in deterministic mode (``-m gpu``)."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from dist_utils import run_distributed
from helpers import make_cu

import moba_dist.parallel.api as api
from moba_dist import moba_attn_varlen, moba_attn_varlen_cp, ring_attn_varlen_cp
from moba_dist.kernels import index_add_rows, merge_lse


def test_index_add_rows_adds_in_index_order():
    """On the CPU every mode adds a row's contributions one after the other in index order:
    bitwise what a plain loop gives."""
    g = torch.Generator().manual_seed(1)
    out = torch.randn(7, 3, generator=g)
    index = torch.randint(0, 7, (200,), generator=g)
    src = torch.randn(200, 3, generator=g) * torch.logspace(-4, 4, 200)[:, None]
    loop = out.clone()
    for i in range(200):
        loop[index[i]] = loop[index[i]] + src[i]
    for deterministic in (None, False, True):
        assert torch.equal(index_add_rows(out.clone(), index, src, deterministic), loop)
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.equal(index_add_rows(out.clone(), index, src), loop)
    finally:
        torch.use_deterministic_algorithms(False)


def _problem(dtype, total=90, hq=4, hkv=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = make_cu([37, total - 37])
    q, k, v, go = (torch.randn(total, h, d, generator=g, dtype=dtype) for h in (hq, hkv, hkv, hq))
    return cu, q, k, v, go


def _run(fn, q, k, v, go):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(go)
    return [out.detach()] + [t.grad for t in leaves]


def _same(a, b, what):
    for name, x, y in zip(("out", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{what}: {name} differs between runs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_device_runs_are_bitwise_identical(dtype, monkeypatch):
    # A small workspace budget: the selected part runs in several batches and a (query, head) row
    # gathers several selected blocks per batch, so the repeated-row reductions are exercised.
    monkeypatch.setattr("moba_dist.memory._override", 1 << 16)  # a 64 KiB workspace budget
    cu, q, k, v, go = _problem(dtype)

    def moba(*t):
        return moba_attn_varlen(*t, cu, 53, 4, 4)

    def full(*t):
        return moba_attn_varlen(*t, cu, 53, 16, 4)  # top-k covers everything: one causal kernel

    for fn in (moba, full):
        first = _run(fn, q, k, v, go)
        _same(first, _run(fn, q, k, v, go), f"{fn.__name__} {dtype}")
        torch.use_deterministic_algorithms(True)
        try:
            _same(first, _run(fn, q, k, v, go), f"{fn.__name__} {dtype}, deterministic mode")
        finally:
            torch.use_deterministic_algorithms(False)


def test_merge_lse_with_repeated_rows_is_bitwise_repeatable():
    g = torch.Generator().manual_seed(2)
    out, lse = torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    part, plse = torch.randn(400, 8, generator=g), torch.randn(400, generator=g)
    index = torch.randint(0, 50, (400,), generator=g)
    first = merge_lse(out, lse, part, plse, index)
    for _ in range(3):
        again = merge_lse(out, lse, part, plse, index)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_deterministic_mode_runs_our_ring():
    torch.use_deterministic_algorithms(True)
    try:
        assert api.resolve_ring_impl(None) == "ours"
        assert api.resolve_ring_impl("auto") == "ours"
        api._warned_rfa_nondeterministic = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert api.resolve_ring_impl("rfa_zigzag") == "rfa_zigzag"
            assert api.resolve_ring_impl("rfa_llama3") == "rfa_llama3"
        assert len(caught) == 1 and "not deterministic" in str(caught[0].message)
    finally:
        torch.use_deterministic_algorithms(False)
    assert api.resolve_ring_impl(None) == "auto"


def cp_worker(rank, world):
    slices = [40, 0, 50]
    lo, hi = sum(slices[:rank]), sum(slices[:rank + 1])
    for dtype in (torch.float32, torch.float64):
        cu, q, k, v, go = _problem(dtype)
        q, k, v, go = q[lo:hi], k[lo:hi], v[lo:hi], go[lo:hi]
        calls = [("moba", lambda *t, cu=cu: moba_attn_varlen_cp(*t, cu, 5, 4)),
                 ("ring", lambda *t, cu=cu: ring_attn_varlen_cp(*t, cu))]
        for name, fn in calls:
            first = _run(fn, q, k, v, go)
            _same(first, _run(fn, q, k, v, go), f"rank {rank} {name} {dtype}")
            torch.use_deterministic_algorithms(True)
            try:
                _same(first, _run(fn, q, k, v, go), f"rank {rank} {name} {dtype}, deterministic mode")
            finally:
                torch.use_deterministic_algorithms(False)


def test_context_parallel_runs_are_bitwise_identical():
    run_distributed(cp_worker, 3)


def _gpu_check():
    """bf16 on CUDA under torch.use_deterministic_algorithms(True): every available backend,
    MoBA (several selected blocks per query and batch) and the full-causal route, three runs;
    then the row reduction itself under heavy repetition (atomics would reorder those adds)."""
    from moba_dist.kernels import available_backends, get_backend

    dev = torch.device("cuda")
    _, q, k, v, go = _problem(torch.float32, total=3000, hq=8, hkv=2, d=64, seed=3)
    cu = make_cu([1000, 2000]).to(dev)
    q, k, v, go = (t.to(dev, torch.bfloat16) for t in (q, k, v, go))
    torch.use_deterministic_algorithms(True)
    ran = []
    for name in available_backends():
        try:
            get_backend(dev, torch.bfloat16, 64, name)
        except ValueError:
            continue
        ran.append(name)
        for topk in (6, 40):  # MoBA; top-k covering every sequence (one causal kernel)
            def fn(*t, name=name, topk=topk):
                return moba_attn_varlen(*t, cu, 2000, 50, topk, backend=name)
            first = _run(fn, q, k, v, go)
            for _ in range(2):
                _same(first, _run(fn, q, k, v, go), f"{name} topk={topk}")
    assert "aten_flash" in ran or "flash_attn" in ran, ran
    g = torch.Generator(device=dev).manual_seed(4)
    index = torch.randint(0, 64, (1 << 18,), device=dev, generator=g)
    src = torch.randn(1 << 18, 128, device=dev, generator=g)
    first = index_add_rows(torch.zeros(64, 128, device=dev), index, src)
    for _ in range(3):
        assert torch.equal(first, index_add_rows(torch.zeros(64, 128, device=dev), index, src))
    print("checked backends:", ran)


@pytest.mark.gpu
def test_gpu_runs_are_bitwise_identical_in_deterministic_mode():
    """In a fresh process: cuBLAS reads CUBLAS_WORKSPACE_CONFIG (which PyTorch's deterministic
    mode requires for matmuls on CUDA) when it starts, so it must be set before any GPU work."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "import test_determinism as t; t._gpu_check()"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
