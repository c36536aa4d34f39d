"""The ``"moba_dist"`` attention function for HF transformers' ``AttentionInterface``, its mask
function, and how the MoBA settings are read from a model config.

Two paths: the training-style forward (no cache: packed sequences from ``position_ids``, no
padding), and, when the keys come from a :class:`moba_dist.hf.MoBACache`, cached inference
(prefill and decode, left-padded batches allowed; see ``moba_dist/hf/cache.py``)."""

from __future__ import annotations

import weakref

import torch

from ..config import MoBAConfig
from ..module import layer_attention
from ..ops import PADDING_ERROR
from ..parallel.step import StepPlan
from .context import active_context
from .packing import cu_seqlens_from_position_ids, cu_seqlens_padded

# The attribute by which MoBACacheLayer.update tags the key/value tensors it returns
# (moba_dist/hf/cache.py, which imports transformers; this module does not).
CACHE_TAG = "_moba_cache_layer"


def moba_config(config) -> MoBAConfig:
    """The :class:`moba_dist.MoBAConfig` of an HF model config: ``moba_chunk_size`` and
    ``moba_topk`` (required), ``moba_full_attention_layers`` (layer indices on exact causal
    attention, default none) and ``moba_all_full`` (every layer full, default False). Set them as
    extra config fields, e.g. ``LlamaConfig(..., moba_chunk_size=4096, moba_topk=12)``."""
    for name in ("moba_chunk_size", "moba_topk"):
        if getattr(config, name, None) is None:
            raise ValueError(f"config.{name} must be set to use attn_implementation='moba_dist'")
    try:
        return MoBAConfig(chunk_size=config.moba_chunk_size, topk=config.moba_topk,
                          full_attention_layers=getattr(config, "moba_full_attention_layers", None) or (),
                          all_full=getattr(config, "moba_all_full", False))
    except (TypeError, ValueError) as e:
        raise type(e)(f"model config (moba_*): {e}") from e


class PaddingMask:
    """What :func:`padding_free_mask` hands the attention layers: the 2-D ``attention_mask``
    (bool ``[B, kv_length]``, True = real token) of one forward, with what the layers derive from
    it computed once per forward instead of once per layer (each derivation reads the mask on
    the host once)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask
        self._has_padding: bool | None = None
        self._packing: dict[int, tuple] = {}

    def has_padding(self) -> bool:
        if self._has_padding is None:
            self._has_padding = not bool(self.mask.all())
        return self._has_padding

    def new_columns(self, seqlen: int) -> torch.Tensor:
        """bool ``[B, seqlen]``: which of this forward's ``seqlen`` input columns are real."""
        return self.mask[:, -seqlen:]

    def packing(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The real tokens of this forward's ``[B, seqlen]`` inputs packed row after row:
        ``(flat_index, row, pos, cu_seqlens)``: int64 device ``[n]`` indices into the flattened
        ``B * seqlen`` tokens, each token's row and its position among its row's real tokens,
        and int32 host ``cu_seqlens [B + 1]``."""
        if seqlen not in self._packing:
            real = self.new_columns(seqlen)
            flat = real.reshape(-1).nonzero().flatten()
            row = flat // seqlen
            pos = (real.cumsum(1) - 1).reshape(-1)[flat]
            counts = real.sum(1).cpu()
            cu = torch.zeros(real.shape[0] + 1, dtype=torch.int32)
            cu[1:] = counts.cumsum(0)
            self._packing[seqlen] = (flat, row, pos, cu)
        return self._packing[seqlen]


def moba_dist_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: PaddingMask | None, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function: ``query [B, Hq, S, D]``, ``key, value [B, Hkv, S, D]`` (kv heads are
    not repeated) -> ``([B, S, Hq, D], None)``.

    Reads the schedule from ``module.config`` (:func:`moba_config`) and ``module.layer_idx``.

    Without a :class:`~moba_dist.hf.MoBACache` (training-style forward): outside
    :func:`~moba_dist.hf.context_parallel`, the batch is one packed stream on this device:
    rows are flattened one after another, each row ending a sequence, and within a row a sequence
    starts where ``position_ids`` is 0 (``cu_seq_lens_q`` from HF's flattening collator is used
    when given); a ``[1, S]`` batch needs no copy. Inside the block, ``B`` must be 1, the tokens
    are this rank's slice and the block's global ``cu_seqlens`` is used (``position_ids`` are only
    for RoPE there). ``cu_seqlens`` is read from ``position_ids`` once per forward (the first
    layer; the others reuse it while the tensor is unchanged).

    With a ``MoBACache`` (``key``/``value`` returned by its ``update``): each row is one sequence
    made of its real tokens (``attention_mask`` 1; padding is neither stored nor attended).
    Into an empty cache, the real tokens of all rows run as one packed varlen batch through the
    training-time kernels (:func:`moba_dist.moba_attn_varlen`, or causal attention for full
    layers; forward only under ``torch.no_grad``) and are stored. Into a non-empty cache, each
    input column is appended and attended as one decode step (:func:`moba_dist.hf.cache.
    decode_attention`), so ``S == 1`` is plain decode and ``S > 1`` (continuing a conversation)
    is exact too, one step per column. Outputs at padding positions are 0 or unused values.

    Under ``torch.compile`` (no MoBACache): no graph break on one device (the attention is the
    custom operator of ``moba_dist/ops.py``, ``cu_seqlens`` comes from ``position_ids`` on the
    device with a fixed size, the padding check runs inside the operator); inside
    ``context_parallel`` the attention runs eagerly outside the graph (one break per layer).

    Raises ValueError for padding masks without a MoBACache, dropout > 0, non-causal modules,
    sliding windows, softcapping, key lengths other than the query length without a MoBACache
    (e.g. a ``DynamicCache``) and padding masks with a MoBACache inside ``context_parallel``
    (there the cache is sharded over the group: :func:`_sharded_cached_attention`).
    """
    if dropout:
        raise ValueError(f"dropout: moba_dist has no attention dropout, got {dropout} (set "
                         "config.attention_dropout = 0)")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("is_causal: moba_dist is causal attention only")
    for name in ("sliding_window", "softcap"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: not supported by moba_dist, got {kwargs[name]!r}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query, key, value must be [B, H, S, D], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    config = getattr(module, "config", None)
    layer_idx = getattr(module, "layer_idx", None)
    if config is None or layer_idx is None:
        raise ValueError(f"module: {type(module).__name__} needs .config and .layer_idx for moba_dist")
    cp = active_context()
    layer = getattr(key, CACHE_TAG, None)
    if layer is not None:
        if cp is not None:
            return _sharded_cached_attention(layer, moba_config(config), layer_idx, query, key, value,
                                             attention_mask, scaling, cp), None
        return _cached_attention(layer, moba_config(config), layer_idx, query, key, value, attention_mask,
                                 scaling), None
    if kwargs.get("cache") is not None:
        # A transformers whose forward names the cache past_key_values passes cache= down
        # unused: the keys are only this call's, and decoding would silently lose the context.
        raise ValueError("cache: this transformers version takes the cache as past_key_values=; pass "
                         "**moba_dist.hf.cache_kwargs(model, cache)")

    compiling = torch.compiler.is_compiling()
    valid = None
    if attention_mask is not None:
        if not isinstance(attention_mask, PaddingMask):
            raise ValueError(PADDING_ERROR)  # a 4-D mask built by someone else
        if compiling:
            valid = attention_mask.mask  # checked inside the attention op (no host read here)
        elif attention_mask.has_padding():
            raise ValueError(PADDING_ERROR)
    batch, heads, seqlen, _ = query.shape
    if key.shape[2] != seqlen:
        raise ValueError(f"key: {key.shape[2]} keys for {seqlen} queries; moba_dist decodes only with its "
                         "own cache: pass cache=moba_dist.hf.MoBACache(model.config) to generate() or "
                         "forward (a DynamicCache cannot hold MoBA's block sums)")
    if cp is not None:
        if batch != 1:
            raise ValueError(f"query: inside context_parallel the batch is one packed row, got batch "
                             f"{batch}; pass the inputs from cp.shard(...)")
        if cp.cu_seqlens is None:
            raise ValueError("context_parallel: call cp.shard(...) before running the model in the block")
        cu, plan = cp.cu_seqlens, cp.plan
    elif kwargs.get("cu_seq_lens_q") is not None and batch == 1:
        cu, plan = kwargs["cu_seq_lens_q"], None
    elif compiling:
        cu, plan = cu_seqlens_padded(kwargs.get("position_ids"), batch, seqlen), None
    else:
        cu, plan = _plan_once(kwargs.get("position_ids"), batch, seqlen)
    # [B, H, S, D] -> [B * S, H, D]: a strided view when B == 1 (the kernels take strided rows;
    # keys/values become head-major again inside, for free); one copy otherwise.
    q, k, v = (t.transpose(1, 2).reshape(batch * seqlen, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = layer_attention(moba_config(config), layer_idx, q, k, v, cu, context_parallel=cp is not None,
                          softmax_scale=scaling, valid=valid, plan=plan)
    return out.reshape(batch, seqlen, heads, out.shape[-1]), None


def _cached_attention(layer, moba: MoBAConfig, layer_idx: int, query: torch.Tensor,
                      key: torch.Tensor, value: torch.Tensor, mask: PaddingMask | None,
                      scaling: float | None) -> torch.Tensor:
    """The MoBACache path of :func:`moba_dist_attention`: store the real new tokens of ``layer``
    (a :class:`~moba_dist.hf.cache.MoBACacheLayer`) and attend."""
    from .cache import decode_attention

    batch, heads, seqlen, dim = query.shape
    if mask is not None and not isinstance(mask, PaddingMask):
        raise ValueError(f"attention_mask: expected the 2-D mask through moba_dist's mask function, got "
                         f"{type(mask).__name__}")
    if layer.offset is not None:
        raise ValueError("MoBACache: this cache was filled inside context_parallel (sharded over its "
                         "group) and decodes only inside it")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
    if layer.columns == seqlen:  # the cache was empty: prefill
        if mask is None:
            flat = row = pos = None
            cu = torch.arange(batch + 1, dtype=torch.int32) * seqlen
            qp, kp, vp = (t.reshape(batch * seqlen, *t.shape[2:]) for t in (q, k, v))
        else:
            flat, row, pos, cu = mask.packing(seqlen)
            qp, kp, vp = (t.reshape(batch * seqlen, *t.shape[2:])[flat] for t in (q, k, v))
        if row is None:
            row = torch.arange(batch, device=q.device).repeat_interleave(seqlen)
            pos = torch.arange(seqlen, device=q.device).repeat(batch)
        layer.append_packed(kp, vp, row, pos)
        layer.seqlens.copy_((cu[1:] - cu[:-1]).to(layer.seqlens.device))
        out = torch.zeros(batch * seqlen, heads, dim, dtype=query.dtype, device=query.device)
        if qp.shape[0]:
            op = layer_attention(moba, layer_idx, qp, kp, vp, cu, context_parallel=False,
                                 softmax_scale=scaling)
            out = op.view_as(out) if flat is None else out.index_copy_(0, flat, op)
        return out.view(batch, seqlen, heads, dim)
    real = None if mask is None else mask.new_columns(seqlen)
    outs = []
    for s in range(seqlen):
        layer.append(k[:, s], v[:, s], None if real is None else real[:, s])
        outs.append(decode_attention(layer, moba, q[:, s].contiguous(), scaling))
    return torch.stack(outs, dim=1)


def _sharded_cached_attention(layer, moba: MoBAConfig, layer_idx: int, query: torch.Tensor,
                              key: torch.Tensor, value: torch.Tensor, mask: PaddingMask | None,
                              scaling: float | None, cp) -> torch.Tensor:
    """The MoBACache path inside :func:`~moba_dist.hf.context_parallel`. Into an empty cache the
    input is this rank's slice from ``cp.shard`` (``B == 1``): context-parallel attention as in
    training, and the slice is stored as this rank's shard of one cache row per sequence
    (:meth:`~moba_dist.hf.cache.MoBACacheLayer.fill_shard`). Into a filled one the input is
    the new columns, the same ``[B, S]`` on every rank: each is appended on the rank holding its
    row's tail and attended by a context-parallel decode step over the group (every rank gets
    the same output)."""
    from .cache import decode_attention

    batch, heads, seqlen, dim = query.shape
    if mask is not None and mask.has_padding():
        raise ValueError("attention_mask: padding is not supported with a MoBACache inside context_parallel "
                         "(rows of one length, one sequence each)")
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D]
    if layer.offset is None:
        if layer.columns != seqlen:
            raise ValueError("MoBACache: a cache filled outside context_parallel cannot decode inside it")
        if cp.cu_seqlens is None or batch != 1 or cp.local_slice.stop - cp.local_slice.start != seqlen:
            raise ValueError("context_parallel: prefill a MoBACache with the inputs of cp.shard(...)")
        qp, kp, vp = q[0], k[0], v[0]
        out = layer_attention(moba, layer_idx, qp, kp, vp, cp.cu_seqlens, context_parallel=True,
                              softmax_scale=scaling, plan=cp.plan)
        layer.fill_shard(kp, vp, cp.cu_seqlens, cp.local_slice, group=cp.group)
        return out.view(1, seqlen, heads, dim)
    outs = []
    for s in range(seqlen):
        layer.append(k[:, s], v[:, s], layer.tail)
        outs.append(decode_attention(layer, moba, q[:, s].contiguous(), scaling, group=cp.group))
    return torch.stack(outs, dim=1)


_PLAN_MEMO: list = [None]  # (weakref to position_ids, its version, batch, seqlen, cu_seqlens, plan)


def _plan_once(position_ids: torch.Tensor | None, batch: int, seqlen: int) -> tuple[torch.Tensor, StepPlan]:
    """``cu_seqlens`` from ``position_ids`` (:func:`cu_seqlens_from_position_ids`) and the one-device
    :class:`~moba_dist.StepPlan` of the forward, made once per ``position_ids`` tensor: every
    layer of a forward (and its checkpoint recompute) gets the same tensor, so only the first
    layer reads it on the host, and the layers share one plan."""
    memo = _PLAN_MEMO[0]
    if (memo is not None and memo[0]() is position_ids and memo[1] == getattr(position_ids, "_version", 0)
            and memo[2:4] == (batch, seqlen)):
        return memo[4], memo[5]
    cu = cu_seqlens_from_position_ids(position_ids, batch, seqlen)
    plan = StepPlan(cu)
    if position_ids is not None:
        _PLAN_MEMO[0] = (weakref.ref(position_ids), position_ids._version, batch, seqlen, cu, plan)
    return cu, plan


def padding_free_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None,
                      **kwargs) -> PaddingMask | None:
    """HF mask function for ``"moba_dist"``: no mask is built. A 2-D ``attention_mask`` is handed
    to the layers as a :class:`PaddingMask`: with a MoBACache it says which tokens are real;
    without one, any padding raises ValueError in the first layer (checked once per forward)
    instead of being dropped silently."""
    if attention_mask is None:
        return None
    return PaddingMask(attention_mask.to(torch.bool))


__all__ = ["PaddingMask", "moba_config", "moba_dist_attention", "padding_free_mask"]
