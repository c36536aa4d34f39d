"""HF transformers (5.x) integration: ``attn_implementation="moba_dist"`` and context-parallel
sharding of a batch with its loss.

    import moba_dist.hf
    moba_dist.hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="moba_dist")
    loss = model(input_ids=ids, position_ids=pos, labels=ids).loss        # one process

    with moba_dist.hf.context_parallel(group=cp_group) as cp:           # under torchrun
        inputs = cp.shard(ids, position_ids=pos, labels=ids)
        loss = model(**inputs).loss        # this rank's share of the global mean loss
        loss.backward()                    # parameter grads: sum them over cp_group

Generation (one process): pass the cache explicitly, ``generate()`` would build a DynamicCache::

    out = model.generate(ids, attention_mask=mask, max_new_tokens=32,
                         **moba_dist.hf.cache_kwargs(model, moba_dist.hf.MoBACache(model.config)))

(:func:`cache_kwargs` names the argument as the installed transformers does: ``cache=`` from 5.2x,
``past_key_values=`` before; an older transformers would take ``cache=`` silently into its
``**kwargs`` and decode without context.)

:class:`MoBACache` stores each row's real tokens (left padding is neither stored nor
attended) and the float64 block key sums of the MoBA layers; prefill runs ``moba_attn_varlen``
over the unpadded rows, each decode step is exactly row ``t`` of the training-time MoBA (see
``moba_dist/hf/cache.py``).

The model config carries the MoBA settings (:func:`moba_config`): ``moba_chunk_size``,
``moba_topk``, optional ``moba_full_attention_layers`` / ``moba_all_full``.

Loss: the one-process equal of the sharded loss passes
``shift_labels=moba_dist.hf.shift_labels(ids, pos)`` (no token learns to predict the next packed
sequence's first token). Gradients: the per-rank losses *sum* to the global mean, so parameter
gradients must be *summed* over the CP group. DDP and FSDP2 *average* over the group they reduce
over: backward ``loss * cp.size`` under them, so that over a CP group their average is the sum,
and over a flattened data x context group it is the mean over data-parallel replicas of the sums
over CP ranks. (With FSDP2, ``set_gradient_divide_factor`` on every ``fully_shard``-ed module is
the alternative.) Pass the CP sub-group as ``group``; nothing here uses the default group then.

Supported inside ``context_parallel``: token ids through :meth:`ContextParallel.shard` (a
``[B, S]`` batch becomes one packed row), causal decoder attention without padding masks,
attention dropout, sliding windows or caches other than MoBACache; at least one token per rank.
A MoBACache prefilled there from ``cp.shard`` stays sharded as the slices were, and
``generate()`` inside the block decodes over the group (README, "Generation";
``moba_dist/parallel/decode_cp.py``).

Importing this package does not import transformers; :func:`register` does.
"""

from __future__ import annotations

from .attention import PaddingMask, moba_config, moba_dist_attention, padding_free_mask
from .context import ContextParallel, active_context, context_parallel
from .packing import cu_seqlens_from_position_ids, shift_labels, slice_offsets

ATTN_IMPLEMENTATION = "moba_dist"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``, ``name`` the cache argument
    of this model's ``forward`` in the installed transformers: ``"cache"`` (newer 5.x releases)
    or ``"past_key_values"`` (earlier ones, where a ``cache=`` keyword would be passed on
    unused)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def __getattr__(name: str):
    # MoBACache subclasses transformers' Cache: imported on first use, so that importing this
    # package still does not import transformers.
    if name in ("MoBACache", "MoBACacheLayer"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(name: str = ATTN_IMPLEMENTATION) -> None:
    """Register :func:`moba_dist_attention` (and its mask function, which hands a 2-D padding
    mask to the layers: refused there unless a :class:`MoBACache` is in use) with HF
    transformers under ``name``, for ``attn_implementation=name``. Idempotent."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(name, moba_dist_attention)
    AttentionMaskInterface.register(name, padding_free_mask)


__all__ = [
    "ATTN_IMPLEMENTATION",
    "ContextParallel",
    "MoBACache",
    "MoBACacheLayer",
    "PaddingMask",
    "active_context",
    "cache_kwargs",
    "context_parallel",
    "cu_seqlens_from_position_ids",
    "moba_config",
    "moba_dist_attention",
    "padding_free_mask",
    "register",
    "shift_labels",
    "slice_offsets",
]
