"""Argument checks shared by the public functions: clear errors, never silent wrong results.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or
shape) and names the argument and the expected form. None of them reads device memory except
:func:`check_cu_seqlens`, which copies ``cu_seqlens`` to the host (once) when it is not there yet.
"""

from __future__ import annotations

import math
import numbers

import torch

_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DEVICE_TYPES = ("cpu", "cuda")


def check_qkv(q, k, v) -> None:
    """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` on one device, one dtype the device runs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D], got shape {tuple(t.shape)}")
    if q.device.type not in _DEVICE_TYPES:
        raise ValueError(f"q is on {q.device}; moba_dist runs on {' or '.join(_DEVICE_TYPES)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = _CUDA_DTYPES if q.device.type == "cuda" else _CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q dtype {q.dtype} is not supported on {q.device.type}; use one of {allowed}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same number of tokens, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[2] == 0:
        raise ValueError("q, k, v must have a head dim D >= 1, got 0")
    if k.shape[1] == 0 or q.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q heads ({q.shape[1]}) must be a positive multiple of k heads ({k.shape[1]})")


def check_cu_seqlens_form(cu_seqlens, device: torch.device | None = None) -> None:
    """Type, shape and dtype of ``cu_seqlens`` (no values: reading them may need the device).
    ``device``: the tensors' device; ``cu_seqlens`` must live there or on the CPU."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if device is not None and cu_seqlens.device.type != "cpu" and cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; put it on q's device ({device}) "
                         "or on the CPU")


def check_cu_seqlens_values(cu: torch.Tensor, total: int | None) -> torch.Tensor:
    """Values of a host int64 ``cu``: from 0, non-decreasing, ending at ``total`` (if given)."""
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens[0] must be 0, got {int(cu[0])}")
    if bool((cu.diff() < 0).any()):
        bad = int(torch.nonzero(cu.diff() < 0)[0, 0])
        raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{bad + 1}] = "
                         f"{int(cu[bad + 1])} < cu_seqlens[{bad}] = {int(cu[bad])}")
    if total is not None and int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens[-1] must equal the total token count {total}, got {int(cu[-1])}")
    return cu


def check_cu_seqlens(cu_seqlens, total: int | None, device: torch.device | None = None) -> torch.Tensor:
    """Validate and return a CPU int64 copy (one device-to-host copy when it lives on a GPU)."""
    check_cu_seqlens_form(cu_seqlens, device)
    return check_cu_seqlens_values(cu_seqlens.to("cpu", torch.int64), total)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return int(value)


def check_scale(softmax_scale, head_dim: int) -> float:
    """``softmax_scale``: ``None`` (``head_dim ** -0.5``) or a positive finite real number."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"softmax_scale must be a positive finite float (or None for D ** -0.5), "
                         f"got {softmax_scale!r}")
    return scale


def check_max_seqlen_form(max_seqlen) -> int:
    """``max_seqlen`` is an int >= 0 (compared with the longest sequence where ``cu_seqlens`` is
    read); a ``torch.SymInt`` (``torch.compile``'s dynamic int) passes through as it is."""
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (numbers.Integral, torch.SymInt)) \
            or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= the longest sequence, got {max_seqlen!r}")
    return max_seqlen if isinstance(max_seqlen, torch.SymInt) else int(max_seqlen)


def check_max_seqlen(max_seqlen, longest: int) -> int:
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < longest:
        raise ValueError(f"max_seqlen must be an int >= the longest sequence ({longest}), got {max_seqlen!r}")
    return int(max_seqlen)
