"""``StepPlan``: one plan shared by a step's layers. Results equal the dense reference and the
calls without a plan; the host syncs of a step do not grow with the layers where the plan is
static (fused kernel, one device), and the handshake runs once per step over a group."""

import os
import warnings

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from helpers import make_cu

import moba_dist
from moba_dist import MoBAConfig, StepPlan, last_stats, moba_attn_varlen, moba_attn_varlen_cp
from moba_dist.core import SELECTED_ENV
from moba_dist.reference import moba_attn_varlen_reference

LENGTHS = [37, 0, 51]  # an empty sequence; blocks cut inside sequences
CHUNK, TOPK, HQ, HKV, D = 8, 3, 4, 2, 8
CFG = MoBAConfig(chunk_size=CHUNK, topk=TOPK, full_attention_layers=(1,))


def _weights(layers, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    x = torch.randn(total, HQ, D, dtype=torch.float64, generator=g)
    kv = [(torch.randn(total, HKV, D, dtype=torch.float64, generator=g),
           torch.randn(total, HKV, D, dtype=torch.float64, generator=g)) for _ in range(layers)]
    return x, kv


def _stack(attn, x, kv, dtype):
    """A toy model: ``layers`` attention calls, each layer's output the next one's queries."""
    leaves = [x.to(dtype).requires_grad_()] + [t.to(dtype).requires_grad_() for pair in kv for t in pair]
    h = leaves[0]
    for i in range(len(kv)):
        h = attn(i, h, leaves[1 + 2 * i], leaves[2 + 2 * i]) * 1.5
    h.square().sum().backward()
    return h.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("kernel", ["triton", "varlen"])
@pytest.mark.parametrize("layers", [1, 3])
def test_one_device_plan_equals_reference_and_syncs(monkeypatch, kernel, layers):
    if kernel == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv(SELECTED_ENV, kernel)
    cu = make_cu(LENGTHS)
    x, kv = _weights(layers)
    dtype = torch.float32 if kernel == "triton" else torch.float64  # the Triton kernel: no float64
    plan = StepPlan(cu)
    got, got_grads = _stack(lambda i, q, k, v: CFG.attention(i, q, k, v, cu, plan=plan,
                                                             context_parallel=False), x, kv, dtype)
    alone, alone_grads = _stack(lambda i, q, k, v: CFG.attention(i, q, k, v, cu, context_parallel=False),
                                x, kv, dtype)
    ref, ref_grads = _stack(lambda i, q, k, v: moba_attn_varlen_reference(q, k, v, cu, CHUNK, TOPK)
                            if not CFG.is_full(i) else moba_attn_varlen_reference(q, k, v, cu, 10 ** 6, 1),
                            x, kv, torch.float64)
    assert torch.equal(got, alone) and all(torch.equal(a, b) for a, b in zip(got_grads, alone_grads))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip([got] + got_grads, [ref] + ref_grads):
        assert (a.double() - b).abs().max() <= tol * max(1.0, b.abs().max())
    assert plan.calls == layers
    moba_layers = sum(not CFG.is_full(i) for i in range(layers))
    # cu_seqlens is on the CPU: nothing to read. The fused plan is static; the varlen one reads
    # the selection counts of each MoBA layer.
    assert plan.host_syncs == (0 if kernel == "triton" else moba_layers)


def test_plan_checks_its_arguments():
    cu = make_cu(LENGTHS)
    x, ((k, v),) = _weights(1)
    plan = StepPlan(cu)
    moba_attn_varlen(x, k, v, cu, 51, CHUNK, TOPK, plan=plan)
    moba_attn_varlen(x, k, v, cu.clone(), 51, CHUNK, TOPK, plan=plan)  # same values on the CPU
    with pytest.raises(ValueError, match="StepPlan was made for"):
        moba_attn_varlen(x, k, v, make_cu([37, 51]), 51, CHUNK, TOPK, plan=plan)
    with pytest.raises(ValueError, match="tokens"):
        moba_attn_varlen(x[:-1], k[:-1], v[:-1], cu, 51, CHUNK, TOPK, plan=plan)
    with pytest.raises(ValueError, match="context-parallel"):
        moba_attn_varlen(x, k, v, cu, 51, CHUNK, TOPK, plan=StepPlan(cu, context_parallel=True))
    with pytest.raises(ValueError, match="cu_seqlens"):
        StepPlan(torch.zeros(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens\\[-1\\]"):
        moba_attn_varlen(x, k, v, make_cu([10]), 51, CHUNK, TOPK, plan=StepPlan(make_cu([10])))


def test_hf_forward_shares_one_plan():
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig

    import moba_dist.hf
    from moba_dist.hf import attention as hf_attention

    moba_dist.hf.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=3, vocab_size=50, use_cache=False, moba_chunk_size=4, moba_topk=2)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist", dtype=torch.float64)
    ids = torch.randint(0, 50, (1, 30))
    pos = torch.cat([torch.arange(12), torch.arange(18)])[None]
    model(input_ids=ids, position_ids=pos, labels=ids).loss.backward()
    plan = hf_attention._PLAN_MEMO[0][5]
    assert plan.calls == 3 and plan.established


def _cp_worker(rank, world, layers, kernel):
    os.environ[SELECTED_ENV] = kernel
    cu = make_cu(LENGTHS)
    total = int(cu[-1])
    a, b = rank * total // world, (rank + 1) * total // world
    x, kv = _weights(layers, seed=1)
    x, kv = x[a:b], [(k[a:b], v[a:b]) for k, v in kv]
    dtype = torch.float32 if kernel == "triton" else torch.float64
    plan = StepPlan(cu, context_parallel=True)
    handshakes = []

    def with_plan(i, q, k, v):
        out = CFG.attention(i, q, k, v, cu, plan=plan)
        handshakes.append("handshake" in last_stats().bytes_sent)
        return out

    got, got_grads = _stack(with_plan, x, kv, dtype)
    alone, alone_grads = _stack(lambda i, q, k, v: CFG.attention(i, q, k, v, cu), x, kv, dtype)
    assert torch.equal(got, alone) and all(torch.equal(p, q) for p, q in zip(got_grads, alone_grads))
    moba_layers = sum(not CFG.is_full(i) for i in range(layers))
    # The handshake once (the first layer's); then one read of the selection counts per MoBA
    # layer (they size the all-to-all); the ring layers read nothing.
    assert plan.host_syncs == 1 + moba_layers, plan
    assert plan.calls == layers
    # Each call has its own byte ledger: only the first call ran the handshake.
    assert handshakes[0] is True and not any(handshakes[1:])
    with pytest.raises(ValueError, match="slice"):
        CFG.attention(0, x[:-1].to(dtype), kv[0][0][:-1].to(dtype), kv[0][1][:-1].to(dtype), cu, plan=plan)
    dist.barrier()


@pytest.mark.parametrize("kernel", ["varlen", "triton"])
def test_context_parallel_plan_runs_one_handshake(kernel):
    if kernel == "triton":
        pytest.importorskip("triton")
    run_distributed(_cp_worker, 2, 3, kernel)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [128, 1024])
@pytest.mark.parametrize("layers", [2, 6])
def test_gpu_step_syncs_do_not_grow_with_layers(monkeypatch, layers, chunk):
    """CUDA's sync debug mode sees every device-to-host wait of a step of ``layers`` MoBA layers
    (fused kernel, one device, forward and backward): one, the plan's read of ``cu_seqlens``.
    Also for blocks above ``FUSED_MAX_CHUNK`` when the fused kernel is chosen."""
    monkeypatch.setenv(SELECTED_ENV, "triton")
    g = torch.Generator().manual_seed(0)
    mk = lambda h: torch.randn(8192, h, 128, generator=g).to("cuda", torch.bfloat16)  # noqa: E731
    x = mk(16).requires_grad_()
    kv = [(mk(4).requires_grad_(), mk(4).requires_grad_()) for _ in range(layers)]
    cu = torch.tensor([0, 3000, 8192], dtype=torch.int32, device="cuda")
    cfg = MoBAConfig(chunk_size=chunk, topk=4)

    def step(plan):
        h = x
        for k, v in kv:
            h = cfg.attention(0, h, k, v, cu, plan=plan, context_parallel=False) * 1.5
        h.float().square().sum().backward()

    step(StepPlan(cu))  # warm-up: kernels compile, the layout caches fill
    torch.cuda.synchronize()
    plan = StepPlan(cu)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            step(plan)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [f"{w.filename}:{w.lineno}" for w in seen if "synchroniz" in str(w.message)]
    assert plan.host_syncs == 1 and len(syncs) == 1, syncs
    assert moba_dist.last_stats().selected_kernel == "triton"


def test_settings_are_read_once_per_plan(monkeypatch):
    pytest.importorskip("triton")
    from moba_dist import Settings

    cu = make_cu(LENGTHS)
    x, ((k, v),) = _weights(1)
    x, k, v = x.float(), k.float(), v.float()
    monkeypatch.setenv(SELECTED_ENV, "triton")
    plan = StepPlan(cu)
    monkeypatch.setenv(SELECTED_ENV, "varlen")  # too late for this plan: it read the environment
    moba_attn_varlen(x, k, v, cu, 51, CHUNK, TOPK, plan=plan)
    assert last_stats().selected_kernel == "triton"
    moba_attn_varlen(x, k, v, cu, 51, CHUNK, TOPK)  # no plan: the environment now
    assert last_stats().selected_kernel == "varlen"
    explicit = StepPlan(cu, settings=Settings(selected_kernel="triton", record_selection=True))
    moba_attn_varlen(x, k, v, cu, 51, CHUNK, TOPK, plan=explicit)
    stats = last_stats()
    assert stats.selected_kernel == "triton" and stats.selection is not None
    with pytest.raises(ValueError, match="selected_kernel"):
        Settings(selected_kernel="fast")
    with pytest.raises(TypeError, match="keep_fetched"):
        Settings(keep_fetched=1)
    monkeypatch.setenv("MOBA_DIST_GATE_BALANCE", "yes")
    with pytest.raises(ValueError, match="MOBA_DIST_GATE_BALANCE"):
        StepPlan(cu)


def _settings_mismatch_worker(rank, world):
    from moba_dist import Settings
    from moba_dist.parallel.handshake import RankMismatchError

    cu = make_cu(LENGTHS)
    total = int(cu[-1])
    a, b = rank * total // world, (rank + 1) * total // world
    x, ((k, v),) = _weights(1)
    plan = StepPlan(cu, context_parallel=True, settings=Settings(keep_fetched=rank == 1))
    with pytest.raises(RankMismatchError, match="keep_fetched"):
        moba_attn_varlen_cp(x[a:b], k[a:b], v[a:b], cu, CHUNK, TOPK, plan=plan)
    dist.barrier()


def test_ranks_must_agree_on_communicating_settings():
    run_distributed(_settings_mismatch_worker, 2)
