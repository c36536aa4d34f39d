"""The selected part in the fused Triton kernel (``MOBA_DIST_SELECTED_KERNEL=triton``), wired
through the whole pipeline: single device and context-parallel (gloo), float32 in Triton's CPU
interpreter, against the float64 dense reference."""

import os

import pytest
import torch
from dist_utils import run_distributed
from helpers import make_cu, moba_case

from moba_dist import last_stats, moba_attn_varlen, moba_attn_varlen_cp
from moba_dist.core import SELECTED_ENV, use_fused_selected
from moba_dist.reference import masked_attention

pytest.importorskip("triton")

# (lengths of sequences, slice lengths per rank, chunk, topk, hq, hkv)
CASES = [
    ([40, 24], [64], 8, 3, 4, 2),
    ([30, 34], [32, 32], 4, 2, 4, 4),  # a sequence crosses the boundary
    ([10, 23, 27], [13, 1, 46], 4, 3, 2, 1),  # a one-token slice inside a block
    ([50, 14], [16, 16, 16, 16], 20, 2, 4, 2),  # chunk larger than a slice
    ([9, 0, 40, 15], [20, 25, 19], 5, 4, 8, 2),  # an empty sequence, GQA 4:1
]
TOL = 2e-5  # float32 kernels against the float64 reference


def _check(tag, out, grads, ref, ref_grads, a, b):
    for name, got, want in [("out", out, ref[a:b])] + [
            (n, g, w[a:b]) for n, g, w in zip(("dq", "dk", "dv"), grads, ref_grads)]:
        err = (got.double() - want).abs().max().item() if got.numel() else 0.0
        assert err <= TOL, f"{tag}: {name} max abs error {err}"


def check_cases(rank, world, cases):
    for lengths, slices, chunk, topk, hq, hkv in cases:
        if len(slices) != world:
            continue
        cu, q, k, v, go, ref, ref_grads = moba_case(lengths, chunk, topk, hq, hkv)
        a = sum(slices[:rank])
        b = a + slices[rank]
        local = [t[a:b].float().requires_grad_() for t in (q, k, v)]
        if world > 1:
            out = moba_attn_varlen_cp(*local, cu, chunk, topk)
        else:
            out = moba_attn_varlen(*local, cu, max(lengths), chunk, topk)
        assert last_stats().selected_kernel == "triton"
        out.backward(go[a:b].float())
        _check(f"rank {rank} case {lengths} {slices}", out, [t.grad for t in local], ref, ref_grads, a, b)


def cp_worker(rank, world, cases):
    os.environ[SELECTED_ENV] = "triton"  # a spawned process of this test only
    check_cases(rank, world, cases)


def test_fused_single_device(monkeypatch):
    monkeypatch.setenv(SELECTED_ENV, "triton")
    check_cases(0, 1, CASES)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_context_parallel(world):
    run_distributed(cp_worker, world, CASES)


def test_fused_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(SELECTED_ENV, "auto")
    assert not use_fused_selected(cpu, torch.float32, 128)  # auto: CUDA only
    monkeypatch.setenv(SELECTED_ENV, "varlen")
    assert not use_fused_selected(cpu, torch.float32, 128)
    monkeypatch.setenv(SELECTED_ENV, "triton")
    assert use_fused_selected(cpu, torch.float32, 128)
    with pytest.raises(ValueError, match="float64"):
        use_fused_selected(cpu, torch.float64, 128)
    monkeypatch.setenv(SELECTED_ENV, "fast")
    with pytest.raises(ValueError, match=SELECTED_ENV):
        use_fused_selected(cpu, torch.float32, 128)


def masked_reference(q, k, v, cu, chunk, selection):
    """float64 attention over each query's own block (causal) plus the blocks ``selection``
    ``[T, Hq, S]`` (global block ids, -1 none) names: checks the attention given a selection."""
    outs = []
    first = 0
    bounds = cu.tolist()
    for s_, e in zip(bounds[:-1], bounds[1:]):
        length = e - s_
        nb = -(-length // chunk)
        if not length:
            continue
        sel = selection[s_:e].long() - first  # block ids within the sequence, <0: none
        chosen = torch.zeros(q.shape[1], length, nb + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(sel >= 0, sel, nb).permute(1, 0, 2), True)
        kblock = torch.arange(length, device=q.device) // chunk
        own = kblock[:, None] == kblock[None, :]
        causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        mask = (chosen[:, :, kblock] | own[None]) & causal[None]
        outs.append(masked_attention(q[s_:e], k[s_:e], v[s_:e], mask))
        first += nb
    return torch.cat(outs)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,topk", [(64, 4), (128, 8)])
def test_fused_gpu_bf16_against_float64_and_deterministic(monkeypatch, chunk, topk):
    monkeypatch.setenv(SELECTED_ENV, "triton")
    monkeypatch.setenv("MOBA_DIST_RECORD_SELECTION", "1")
    lengths = [1500, 2596]
    cu = make_cu(lengths).cuda()
    g = torch.Generator().manual_seed(chunk)
    q, k, v, go = (torch.randn(4096, h, 128, generator=g).to("cuda", torch.bfloat16) for h in (16, 4, 4, 16))
    runs = []
    for _ in range(2):
        local = [t.clone().requires_grad_() for t in (q, k, v)]
        out = moba_attn_varlen(*local, cu, max(lengths), chunk, topk)
        stats = last_stats()
        assert stats.selected_kernel == "triton"
        out.backward(go)
        runs.append([out] + [t.grad for t in local])
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "two runs differ"
    # The reference attends over the blocks the gate chose (the gate is tested on its own:
    # a float64 gate could break near-ties differently from the bf16 call's float32 one).
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref = masked_reference(*full, cu, chunk, stats.selection)
    ref.backward(go.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), runs[0], [ref] + [t.grad for t in full]):
        err = (got.double() - want).abs().max().item()
        assert err <= 3e-2 * max(1.0, want.abs().max().item()), f"{name}: max abs error {err}"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,chunk", [("triton", 128), ("varlen", 128), ("varlen", 1024)])
def test_gpu_host_syncs_are_the_counted_ones(monkeypatch, kernel, chunk):
    """Every device-to-host wait of a forward and backward, seen by CUDA's sync debug mode,
    is one that ``last_stats().host_syncs`` counts (the documented ones)."""
    import warnings

    monkeypatch.setenv(SELECTED_ENV, kernel)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(8192, h, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_()
               for h in (16, 4, 4))
    cu = torch.tensor([0, 3000, 8192], dtype=torch.int32, device="cuda")
    moba_attn_varlen(q, k, v, cu, 5192, chunk, 4).sum().backward()  # warm-up: plan cache, compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")  # outside the recording: it may warn about itself
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = moba_attn_varlen(q, k, v, cu, 5192, chunk, 4)
            out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stats = last_stats()  # reading the statistics may read the device: outside the recording
    syncs = [w for w in seen if "synchroniz" in str(w.message)]
    assert stats.selected_kernel == kernel
    # cu_seqlens once; the varlen path also the selection counts (the fused plan is static).
    assert stats.host_syncs == (1 if kernel == "triton" else 2)
    assert len(syncs) == stats.host_syncs, [f"{w.filename}:{w.lineno}" for w in syncs]


@pytest.mark.parametrize("layout", ["head_major_views", "mixed_strides"])
def test_fused_single_device_reads_strided_kv(monkeypatch, layout):
    """One device, the kernel reads k, v where they are (any row/head strides; a head-major
    copy only when their strides differ): results as for contiguous inputs."""
    monkeypatch.setenv(SELECTED_ENV, "triton")
    lengths, chunk, topk, hq, hkv = [40, 24], 8, 3, 4, 2
    cu, q, k, v, go, ref, ref_grads = moba_case(lengths, chunk, topk, hq, hkv)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    # [Hkv, T, D] storage seen as [T, Hkv, D] (what HF's [1, H, S, D] keys become)
    hm = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in leaves[1:]]
    kk, vv = hm if layout == "head_major_views" else (hm[0], leaves[2])
    out = moba_attn_varlen(leaves[0], kk, vv, cu, max(lengths), chunk, topk)
    assert last_stats().selected_kernel == "triton"
    out.backward(go.float())
    _check(layout, out, [t.grad for t in leaves], ref, ref_grads, 0, sum(lengths))
