"""torch.compile through moba_dist: no graph break on one device (the custom operators of
moba_dist/ops.py), compiled results equal to eager and to the dense reference in outputs and
gradients (aot_eager and inductor), ``torch.library.opcheck`` of the operators, a compiled HF
Llama decoder layer and model, and context parallel under compile (one graph break per call)."""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from torch._dynamo.backends.debugging import aot_eager

import moba_dist
from moba_dist.module import layer_attention
from moba_dist.ops import moba_bwd, moba_fwd
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference

HQ, HKV, D = 4, 2, 8
LENGTHS = [37, 0, 63, 31]  # several packed sequences, one of them empty; longest 63
CU = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
MAX_SEQLEN = 63
SPARSE = (8, 3)  # chunk, topk: 24 < 63, MoBA proper
FULL = (32, 2)  # 64 >= 63: every past block is selected, full causal attention


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: threads only contend with the other xdist worker
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


def qkv(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = int(CU[-1])
    return [torch.randn(total, h, D, dtype=dtype, generator=g).requires_grad_() for h in (HQ, HKV, HKV)]


def attn(chunk, topk):
    def fn(q, k, v):
        return moba_dist.moba_attn_varlen(q, k, v, CU, MAX_SEQLEN, chunk, topk)
    return fn


def out_and_grads(fn, q, k, v, seed=5):
    """``fn``'s output and the gradients of ``<out, w>`` for a fixed random ``w``."""
    out = fn(q, k, v)
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    w = w.to(out.dtype)
    return (out.detach(), *torch.autograd.grad((out * w).sum(), (q, k, v)))


def reference(chunk, topk):
    def fn(q, k, v):
        if topk * chunk >= MAX_SEQLEN:  # the reference of what this case is: causal attention
            return causal_attn_varlen_reference(q, k, v, CU)
        return moba_attn_varlen_reference(q, k, v, CU, chunk, topk)
    return fn


def has_op(graphs, op) -> bool:
    return any(n.op == "call_function" and n.target is op for g in graphs for n in g.graph.nodes)


@pytest.mark.parametrize("case", [SPARSE, FULL], ids=["moba", "full"])
def test_no_graph_break(case):
    def fn(q, k, v):
        out = moba_dist.moba_attn_varlen(q * 2, k, v, CU, MAX_SEQLEN, *case)
        return out.sum(-1)
    ex = torch._dynamo.explain(fn)(*qkv())
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    assert has_op(ex.graphs, torch.ops.moba_dist.moba_fwd.default)


@pytest.mark.parametrize("case", [SPARSE, FULL], ids=["moba", "full"])
def test_aot_eager_equals_eager_and_reference(case):
    q, k, v = qkv()
    compiled = out_and_grads(torch.compile(attn(*case), fullgraph=True, backend="aot_eager"), q, k, v)
    assert moba_dist.last_stats().path == ("full" if case == FULL else "moba")  # recorded inside the op
    eager = out_and_grads(attn(*case), q, k, v)
    ref = out_and_grads(reference(*case), q, k, v)
    for name, c, e, r in zip(("out", "dq", "dk", "dv"), compiled, eager, ref):
        assert torch.equal(c, e), name  # the same kernels and the same plan: bitwise
        assert (c - r).abs().max().item() <= 1e-10, name


def test_new_shapes_recompile_dynamic():
    """Other token counts, sequence counts and max_seqlen: dynamic shapes through the fake
    implementations (one recompile, no graph break), still equal to the reference."""
    compiled = torch.compile(lambda q, k, v, cu, m: moba_dist.moba_attn_varlen(q, k, v, cu, m, *SPARSE),
                             fullgraph=True, backend="aot_eager")
    for lengths in ([37, 63], [50, 0, 81], [70, 5, 16, 9]):
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        g = torch.Generator().manual_seed(len(lengths))
        q, k, v = (torch.randn(int(cu[-1]), h, D, dtype=torch.float64, generator=g).requires_grad_()
                   for h in (HQ, HKV, HKV))
        longest = max(lengths)
        got = out_and_grads(lambda q, k, v, cu=cu, m=longest: compiled(q, k, v, cu, m), q, k, v)
        ref = out_and_grads(lambda q, k, v, cu=cu: moba_attn_varlen_reference(q, k, v, cu, *SPARSE), q, k, v)
        for name, c, r in zip(("out", "dq", "dk", "dv"), got, ref):
            assert (c - r).abs().max().item() <= 1e-10, (lengths, name)


def test_inductor_equals_eager_and_reference():
    """One graph with both paths and pointwise work around them (generated kernels that read
    and write the operators' outputs), float32."""
    def fn(q, k, v):
        return attn(*SPARSE)(q * 1.5, k, v) * 2 + attn(*FULL)(q, k, v)

    def ref_fn(q, k, v):
        return reference(*SPARSE)(q * 1.5, k, v) * 2 + reference(*FULL)(q, k, v)

    q, k, v = qkv(torch.float32)
    compiled = out_and_grads(torch.compile(fn, fullgraph=True, backend="inductor"), q, k, v)
    eager = out_and_grads(fn, q, k, v)
    ref = out_and_grads(ref_fn, *(t.detach().double().requires_grad_() for t in (q, k, v)))
    for name, c, e, r in zip(("out", "dq", "dk", "dv"), compiled, eager, ref):
        scale = max(1.0, r.abs().max().item())
        assert (c - e).abs().max().item() <= 1e-5 * scale, name
        assert (c.double() - r).abs().max().item() <= 1e-5 * scale, name


def test_errors_raise_under_compile():
    """The checks that read cu_seqlens run inside the operator, and still raise ValueError."""
    q, k, v = qkv()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def call(q, k, v, cu, max_seqlen):
        return moba_dist.moba_attn_varlen(q, k, v, cu, max_seqlen, *SPARSE)

    with pytest.raises(ValueError, match="max_seqlen"):
        call(q, k, v, CU, 40)
    bad = CU.clone()
    bad[-1] = 130
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]"):
        call(q, k, v, bad, MAX_SEQLEN)
    with pytest.raises(ValueError, match="moba_topk"):
        torch.compile(lambda q, k, v: moba_dist.moba_attn_varlen(q, k, v, CU, 63, 8, 0),
                      backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("case", [SPARSE, FULL], ids=["moba", "full"])
def test_opcheck(case):
    q, k, v = qkv()
    scale = D ** -0.5
    torch.library.opcheck(moba_fwd, (q, k, v, CU, *case, scale))
    out, lse, sel = moba_fwd(q.detach(), k.detach(), v.detach(), CU, *case, scale)
    assert sel.shape == (q.shape[0], HQ, case[1] - 1) and sel.dtype == torch.int32
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out, lse, sel, CU, *case, scale)
    torch.library.opcheck(moba_bwd, args)


def test_module_and_schedule_no_graph_break():
    """MoBAAttention and layer_attention (a MoBA and a full layer of one schedule) in one graph."""
    cfg = moba_dist.MoBAConfig(chunk_size=8, topk=2, full_attention_layers=(1,))
    mod = moba_dist.MoBAAttention(cfg, layer_idx=0)
    q, k, v = qkv()

    def fn(q, k, v):
        x = mod(q, k, v, CU)
        return layer_attention(cfg, 1, x, k, v, CU, context_parallel=False)

    ex = torch._dynamo.explain(fn)(q, k, v)
    assert ex.graph_break_count == 0, ex.break_reasons
    compiled = out_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), q, k, v)
    eager = out_and_grads(fn, q, k, v)

    def ref_fn(q, k, v):
        return causal_attn_varlen_reference(moba_attn_varlen_reference(q, k, v, CU, 8, 2), k, v, CU)

    ref = out_and_grads(ref_fn, q, k, v)
    for name, c, e, r in zip(("out", "dq", "dk", "dv"), compiled, eager, ref):
        assert torch.equal(c, e), name
        assert (c - r).abs().max().item() <= 1e-10, name


# ----------------------------------------------------------------------------------------------
# HF transformers

VOCAB = 64


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         position_ids=None, **kwargs):
    """Dense MoBA per row (positions restarting at 0 start a sequence), straight from the
    reference."""
    b, _, s, _ = query.shape
    cfg = module.config
    outs = []
    for row in range(b):
        pos = position_ids[row % position_ids.shape[0]].tolist()
        cu = torch.tensor([i for i, p in enumerate(pos) if i == 0 or p == 0] + [s], dtype=torch.int32)
        q, k, v = (t[row].transpose(0, 1) for t in (query, key, value))
        if module.layer_idx in cfg.moba_full_attention_layers:
            outs.append(causal_attn_varlen_reference(q, k, v, cu, scaling))
        else:
            outs.append(moba_attn_varlen_reference(q, k, v, cu, cfg.moba_chunk_size, cfg.moba_topk, scaling))
    return torch.stack(outs), None


def make_model(impl):
    pytest.importorskip("transformers")
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig

    import moba_dist.hf

    moba_dist.hf.register()
    AttentionInterface.register("moba_compile_reference", _reference_attention)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, use_cache=False, moba_chunk_size=4,
                      moba_topk=2, moba_full_attention_layers=[1])
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float64)


def batch():
    """Two rows of 40 tokens, each with packed sequences of 15 and 25 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 40), generator=g)
    pos = torch.cat([torch.arange(15), torch.arange(25)])[None]
    return ids, pos


def loss_and_grads(model, fn, *args):
    model.zero_grad()
    loss = fn(*args)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol):
    (la, ga), (lb, gb) = a, b
    assert (la - lb).abs().max().item() <= tol
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert (ga[name] - gb[name]).abs().max().item() <= tol, name


def test_padded_cu_seqlens_from_position_ids():
    """The fixed-size device version is the host one followed by repeats of the total."""
    from moba_dist.hf.packing import cu_seqlens_from_position_ids, cu_seqlens_padded

    g = torch.Generator().manual_seed(3)
    rows = torch.stack([torch.cat([torch.arange(n) for n in lengths])
                        for lengths in ([5, 9, 2], [16], [3, 3, 3, 7])])  # [3, 16], per-row positions
    no_zero = torch.randint(1, 4, (2, 16), generator=g)  # no restart: one sequence per row
    for pos, batch in ((rows, 3), (rows[2:], 3), (None, 3), (no_zero, 2)):
        want = cu_seqlens_from_position_ids(pos, batch, 16)
        got = cu_seqlens_padded(pos, batch, 16)
        assert got.dtype == torch.int32
        if pos is None:
            assert torch.equal(got, want)
            continue
        assert got.shape == (batch * 16 + 1,)
        assert torch.equal(got[:want.numel()], want) and bool((got[want.numel():] == batch * 16).all())


def test_hf_model_compiles_fullgraph():
    model, ref = make_model("moba_dist"), make_model("moba_compile_reference")
    ids, pos = batch()
    mask = torch.ones_like(ids)

    def loss(model):
        return lambda ids, pos, mask: model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                            labels=ids).loss

    compiled = torch.compile(loss(model), fullgraph=True, backend="aot_eager")  # fails on any break
    got = loss_and_grads(model, compiled, ids, pos, mask)
    assert_same(got, loss_and_grads(model, loss(model), ids, pos, mask), 1e-12)
    assert_same(got, loss_and_grads(ref, loss(ref), ids, pos, mask), 1e-10)
    mask[1, :3] = 0  # padding: refused inside the attention operator, as in eager
    with pytest.raises(ValueError, match="padding"):
        compiled(ids, pos, mask)


def test_hf_decoder_layer_compiles_fullgraph():
    model, ref = make_model("moba_dist"), make_model("moba_compile_reference")
    ids, pos = batch()
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 40, 32, dtype=torch.float64, generator=g)

    def run(model):
        layer, rope = model.model.layers[0], model.model.rotary_emb

        def fn(hidden, pos):
            return layer(hidden, position_ids=pos, position_embeddings=rope(hidden, pos)).square().mean()
        return fn

    compiled = torch.compile(run(model), fullgraph=True, backend="aot_eager")
    got = loss_and_grads(model, compiled, hidden, pos)
    assert_same(got, loss_and_grads(model, run(model), hidden, pos), 1e-12)
    assert_same(got, loss_and_grads(ref, run(ref), hidden, pos), 1e-10)


# ----------------------------------------------------------------------------------------------
# Context parallel: eagerly, outside the graph


def _cp_body(rank, world):
    cfg = moba_dist.MoBAConfig(chunk_size=8, topk=2, full_attention_layers=(1,))
    q, k, v = (t.detach() for t in qkv())
    total = q.shape[0]
    lo, hi = rank * total // world, (rank + 1) * total // world
    local = [t[lo:hi].clone().requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):
        x = layer_attention(cfg, 0, q * 2, k, v, CU, context_parallel=True)
        return layer_attention(cfg, 1, x, k, v, CU, context_parallel=True) * 3

    graphs = []

    def backend(gm, example_inputs):  # aot_eager, counting the graphs it is handed
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = out_and_grads(torch.compile(fn, backend=backend), *local)
    assert len(graphs) == 3  # q * 2 | CP layer 0 | CP layer 1 | * 3: one break per call
    assert not any(has_op([g], torch.ops.moba_dist.moba_fwd.default) for g in graphs)
    eager = out_and_grads(fn, *local)
    for name, c, e in zip(("out", "dq", "dk", "dv"), compiled, eager):
        assert torch.equal(c, e), name


def test_context_parallel_breaks_once_per_call():
    run_distributed(_cp_body, 2)


def test_training_op_plans_with_the_training_budget(monkeypatch):
    """Inside a custom operator no input requires gradients, so the op cannot tell a training
    call from prefill by itself: the compiled training forward and its backward must plan with
    the training workspace budget (the eager training call's), not prefill's quarter of it."""
    import moba_dist.parallel.moba_cp as moba_cp
    from moba_dist.ops import moba_attention

    budgets = []
    real = moba_cp.row_window

    def row_window(budget, *args, **kwargs):
        budgets.append(budget)
        return real(budget, *args, **kwargs)

    monkeypatch.setattr(moba_cp, "row_window", row_window)
    monkeypatch.setattr(moba_cp, "workspace_bytes", lambda q, k, v: 1 << 24)  # above 4 x MIN_WORKSPACE
    q, k, v = qkv()
    scale = D ** -0.5

    moba_dist.moba_attn_varlen(q, k, v, CU, MAX_SEQLEN, *SPARSE).sum().backward()  # eager training
    eager = budgets[:]
    budgets.clear()
    moba_attention(q, k, v, CU, *SPARSE, scale).sum().backward()  # the op: forward, then backward
    op = budgets[:]
    budgets.clear()
    with torch.no_grad():
        moba_attention(q, k, v, CU, *SPARSE, scale)
    prefill = budgets[:]
    assert eager and set(eager) == {1 << 24}
    assert op == [1 << 24, 1 << 24]
    assert prefill == [1 << 22]
