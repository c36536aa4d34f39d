"""``MoBACache``: the KV cache of ``attn_implementation="moba_dist"`` for HF ``generate()``.

    cache = moba_dist.hf.MoBACache(model.config)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32,
                         **moba_dist.hf.cache_kwargs(model, cache))

``generate()`` does not pick this cache by itself: it builds a ``DynamicCache`` unless one is
passed, and transformers 5 has no hook for an attention implementation to choose its own cache
class. Pass ``cache=MoBACache(model.config)`` (transformers releases whose ``forward`` names it
``past_key_values`` take that name, and would pass ``cache=`` on unused: the "moba_dist" attention
raises then; :func:`moba_dist.hf.cache_kwargs` picks the name). A ``DynamicCache`` with
``"moba_dist"`` raises at the first decode step with a message saying so.

Layout, per layer (:class:`MoBACacheLayer`):

* ``keys``, ``values``: ``[B, capacity, Hkv, D]`` in the model dtype, token-major as
  ``flash_attn_with_kvcache`` and :func:`moba_dist.decode.moba_decode` take them. Row ``b``
  holds the *real* tokens of its sequence only, from position 0: left padding (``attention_mask``
  zeros) is never stored and never attended. ``capacity`` grows in steps of ``grow_tokens``
  (a multiple of the block size), or is fixed up front with ``max_cache_len``.
* ``seqlens``: int32 ``[B]`` on the device, tokens stored per row.
* ``block_sums`` (MoBA layers only): float64 ``[B, capacity / chunk, Hkv, D]``, the running sum
  of each block's keys per kv head, updated as keys are appended, so the gate never re-reads old
  keys. Entry ``j`` is complete once ``seqlens > (j + 1) * chunk - 1``; the decode gate only
  reads blocks before the newest token's own, which are complete. float64 sums are exact for
  bf16/fp16 keys, so they equal bitwise the sums the training-time gate computes
  (``moba_dist.gating.block_part_sums``) and the selection is the training selection.

How the pieces meet: HF's attention module calls ``cache.update(k, v, layer_idx)`` before its
attention function, but without the padding mask. :meth:`MoBACacheLayer.update` therefore only
counts the new columns and returns the new ``k, v`` tagged with the layer; the ``"moba_dist"``
attention function (``moba_dist/hf/attention.py``), which receives the mask, then stores the
real tokens and computes attention (prefill: :func:`moba_dist.moba_attn_varlen` over the
unpadded rows; decode: :func:`decode_attention`). The cache is meant for that attention
function only; another implementation would see the new tokens alone.

The cache is for inference: it stores detached keys and values (no gradient reaches past tokens
through it). Block-sum updates are done here (``index_put_`` with accumulation, in
:meth:`MoBACacheLayer.append`/``append_packed``) until ``moba_dist.decode.update_block_sums``
lands.

Prefill memory: a prompt into an empty cache runs as one ``moba_attn_varlen`` call per layer
(its documented workspace). ``generate(prefill_chunk_size=...)`` bounds memory exactly, but
every chunk after the first enters a filled cache and is attended token by token (slow).

Inside ``context_parallel`` (:meth:`MoBACacheLayer.fill_shard`): a prefill from ``cp.shard``
leaves each rank its slice of every sequence (one row per sequence, ``offset`` its global start,
``tail`` whether the row's newest token is here); decode steps then get the same new tokens on
every rank, store each on its row's tail rank and decode over the group
(``moba_dist.parallel.decode_cp``). Rows of one length, no padding.

Not supported: ``crop`` (assisted generation, DoLa), offloading, ``torch.compile`` of decode
(``is_compileable`` is False).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..config import MoBAConfig
from ..gating import SUM_DTYPE
from .attention import CACHE_TAG as _TAG
from .attention import moba_config


def cache_layer_of(key: torch.Tensor) -> MoBACacheLayer | None:
    """The :class:`MoBACacheLayer` that returned ``key`` from ``update``, or None."""
    return getattr(key, _TAG, None)


_ROW_STATE = ("keys", "values", "seqlens", "block_sums", "offset", "tail")  # tensors indexed by row


class MoBACacheLayer(CacheLayerMixin):
    """One layer of :class:`MoBACache` (layout in the module docstring).

    Args:
        chunk_size: MoBA block size of the model.
        full: exact causal attention in this layer (hybrid schedule): no block sums kept.
        grow_tokens: capacity step in tokens (rounded up to a multiple of ``chunk_size``).
        max_cache_len: preallocate this many tokens per row at the first update (grown beyond
            it by ``grow_tokens`` if ever exceeded).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, chunk_size: int, full: bool, grow_tokens: int = 4096,
                 max_cache_len: int | None = None):
        super().__init__()
        self.chunk_size = chunk_size
        self.full = full
        self.grow_tokens = -(-max(grow_tokens, 1) // chunk_size) * chunk_size
        self.max_cache_len = max_cache_len
        self.columns = 0  # input columns seen, padding included (HF's notion of the cache length)
        self.seqlens: torch.Tensor | None = None
        self.block_sums: torch.Tensor | None = None
        # Sharded (filled inside context_parallel, see fill_shard): int64 [B] global position of
        # local position 0, bool [B] "this rank appends the row's new tokens", and a host bound
        # on any row's local length (what the storage must hold).
        self.offset: torch.Tensor | None = None
        self.tail: torch.Tensor | None = None
        self.local_columns = 0

    # -- HF Cache API --------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, hkv, _, d = key_states.shape
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys = torch.zeros(b, 0, hkv, d, dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(b, 0, hkv, value_states.shape[-1], dtype=value_states.dtype,
                                  device=self.device)
        self.seqlens = torch.zeros(b, dtype=torch.int32, device=self.device)
        if not self.full:
            self.block_sums = torch.zeros(b, 0, hkv, d, dtype=SUM_DTYPE, device=self.device)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Count ``S`` new columns of ``key_states [B, Hkv, S, D]`` and return ``(key_states,
        value_states)`` tagged with this layer; the attention function stores the real ones
        (:meth:`append`, :meth:`append_packed`)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(f"MoBACache: batch {key_states.shape[0]}, cache holds {self.keys.shape[0]} rows")
        self.columns += key_states.shape[2]
        if self.offset is None:
            self._reserve(self.columns)
        else:
            self.local_columns += key_states.shape[2]
            self._reserve(self.local_columns)
        k, v = key_states.view(key_states.shape), value_states.view(value_states.shape)
        setattr(k, _TAG, self)
        setattr(v, _TAG, self)
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.seqlens = self.block_sums = self.offset = self.tail = None
        self.columns = self.local_columns = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MoBACache cannot be cropped (assisted generation and DoLa are not "
                                  "supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            for name in _ROW_STATE:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.repeat_interleave(repeats, dim=0))

    # -- storage -------------------------------------------------------------------------------

    def _select(self, idx: torch.Tensor) -> None:
        if self.is_initialized:
            for name in _ROW_STATE:
                t = getattr(self, name)
                if t is not None:
                    setattr(self, name, t.index_select(0, idx.to(t.device)))

    def _reserve(self, tokens: int) -> None:
        """Grow ``keys``/``values``/``block_sums`` to hold ``tokens`` per row (an upper bound on
        every row's length, known on the host: the columns seen), copying once per step."""
        have = self.keys.shape[1]
        if tokens <= have:
            return
        # max_cache_len counts a whole row, which a shard's local storage need not hold.
        want = max(tokens, self.max_cache_len or 0) if have == 0 and self.offset is None else tokens
        cap = -(-want // self.grow_tokens) * self.grow_tokens

        def grown(t: torch.Tensor, n: int) -> torch.Tensor:
            out = t.new_zeros(t.shape[0], n, *t.shape[2:])  # zeros: unwritten slots stay finite
            out[:, :t.shape[1]] = t
            return out

        self.keys, self.values = grown(self.keys, cap), grown(self.values, cap)
        if self.block_sums is not None:
            # A shard may start inside a block: its local tokens then touch one block more.
            extra = int(self.offset is not None)
            self.block_sums = grown(self.block_sums, cap // self.chunk_size + extra)

    def _block(self, row: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        """Local block-sum index of local position ``pos`` of ``row`` (None: every row)."""
        if self.offset is None:
            return pos // self.chunk_size
        off = self.offset if row is None else self.offset[row]
        return (off + pos) // self.chunk_size - off // self.chunk_size

    def append_packed(self, k: torch.Tensor, v: torch.Tensor, row: torch.Tensor, pos: torch.Tensor) -> None:
        """Store packed tokens ``k, v [n, Hkv, D]`` at ``(row[i], pos[i])`` (int64 device ``[n]``;
        the prefill of an empty cache) and add them to their blocks' sums. ``seqlens`` must be
        set by the caller."""
        k, v = k.detach(), v.detach()
        self.keys[row, pos] = k.to(self.keys.dtype)
        self.values[row, pos] = v.to(self.values.dtype)
        if self.block_sums is not None:
            self.block_sums.index_put_((row, self._block(row, pos)), k.to(SUM_DTYPE), accumulate=True)

    def append(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None) -> None:
        """Append one token per row, ``k, v [B, Hkv, D]``, at position ``seqlens[b]``; rows where
        ``real`` (bool ``[B]`` or None: all) is False keep their length, so the slot is
        overwritten by the next real token. No host sync."""
        k, v = k.detach(), v.detach()
        rows = torch.arange(k.shape[0], device=k.device)
        pos = self.seqlens.long()
        self.keys[rows, pos] = k.to(self.keys.dtype)
        self.values[rows, pos] = v.to(self.values.dtype)
        if self.block_sums is not None:
            add = k.to(SUM_DTYPE)
            if real is not None:
                add = add * real[:, None, None]
            self.block_sums.index_put_((rows, self._block(None, pos)), add, accumulate=True)
        self.seqlens += 1 if real is None else real.to(torch.int32)

    def fill_shard(self, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, local_slice: slice,
                   group=None) -> None:
        """Prefill inside ``context_parallel``: store this rank's slice ``k, v [n, Hkv, D]`` of
        the packed stream (global ``cu_seqlens`` ``[N + 1]``, host) as a sharded cache of ``N``
        rows, one per sequence (the layout of ``moba_dist.parallel.decode_cp``), and fold the
        block sums cut by slice boundaries (one small ``all_gather`` over ``group``, MoBA layers
        only, so every rank must fill every layer, in order).

        The sequences must have one length (HF's cache length is one number per layer)."""
        from ..parallel.decode_cp import fold_boundary_sums, slice_layout

        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        if len(set(lengths)) != 1:
            raise ValueError(f"MoBACache in context_parallel: every row must have the same length, got "
                             f"sequence lengths {lengths} (one sequence per row, no padding)")
        off, n, tail = slice_layout(cu_seqlens, local_slice.start, local_slice.stop)
        dev = k.device
        rows = len(lengths)
        self.offset, self.tail = off.to(dev), tail.to(dev)
        self.columns, self.local_columns = lengths[0], int(n.max())
        self.keys = k.new_zeros(rows, 0, *k.shape[1:])
        self.values = v.new_zeros(rows, 0, *v.shape[1:])
        self.seqlens = n.to(dev, torch.int32)
        if self.block_sums is not None:
            self.block_sums = torch.zeros(rows, 0, *k.shape[1:], dtype=SUM_DTYPE, device=dev)
        self._reserve(self.local_columns)
        row = torch.repeat_interleave(torch.arange(rows), n)
        pos = torch.arange(len(row)) - torch.repeat_interleave(n.cumsum(0) - n, n)
        self.append_packed(k, v, row.to(dev), pos.to(dev))
        if self.block_sums is not None:
            fold_boundary_sums(self.block_sums, self.offset, self.seqlens, self.chunk_size, group=group)


class MoBACache(Cache):
    """KV cache for ``attn_implementation="moba_dist"`` models: one :class:`MoBACacheLayer` per
    decoder layer, following the model's hybrid schedule (``moba_full_attention_layers``).

    Args:
        config: the model config (``moba_chunk_size``, ``moba_topk``, ...; a composite config's
            text config is used).
        grow_tokens: capacity step per row in tokens (default 4096).
        max_cache_len: tokens per row to allocate at the first update (prompt plus new tokens).
            Set it for long contexts: each regrowth copies the whole cache once and briefly
            holds the old and new buffers together.

    Pass it to ``generate(..., cache=MoBACache(model.config))``; see the module docstring.
    """

    def __init__(self, config, grow_tokens: int = 4096, max_cache_len: int | None = None):
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        moba: MoBAConfig = moba_config(text)
        layers = [MoBACacheLayer(moba.chunk_size, moba.is_full(i), grow_tokens, max_cache_len)
                  for i in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        self.moba = moba


# ----------------------------------------------------------------------------------------------
# Decode attention over the cache


def decode_attention(layer: MoBACacheLayer, moba: MoBAConfig, q: torch.Tensor,
                     softmax_scale: float | None, group=None) -> torch.Tensor:
    """Attention of one new query per row, ``q [B, Hq, D]``, over ``layer``'s cache (its newest
    token already appended) -> ``[B, Hq, D]`` in q's dtype: MoBA decode, or exact attention over
    every stored token for a full layer.

    A sharded layer (filled inside ``context_parallel``, :meth:`MoBACacheLayer.fill_shard`)
    decodes over ``group`` (:func:`moba_dist.parallel.decode_cp.moba_decode_cp`, or
    ``dense_decode_cp`` for a full layer): ``q`` must be the same on every rank, and every rank
    gets the same output.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if layer.offset is not None:
        from ..parallel.decode_cp import dense_decode_cp, moba_decode_cp

        if layer.full:
            return dense_decode_cp(q, layer.keys, layer.values, layer.seqlens, group=group,
                                   softmax_scale=scale)
        return moba_decode_cp(q, layer.keys, layer.values, layer.seqlens, layer.block_sums, layer.offset,
                              moba.chunk_size, moba.topk, group=group, softmax_scale=scale)
    # A row with no token yet (its whole prompt padding, and a padding column now) attends to the
    # zero slot 0: a finite, unused output, instead of a softmax over nothing.
    seqlens = layer.seqlens.clamp(min=1)
    if layer.full:
        return _dense_decode(q, layer.keys, layer.values, seqlens, scale)
    return moba_decode(q, layer.keys, layer.values, seqlens, layer.block_sums, moba.chunk_size, moba.topk,
                       softmax_scale=scale)


def _dense_decode(q, k_cache, v_cache, cache_seqlens, scale):
    """Full attention of the newest token of each row over all of its stored tokens (SDPA with a
    length mask; GQA heads are not repeated)."""
    pos = torch.arange(k_cache.shape[1], device=q.device)
    allowed = (pos[None, :] < cache_seqlens[:, None].long())[:, None, None, :]  # [B, 1, 1, L]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2), attn_mask=allowed, scale=scale,
        enable_gqa=True)
    return out[:, :, 0]


def moba_decode(q, k_cache, v_cache, cache_seqlens, block_sums, moba_chunk_size, moba_topk, *,
                softmax_scale=None):
    """MoBA decode over the cache: the Triton kernel on CUDA for bf16/fp16 (three launches, no
    host sync, K/V read in place), the pure-PyTorch :func:`moba_dist.decode.moba_decode`
    elsewhere. Both select blocks exactly as the training gate of that device does."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from ..kernels.triton_decode import moba_decode_triton

        return moba_decode_triton(q, k_cache, v_cache, cache_seqlens, block_sums, moba_chunk_size,
                                  moba_topk, softmax_scale=softmax_scale)
    from ..decode import moba_decode as decode_torch

    return decode_torch(q, k_cache, v_cache, cache_seqlens, block_sums, moba_chunk_size, moba_topk,
                        softmax_scale=softmax_scale)
