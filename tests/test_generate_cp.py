"""Generation from a MoBACache sharded over a context-parallel group (gloo, CPU, float64): the
prompt is prefilled under ``context_parallel`` from ``cp.shard`` (slices cut inside blocks and
across rows), then ``generate()`` decodes on every rank; tokens and per-step logits must equal
one process generating from an unsharded MoBACache."""

from __future__ import annotations

import torch
from dist_utils import run_distributed

import moba_dist.hf
from moba_dist.hf import MoBACache, cache_kwargs

VOCAB, CHUNK, TOPK, STEPS = 97, 8, 3, 10  # MoBA is sparse beyond 24 tokens
TOL = 1e-9

# (rows, prompt length, full-attention layers, sample)
CASES = [
    (1, 50, (), False),
    (2, 40, (1,), False),
    (2, 33, (), True),
]


def make_model(full):
    from transformers import AutoModelForCausalLM, LlamaConfig

    moba_dist.hf.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      num_hidden_layers=2, vocab_size=VOCAB, moba_chunk_size=CHUNK, moba_topk=TOPK,
                      moba_full_attention_layers=list(full), pad_token_id=0, bos_token_id=None,
                      eos_token_id=None)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist", dtype=torch.float64).eval()


def generate(model, prompt, cache, sample):
    kw = dict(max_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True)
    kw.update(do_sample=True, top_k=0) if sample else kw.update(do_sample=False)
    torch.manual_seed(1)  # the same on every rank: sampling draws the same tokens
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw, **cache_kwargs(model, cache))
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits, 1)


@torch.no_grad()
def check(rank, world):
    for rows, length, full, sample in CASES:
        model = make_model(full)
        g = torch.Generator().manual_seed(length)
        prompt = torch.randint(1, VOCAB, (rows, length), generator=g)
        want_tokens, want_logits = generate(model, prompt, MoBACache(model.config), sample)
        cache = MoBACache(model.config, grow_tokens=CHUNK)
        with moba_dist.hf.context_parallel() as cp:
            # All but the last prompt token: generate() runs that one as its first decode step,
            # and then holds its logits on every rank.
            model(**cp.shard(prompt[:, :-1]), **cache_kwargs(model, cache))
            stored = sum(int(layer.seqlens.sum()) for layer in cache.layers)
            assert stored < len(cache.layers) * rows * (length - 1)  # sharded, not replicated
            tokens, logits = generate(model, prompt, cache, sample)
        assert tokens.tolist() == want_tokens.tolist(), (rank, rows, length, tokens, want_tokens)
        err = (logits - want_logits).abs().max().item()
        assert err <= TOL, (rank, rows, length, err)


def test_generate_from_a_cache_sharded_over_2_ranks():
    run_distributed(check, 2)


def test_generate_from_a_cache_sharded_over_3_ranks():
    run_distributed(check, 3)
