"""HF transformers integration: a tiny float64 Llama with attn_implementation="moba_dist" against
SDPA and against a model whose attention is the dense MoBA reference; context parallel on 2 and 3
gloo ranks (loss and gradients summed over ranks vs one process, with and without activation
checkpointing, on a CP sub-group under DDP and FSDP2); cp.shard against hand computations."""

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
from transformers.masking_utils import AttentionMaskInterface

import moba_dist.hf
from moba_dist.hf.packing import shard_batch
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference

VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny float64 models: intra-op threads only contend with the other xdist worker's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         position_ids=None, **kwargs):
    """Dense MoBA per row, written from the conventions: a sequence starts at a row's first token
    and where position_ids is 0."""
    assert attention_mask is None and dropout == 0.0
    b, _, s, _ = query.shape
    cfg = module.config
    outs = []
    for row in range(b):
        pos = list(range(s)) if position_ids is None else position_ids[row % position_ids.shape[0]].tolist()
        cu = torch.tensor([i for i, p in enumerate(pos) if i == 0 or p == 0] + [s], dtype=torch.int32)
        q, k, v = (t[row].transpose(0, 1) for t in (query, key, value))
        if module.layer_idx in cfg.moba_full_attention_layers:
            outs.append(causal_attn_varlen_reference(q, k, v, cu, scaling))
        else:
            outs.append(moba_attn_varlen_reference(q, k, v, cu, cfg.moba_chunk_size, cfg.moba_topk, scaling))
    return torch.stack(outs), None


def _register():
    moba_dist.hf.register()
    AttentionInterface.register("moba_reference", _reference_attention)


def make_model(impl, chunk=4, topk=2, full=(), seed=0, **extra):
    _register()
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, use_cache=False, moba_chunk_size=chunk,
                      moba_topk=topk, moba_full_attention_layers=list(full), **extra)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float64)


def packed(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    return ids, pos


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_grads_close(got, want, rel, what):
    for name, g in want.items():
        err = (got[name] - g).abs().max().item()
        scale = g.abs().max().item()
        assert err <= rel * max(scale, 1e-30), f"{what}: {name} error {err} (scale {scale})"


def run_pair(a, b, **inputs):
    """Logits and parameter gradients of two models on the same inputs (loss: sum of logits x a
    fixed random projection, to stay in float64)."""
    out = []
    for model in (a, b):
        model.zero_grad()
        logits = model(**inputs).logits
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9), dtype=logits.dtype)
        (logits * w).sum().backward()
        out.append((logits.detach(), grads(model)))
    return out


@pytest.mark.parametrize("batch", ["packed", "rows"])
def test_equals_sdpa_when_topk_covers_the_sequence(batch):
    ids, pos = packed([20, 25])
    inputs = dict(input_ids=ids, position_ids=pos) if batch == "packed" else dict(input_ids=ids.view(3, 15))
    moba = make_model("moba_dist", chunk=4, topk=7, full=[1])  # 4 * 7 >= 25: every block selected
    (la, ga), (lb, gb) = run_pair(make_model("sdpa"), moba, **inputs)
    assert (la - lb).abs().max().item() <= 1e-10
    assert_grads_close(gb, ga, 1e-10, "vs sdpa")


@pytest.mark.parametrize("batch", ["packed", "rows"])
def test_equals_the_dense_reference_when_sparse(batch):
    ids, pos = packed([21, 32, 11])
    if batch == "packed":
        inputs = dict(input_ids=ids, position_ids=pos)
    else:  # rows, each with two packed sequences (positions shared by the rows as [1, S])
        inputs = dict(input_ids=ids[:, :64].view(2, 32), position_ids=torch.cat([torch.arange(13),
                                                                                 torch.arange(19)])[None])
    ref = make_model("moba_reference", chunk=4, topk=2, full=[1])
    moba = make_model("moba_dist", chunk=4, topk=2, full=[1])
    (la, ga), (lb, gb) = run_pair(ref, moba, **inputs)
    assert (la - lb).abs().max().item() <= 1e-10
    assert_grads_close(gb, ga, 1e-10, "vs reference")
    # The schedule matters: MoBA on layer 1 as well gives different logits.
    all_moba = make_model("moba_dist", chunk=4, topk=2)(**inputs).logits
    assert (all_moba - lb).abs().max().item() > 1e-6


def test_shift_labels_single_process_matches_hf_on_rows():
    """On rows without packing, packed shift_labels is HF's own shift."""
    ids, _ = packed([40])
    ids = ids.view(2, 20)
    model = make_model("moba_dist")
    plain = model(input_ids=ids, labels=ids).loss
    ours = model(input_ids=ids, labels=ids, shift_labels=moba_dist.hf.shift_labels(ids)).loss
    assert plain.item() == ours.item()


def test_flattening_collator_kwargs():
    """cu_seq_lens_q/k (HF's DataCollatorWithFlattening) give the same packing as position_ids."""
    ids, pos = packed([21, 32, 11])
    model = make_model("moba_dist")
    want = model(input_ids=ids, position_ids=pos).logits
    cu = torch.tensor([0, 21, 53, 64], dtype=torch.int32)
    got = model(input_ids=ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=32,
                max_length_k=32).logits
    assert got.equal(want)


def test_errors_name_the_problem():
    model = make_model("moba_dist")
    ids, pos = packed([10, 6])
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids=ids, attention_mask=mask)
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # no padding: fine
    dropout = make_model("moba_dist", attention_dropout=0.1).train()
    with pytest.raises(ValueError, match="dropout"):
        dropout(input_ids=ids, position_ids=pos)
    dropout.eval()(input_ids=ids, position_ids=pos)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=1, vocab_size=VOCAB)
    bare = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist", dtype=torch.float64)
    with pytest.raises(ValueError, match="moba_chunk_size"):
        bare(input_ids=ids)
    with pytest.raises(ValueError, match="topk"):
        make_model("moba_dist", topk=0)(input_ids=ids)
    with pytest.raises(RuntimeError, match="process group"):
        with moba_dist.hf.context_parallel():
            pass
    assert "moba_dist" in AttentionMaskInterface._global_mapping


def test_cu_seqlens_and_shift_labels_by_hand():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu = moba_dist.hf.cu_seqlens_from_position_ids(pos, 1, 9)
    assert cu.tolist() == [0, 3, 5, 9] and cu.dtype == torch.int32
    # Two rows sharing [1, S] positions; the second row also starts a sequence at its first token.
    shared = torch.tensor([[3, 4, 0]])
    assert moba_dist.hf.cu_seqlens_from_position_ids(shared, 2, 3).tolist() == [0, 2, 3, 5, 6]
    assert moba_dist.hf.cu_seqlens_from_position_ids(None, 3, 4).tolist() == [0, 4, 8, 12]
    labels = torch.tensor([[10, 11, 12, 13, -100, 15, 16, 17, 18]])
    want = [[11, 12, -100, -100, -100, 16, 17, 18, -100]]
    assert moba_dist.hf.shift_labels(labels, pos).tolist() == want
    assert moba_dist.hf.shift_labels(labels.view(3, 3)).tolist() == [[11, 12, -100], [-100, 15, -100],
                                                                      [17, 18, -100]]
    assert moba_dist.hf.slice_offsets(10, 3) == [0, 4, 7, 10]
    assert moba_dist.hf.slice_offsets(9, 3) == [0, 3, 6, 9]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_by_hand(world):
    # 10 tokens: sequences [0, 4) and [4, 10); world 2 cuts exactly at 5, world 3 at 4 (a
    # sequence end) and 7, world 4 at 3, 6, 8.
    ids = torch.arange(100, 110)[None]
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    labels = ids.clone()
    labels[0, 6] = -100
    full_shift = [101, 102, 103, -100, 105, -100, 107, 108, 109, -100]
    bounds = moba_dist.hf.slice_offsets(10, world)
    parts = []
    for rank in range(world):
        out, cu, sl = shard_batch(ids, pos, labels, rank, world)
        assert cu.tolist() == [0, 4, 10]
        assert (sl.start, sl.stop) == (bounds[rank], bounds[rank + 1])
        assert out["num_items_in_batch"].item() == 7
        for key in ("input_ids", "position_ids", "labels", "shift_labels"):
            assert out[key].shape == (1, sl.stop - sl.start), key
        parts.append(out)
    keys = ("input_ids", "position_ids", "labels", "shift_labels")
    cat = {k: torch.cat([p[k] for p in parts], 1) for k in keys}
    assert cat["input_ids"].equal(ids) and cat["position_ids"].equal(pos) and cat["labels"].equal(labels)
    assert cat["shift_labels"].tolist() == [full_shift]


def test_shard_rows_and_errors():
    ids = torch.arange(12).view(2, 6)
    out, cu, sl = shard_batch(ids, None, ids, 1, 2)
    assert cu.tolist() == [0, 6, 12] and (sl.start, sl.stop) == (6, 12)
    assert out["position_ids"].tolist() == [list(range(6))]
    assert out["shift_labels"].tolist() == [[7, 8, 9, 10, 11, -100]]
    assert out["num_items_in_batch"].item() == 10
    with pytest.raises(ValueError, match="input_ids"):
        shard_batch(torch.arange(2)[None], None, None, 0, 3)
    with pytest.raises(ValueError, match="labels"):
        shard_batch(ids, None, ids[:, :5], 0, 2)
    with pytest.raises(ValueError, match="position_ids"):
        shard_batch(ids, torch.arange(5)[None], None, 0, 2)


# Packed streams for the CP runs (chunk 4, topk 2, 53 tokens). 2 ranks cut at 27: inside block 1
# of sequence 2, then at a sequence end. 3 ranks cut at 18 and 36: inside blocks, then at a
# sequence end and a block start.
CP_CASES = {2: [[21, 32], [27, 26]], 3: [[21, 32], [18, 10, 25]]}


def _cp_step(model, inputs, scale=1.0):
    model.zero_grad()
    loss = model(**inputs).loss
    (loss * scale).backward()
    return loss.detach()


def _sum_over(group, t):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _close(got, want, tag):
    err = abs(got.item() - want.item())
    assert err <= 1e-6 * abs(want.item()), f"{tag}: loss {got.item()} vs {want.item()}"


def check_cp_case(lengths, group, tag):
    """Loss and parameter gradients summed over ``group`` equal the one-process reference model's,
    without and with activation checkpointing."""
    ids, pos = packed(lengths, seed=sum(lengths))
    labels = ids.clone()
    labels[0, 5] = -100
    ref = make_model("moba_reference", full=[1])
    want_loss = ref(input_ids=ids, position_ids=pos, labels=labels,
                    shift_labels=moba_dist.hf.shift_labels(labels, pos)).loss
    want_loss.backward()
    model = make_model("moba_dist", full=[1])
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
            model.train()
        with moba_dist.hf.context_parallel(group) as cp:
            loss = _cp_step(model, cp.shard(ids, position_ids=pos, labels=labels))
        what = f"{tag} lengths {lengths} checkpointing={checkpointing}"
        _close(_sum_over(group, loss), want_loss, what)
        got = {n: _sum_over(group, g) for n, g in grads(model).items()}
        assert_grads_close(got, grads(ref), 1e-8, what)


def cp_worker(rank, world):
    """Three ranks over the default group, then two over the sub-group {0, 2} (global rank 2 is
    its rank 1; rank 1 idles, so anything touching the default group there would hang)."""
    _register()
    with moba_dist.hf.context_parallel() as cp:
        with pytest.raises(ValueError, match="shard"):
            make_model("moba_dist")(input_ids=torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="batch"):
            cp.shard(torch.zeros(2, 4, dtype=torch.long))
            make_model("moba_dist")(input_ids=torch.zeros(2, 4, dtype=torch.long))
    for lengths in CP_CASES[3]:
        check_cp_case(lengths, None, f"rank {rank} of 3")

    # A [B, S] batch flattens into rows; its loss is HF's plain per-row loss.
    ids, _ = packed([40], seed=3)
    ids = ids.view(2, 20)
    want_loss = make_model("moba_reference", full=[1])(input_ids=ids, labels=ids).loss
    with moba_dist.hf.context_parallel() as cp:
        loss = _cp_step(make_model("moba_dist", full=[1]), cp.shard(ids, labels=ids))
    _close(_sum_over(None, loss), want_loss, "rows")

    group = dist.new_group([0, 2])
    if rank == 1:
        return
    for lengths in CP_CASES[2]:
        check_cp_case(lengths, group, f"rank {rank} (sub-group rank {rank // 2}) of 2")
    subgroup_wrappers(rank, group)


def subgroup_wrappers(rank, group):
    """The model under DDP, then under FSDP2, over the CP sub-group, with activation checkpointing:
    both average gradients over their group, so backward ``loss * cp.size``."""
    ids, pos = packed([30, 23], seed=7)
    ref = make_model("moba_reference", full=[1])
    want_loss = ref(input_ids=ids, position_ids=pos, labels=ids,
                    shift_labels=moba_dist.hf.shift_labels(ids, pos)).loss
    want_loss.backward()
    want = grads(ref)
    for wrapper in ("DDP", "FSDP2"):
        model = make_model("moba_dist", full=[1])
        model.activation_checkpointing_enable()
        model.train()
        if wrapper == "DDP":
            wrapped = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
        else:
            mesh = DeviceMesh.from_group(group, "cpu")
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        with moba_dist.hf.context_parallel(group) as cp:
            assert (cp.rank, cp.size) == (rank // 2, 2)
            loss = _cp_step(wrapped, cp.shard(ids, position_ids=pos, labels=ids), scale=cp.size)
        _close(_sum_over(group, loss), want_loss, f"rank {rank} {wrapper}")
        got = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads(model).items()}
        assert_grads_close(got, want, 1e-8, f"rank {rank} {wrapper} over a CP sub-group")


def test_context_parallel_on_3_ranks_and_a_2_rank_subgroup():
    run_distributed(cp_worker, 3)
