"""Cached generation with moba_dist.hf.MoBACache on tiny float64 Llamas (CPU): greedy and sampled
tokens and per-step logits against uncached decoding (the full training-path forward re-run at
every step, and a dense mask-based MoBA reference), left-padded batches against each prompt
alone, MoBA both sparse (prompt longer than topk x chunk) and not, and a hybrid schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig

import moba_dist.hf
import moba_dist.hf.attention as hf_attention
from moba_dist.hf import MoBACache
from moba_dist.reference import causal_attn_varlen_reference, moba_attn_varlen_reference

VOCAB, CHUNK, TOPK = 97, 8, 3  # MoBA is sparse beyond TOPK * CHUNK = 24 tokens
TOL = 1e-9


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _dense_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Uncached dense MoBA, one sequence per row, written from docs/semantics.md (no padding)."""
    assert attention_mask is None and key.shape[2] == query.shape[2]
    cfg = module.config
    s = query.shape[2]
    cu = torch.tensor([0, s], dtype=torch.int32)
    outs = []
    for row in range(query.shape[0]):
        q, k, v = (t[row].transpose(0, 1) for t in (query, key, value))
        if module.layer_idx in cfg.moba_full_attention_layers:
            outs.append(causal_attn_varlen_reference(q, k, v, cu, scaling))
        else:
            outs.append(moba_attn_varlen_reference(q, k, v, cu, cfg.moba_chunk_size, cfg.moba_topk, scaling))
    return torch.stack(outs), None


def make_model(full=(), seed=0, impl="moba_dist"):
    moba_dist.hf.register()
    AttentionInterface.register("moba_dense_reference", _dense_reference)
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, moba_chunk_size=CHUNK, moba_topk=TOPK,
                      moba_full_attention_layers=list(full), pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float64).eval()


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


@torch.no_grad()
def uncached_greedy(model, prompt, steps):
    """Tokens and last-position logits of greedy decoding that re-runs the whole forward (no
    cache, training path) at every step."""
    seq, logits = prompt[None], []
    for _ in range(steps):
        last = model(input_ids=seq, use_cache=False).logits[0, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax()[None, None]], 1)
    return seq[0, len(prompt):], torch.stack(logits)


@torch.no_grad()
def cached_greedy(model, ids, mask, steps, cache=None):
    """Greedy decoding through a MoBACache, inputs prepared as generate() does (positions from
    the left-padded mask, the mask grown by one column per step): tokens [B, steps] and logits
    [B, steps, V]."""
    cache = cache if cache is not None else MoBACache(model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache)
    tokens, logits = [], []
    for _ in range(steps):
        last = out.logits[:, -1]
        logits.append(last)
        tokens.append(last.argmax(-1))
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos, cache=cache)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("length", [13, 45], ids=["dense", "sparse"])
@pytest.mark.parametrize("full", [(), (1,)], ids=["moba", "hybrid"])
def test_greedy_matches_uncached_decoding(length, full):
    model = make_model(full)
    (prompt,) = prompts([length])
    steps = 20  # crosses at least two block boundaries
    want_tokens, want_logits = uncached_greedy(model, prompt, steps)
    # A small growth step: the cache is regrown (copied) every block.
    tokens, logits = cached_greedy(model, prompt[None], torch.ones(1, length, dtype=torch.long), steps,
                                   cache=MoBACache(model.config, grow_tokens=CHUNK))
    assert tokens[0].tolist() == want_tokens.tolist()
    assert (logits[0] - want_logits).abs().max().item() <= TOL
    gen = model.generate(prompt[None], cache=MoBACache(model.config), max_new_tokens=steps, do_sample=False)
    assert gen[0, length:].tolist() == want_tokens.tolist()


def test_cached_decoding_matches_the_dense_reference():
    """Against an independent uncached model whose attention is the dense mask-based MoBA."""
    model, ref = make_model(), make_model(impl="moba_dense_reference")
    (prompt,) = prompts([37])
    want_tokens, want_logits = uncached_greedy(ref, prompt, 16)
    tokens, logits = cached_greedy(model, prompt[None], torch.ones(1, 37, dtype=torch.long), 16)
    assert tokens[0].tolist() == want_tokens.tolist()
    assert (logits[0] - want_logits).abs().max().item() <= TOL
    # Sparsity is real here: full attention gives other logits at these lengths.
    dense = make_model(impl="sdpa")
    _, full_logits = uncached_greedy(dense, prompt, 16)
    assert (full_logits - want_logits).abs().max().item() > 1e-6


@pytest.mark.parametrize("full", [(), (0,)], ids=["moba", "hybrid"])
def test_left_padded_batch_matches_each_prompt_alone(full):
    model = make_model(full)
    rows = prompts([45, 13, 30, 1])
    ids, mask = left_pad(rows)
    steps = 12
    tokens, logits = cached_greedy(model, ids, mask, steps)
    gen = model.generate(ids, attention_mask=mask, cache=MoBACache(model.config), max_new_tokens=steps,
                         do_sample=False)
    for i, prompt in enumerate(rows):
        want_tokens, want_logits = uncached_greedy(model, prompt, steps)
        assert tokens[i].tolist() == want_tokens.tolist(), i
        assert (logits[i] - want_logits).abs().max().item() <= TOL, i
        assert gen[i, ids.shape[1]:].tolist() == want_tokens.tolist(), i


def test_float32_selects_the_same_blocks():
    """float32: block sums of float32 keys are exact in float64, so the gate sees the training
    means bitwise and the tokens agree; logits to float32 rounding."""
    model = make_model(full=(1,)).float()
    (prompt,) = prompts([45])
    want_tokens, want_logits = uncached_greedy(model, prompt, 16)
    tokens, logits = cached_greedy(model, prompt[None], torch.ones(1, 45, dtype=torch.long), 16)
    assert tokens[0].tolist() == want_tokens.tolist()
    assert (logits[0] - want_logits).abs().max().item() <= 1e-4


def test_padding_is_not_stored():
    model = make_model()
    rows = prompts([21, 9])
    ids, mask = left_pad(rows)
    cache = MoBACache(model.config)
    cached_greedy(model, ids, mask, 3, cache=cache)
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.seqlens.tolist() == [21 + 3, 9 + 3]  # prompt + the 3 tokens fed back in
        assert cache.get_seq_length(layer_idx) == 21 + 3  # HF's column count, padding included
        # Row 1's first 9 keys are its own prompt's: recompute them from a run of the prompt alone
        # (to rounding: the projections of a batch and of one row may be different GEMMs).
        alone = MoBACache(model.config)
        model(input_ids=rows[1][None], cache=alone)
        assert (layer.keys[1, :9] - alone.layers[layer_idx].keys[0, :9]).abs().max().item() <= 1e-12
        # Block sums are the float64 sums of the stored keys of every block so far.
        for j in range(24 // CHUNK):
            want = layer.keys[0, j * CHUNK:(j + 1) * CHUNK].sum(0)
            assert (layer.block_sums[0, j] - want).abs().max().item() <= 1e-12


def test_sampling_matches_uncached_sampling():
    model = make_model()
    kw = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=15)
    for i, prompt in enumerate(prompts([40, 11])):
        torch.manual_seed(100 + i)
        want = model.generate(prompt[None], use_cache=False, **kw)
        torch.manual_seed(100 + i)
        got = model.generate(prompt[None], cache=MoBACache(model.config), **kw)
        assert got.tolist() == want.tolist()


def test_sampled_left_padded_batch_matches_prompts_alone():
    """A seeded batched draw equals multinomial sampling from each prompt's own uncached logits
    (stacked, rounded to float32 as generate() does), with the same seed."""
    model = make_model()
    rows = prompts([33, 7, 26])
    ids, mask = left_pad(rows)
    steps = 10
    torch.manual_seed(7)
    got = model.generate(ids, attention_mask=mask, cache=MoBACache(model.config), do_sample=True, top_k=0,
                         top_p=1.0, temperature=1.0, max_new_tokens=steps)[:, ids.shape[1]:]
    torch.manual_seed(7)
    seqs = [r[None] for r in rows]
    with torch.no_grad():
        for _ in range(steps):
            logits = torch.cat([model(input_ids=s, use_cache=False).logits[:, -1] for s in seqs]).float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1)
            seqs = [torch.cat([s, nxt[i:i + 1]], 1) for i, s in enumerate(seqs)]
    for i, s in enumerate(seqs):
        assert got[i].tolist() == s[0, len(rows[i]):].tolist(), i


def test_several_tokens_into_a_filled_cache():
    """A forward of S > 1 tokens into a non-empty cache (a continued conversation) is exact."""
    model = make_model(full=(1,))
    (prompt,) = prompts([50])
    cache = MoBACache(model.config)
    with torch.no_grad():
        model(input_ids=prompt[None, :30], cache=cache)
        got = model(input_ids=prompt[None, 30:], cache=cache).logits
        want = model(input_ids=prompt[None], use_cache=False).logits[:, 30:]
    assert (got - want).abs().max().item() <= TOL


def test_dynamic_cache_is_refused_at_decode():
    model = make_model()
    (prompt,) = prompts([10])
    with pytest.raises(ValueError, match="MoBACache"):
        model.generate(prompt[None], cache=DynamicCache(config=model.config), max_new_tokens=2)


def test_training_path_reads_position_ids_once_per_forward(monkeypatch):
    """cu_seqlens come from position_ids on the host once per forward, not once per layer."""
    calls = []
    real = hf_attention.cu_seqlens_from_position_ids

    def counting(*args):
        calls.append(args[1:])
        return real(*args)

    monkeypatch.setattr(hf_attention, "cu_seqlens_from_position_ids", counting)
    model = make_model()
    ids = torch.randint(0, VOCAB, (1, 40))
    pos = torch.cat([torch.arange(25), torch.arange(15)])[None]
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert len(calls) == 1
        b = model(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
        assert len(calls) == 2  # a new tensor: read again
    assert torch.equal(a, b)
    pos[0, 25] = 3  # in place: one sequence now, so the memo must not be reused
    with torch.no_grad():
        c = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert len(calls) == 3 and not torch.equal(a, c)


def test_beam_search_and_several_samples_per_prompt():
    """Beam search reorders the cache rows (reorder_cache); num_return_sequences repeats them."""
    model = make_model()
    (prompt,) = prompts([30])
    kw = dict(num_beams=3, max_new_tokens=8, do_sample=False)
    want = model.generate(prompt[None], use_cache=False, **kw)
    assert model.generate(prompt[None], cache=MoBACache(model.config), **kw).equal(want)
    kw = dict(num_return_sequences=3, max_new_tokens=8, do_sample=True, top_k=0)
    torch.manual_seed(1)
    want = model.generate(prompt[None], use_cache=False, **kw)
    torch.manual_seed(1)
    assert model.generate(prompt[None], cache=MoBACache(model.config), **kw).equal(want)


def test_chunked_prefill_and_inference_mode():
    """generate(prefill_chunk_size=...) (the later chunks enter a filled cache) and
    torch.inference_mode give the uncached tokens; nothing is recorded for backward."""
    model = make_model()
    (prompt,) = prompts([50])
    want = model.generate(prompt[None], use_cache=False, max_new_tokens=8, do_sample=False)
    got = model.generate(prompt[None], cache=MoBACache(model.config), prefill_chunk_size=16, max_new_tokens=8,
                         do_sample=False)
    assert got.equal(want)
    with torch.inference_mode():
        assert model.generate(prompt[None], cache=MoBACache(model.config), max_new_tokens=8,
                              do_sample=False).equal(want)
    with torch.no_grad():
        out = model(input_ids=prompt[None], cache=MoBACache(model.config))
    assert out.logits.grad_fn is None


def test_cache_kwargs_follows_the_forward_signature():
    """``cache=`` where the installed transformers' forward takes it, else ``past_key_values=``
    (an older release would pass ``cache=`` on unused and decode without context)."""
    model = make_model()
    cache = MoBACache(model.config)
    import inspect

    want = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert moba_dist.hf.cache_kwargs(model, cache) == {want: cache}

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            return input_ids

    assert moba_dist.hf.cache_kwargs(Old(), cache) == {"past_key_values": cache}


def test_cache_keyword_passed_on_unused_is_refused():
    """What an older transformers does with ``cache=``: it reaches the attention function in
    ``**kwargs`` with keys that no cache has seen; that must raise, not decode without context."""
    model = make_model()
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16, dtype=torch.float64)
    kv = torch.randn(1, 2, 3, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="past_key_values"):
        hf_attention.moba_dist_attention(attn, q, kv, kv, None, cache=MoBACache(model.config))
