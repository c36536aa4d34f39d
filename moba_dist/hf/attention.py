"""The ``"moba_dist"`` attention function for HF transformers' ``AttentionInterface``, its mask
function, and how the MoBA settings are read from a model config."""

from __future__ import annotations

import torch

from ..config import MoBAConfig
from ..module import layer_attention
from .context import active_context
from .packing import cu_seqlens_from_position_ids


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


def moba_dist_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """HF attention function: ``query [B, Hq, S, D]``, ``key, value [B, Hkv, S, D]`` (kv heads are
    not repeated) -> ``([B, S, Hq, D], None)``.

    Reads the schedule from ``module.config`` (:func:`moba_config`) and ``module.layer_idx``.
    Outside :func:`~moba_dist.hf.context_parallel`, the batch is one packed stream on this device:
    rows are flattened one after another, each row ending a sequence, and within a row a sequence
    starts where ``position_ids`` is 0 (``cu_seq_lens_q`` from HF's flattening collator is used
    when given); a ``[1, S]`` batch needs no copy. Inside the block, ``B`` must be 1, the tokens
    are this rank's slice and the block's global ``cu_seqlens`` is used (``position_ids`` are only
    for RoPE there).

    Raises ValueError for padding masks, dropout > 0, non-causal modules, sliding windows,
    softcapping, and key lengths other than the query length (KV caches / generation).
    """
    if attention_mask is not None:
        raise ValueError("attention_mask: moba_dist does not support padding; pack the sequences into one "
                         "row with position_ids restarting at 0 instead")
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
    batch, heads, seqlen, _ = query.shape
    if key.shape[2] != seqlen:
        raise ValueError(f"key: {key.shape[2]} keys for {seqlen} queries; moba_dist runs training-style "
                         "forwards only (no KV cache, no generation)")
    config = getattr(module, "config", None)
    layer_idx = getattr(module, "layer_idx", None)
    if config is None or layer_idx is None:
        raise ValueError(f"module: {type(module).__name__} needs .config and .layer_idx for moba_dist")

    cp = active_context()
    if cp is not None:
        if batch != 1:
            raise ValueError(f"query: inside context_parallel the batch is one packed row, got batch "
                             f"{batch}; pass the inputs from cp.shard(...)")
        if cp.cu_seqlens is None:
            raise ValueError("context_parallel: call cp.shard(...) before running the model in the block")
        cu = cp.cu_seqlens
    elif kwargs.get("cu_seq_lens_q") is not None and batch == 1:
        cu = kwargs["cu_seq_lens_q"]
    else:
        cu = cu_seqlens_from_position_ids(kwargs.get("position_ids"), batch, seqlen)
    # [B, H, S, D] -> [B * S, H, D]: a strided view when B == 1 (the kernels take strided rows;
    # keys/values become head-major again inside, for free); one copy otherwise.
    q, k, v = (t.transpose(1, 2).reshape(batch * seqlen, t.shape[1], t.shape[3]) for t in (query, key, value))
    out = layer_attention(moba_config(config), layer_idx, q, k, v, cu, context_parallel=cp is not None,
                          group=cp.group if cp is not None else None, softmax_scale=scaling)
    return out.reshape(batch, seqlen, heads, out.shape[-1]), None


def padding_free_mask(batch_size: int, q_length: int, kv_length: int, *args, attention_mask=None,
                      **kwargs) -> None:
    """HF mask function for ``"moba_dist"``: no mask is built (sequences come from
    ``position_ids``); a 2-D ``attention_mask`` with any padding raises ValueError instead of
    being dropped silently."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("attention_mask: moba_dist does not support padding; pack the sequences into one "
                         "row with position_ids restarting at 0 instead")
    return None


__all__ = ["moba_config", "moba_dist_attention", "padding_free_mask"]
