"""ring-flash-attn as the ring kernel, when it and flash-attn import (CUDA, fp16/bf16 only).

Two of its algorithms are offered:

  ``rfa_zigzag``  ``zigzag_ring_flash_attn_varlen_func``: every sequence cut into 2W equal chunks,
                  rank r holding chunks r and 2W-1-r of each (our relayout builds that layout).
                  Needs every sequence length to be a multiple of 2W.
  ``rfa_llama3``  ``llama3_flash_attn_varlen_func``: equal contiguous slices, keys/values
                  all-gathered head group by head group. Needs T to be a multiple of W.

``impl`` (argument, else ``$MOBA_DIST_RING_IMPL``, else ``auto``): ``auto`` takes our ring when
its kernels are cuDNN's (faster than flash-attn's), else ``rfa_zigzag``
where it can run and no kernel ``backend`` was named, our own ring otherwise; ``ours`` forces our
ring; naming an ``rfa_*`` algorithm that cannot run (package missing, CPU, float32, lengths not
divisible) warns and runs our ring.

The package's ``__init__`` imports a Hugging Face adapter that breaks under transformers 5, so we
import only the two algorithm modules, under an empty stand-in package module whose ``__path__``
is the installed folder. Their traffic happens inside the package and is not in our byte ledger.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
import warnings
from functools import cache

import torch

from ..kernels import get_backend

IMPL_ENV = "MOBA_DIST_RING_IMPL"
IMPLS = ("auto", "ours", "rfa_zigzag", "rfa_llama3")
LLAMA3_STRIDE_ENV = "MOBA_DIST_LLAMA3_HEADS_K_STRIDE"
_MODULES = {"zigzag": "zigzag_ring_flash_attn_varlen", "llama3": "llama3_flash_attn_varlen"}


def import_algorithms(package: str = "ring_flash_attn") -> types.SimpleNamespace | None:
    """The package's varlen zigzag and llama3 functions without running its ``__init__``, or
    ``None`` when they do not import (anything it added to ``sys.modules`` is then removed)."""
    before = set(sys.modules)
    try:
        if package not in sys.modules:
            spec = importlib.util.find_spec(package)
            if spec is None or not spec.submodule_search_locations:
                return None
            stub = types.ModuleType(package)
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules[package] = stub
        zz = importlib.import_module(f"{package}.{_MODULES['zigzag']}")
        l3 = importlib.import_module(f"{package}.{_MODULES['llama3']}")
        return types.SimpleNamespace(
            zigzag=zz.zigzag_ring_flash_attn_varlen_func,
            llama3=l3.llama3_flash_attn_varlen_func,
            llama3_prepare=l3.llama3_flash_attn_prepare_cu_seqlens,
        )
    except Exception:  # ImportError, or a package built for another flash-attn/torch
        for name in set(sys.modules) - before:
            if name == package or name.startswith(package + "."):
                del sys.modules[name]
        return None


@cache
def load_ring_flash_attn() -> types.SimpleNamespace | None:
    """ring-flash-attn's algorithms, or ``None`` when it or flash-attn is unavailable."""
    try:
        import flash_attn.flash_attn_interface  # noqa: F401
    except Exception:
        return None
    return import_algorithms()


def _runnable(q: torch.Tensor) -> bool:
    """flash-attn can run these tensors (CUDA, fp16/bf16, a supported head dim)."""
    try:
        get_backend(q.device, q.dtype, q.shape[-1], "flash_attn")
    except ValueError:
        return False
    return True


def unavailable_reason(name: str, q: torch.Tensor, cu_seqlens: torch.Tensor, world: int) -> str | None:
    """Why ``rfa_zigzag``/``rfa_llama3`` cannot run these inputs on ``world`` ranks (``None``: it
    can). ``cu_seqlens`` is the global host tensor."""
    if not _runnable(q):
        return f"flash-attn cannot run {q.dtype} with head_dim={q.shape[-1]} on {q.device}"
    if load_ring_flash_attn() is None:
        return "ring-flash-attn or flash-attn does not import"
    if name == "rfa_zigzag" and bool((cu_seqlens.diff() % (2 * world)).any()):
        return f"a sequence length is not a multiple of 2 * world = {2 * world}"
    if name == "rfa_llama3" and int(cu_seqlens[-1]) % world:
        return f"the total length is not a multiple of world = {world}"
    return None


def pick_impl(impl: str | None, q: torch.Tensor, cu_seqlens: torch.Tensor, world: int,
              backend: str | None) -> str:
    """Resolve ``impl`` to ``ours``, ``rfa_zigzag`` or ``rfa_llama3`` for these inputs."""
    name = impl if impl is not None else (os.environ.get(IMPL_ENV) or "auto")
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    if name == "ours" or (name == "auto" and backend is not None):
        return "ours"
    if name == "auto" and get_backend(q.device, q.dtype, q.shape[-1]).name == "cudnn":
        return "ours"  # our ring on cuDNN kernels outruns ring-flash-attn's FA2 ring
    want = "rfa_zigzag" if name == "auto" else name
    reason = unavailable_reason(want, q, cu_seqlens, world)
    if reason is None:
        return want
    if name != "auto":
        warnings.warn(f"impl={name!r} cannot run ({reason}); using moba_dist's own ring", stacklevel=3)
    return "ours"


def run_zigzag(q, k, v, cu_seqlens: torch.Tensor, world: int, softmax_scale: float, group):
    """ring-flash-attn zigzag on the per-sequence zigzag layout (``ring_plan.seq_zigzag_layout``);
    each rank holds ``L / W`` rows of every sequence, so the local ``cu_seqlens`` is ``cu // W``."""
    rfa = load_ring_flash_attn()
    local_cu = (cu_seqlens // world).to(q.device, torch.int32)
    max_seqlen = int(cu_seqlens.diff().max()) // world
    return rfa.zigzag(q.contiguous(), k.contiguous(), v.contiguous(), local_cu, max_seqlen,
                      softmax_scale=softmax_scale, causal=True, group=group)


def run_llama3(q, k, v, cu_seqlens: torch.Tensor, rank: int, world: int, softmax_scale: float, group):
    """ring-flash-attn llama3 on equal contiguous slices. ``$MOBA_DIST_LLAMA3_HEADS_K_STRIDE``
    (default 1) kv heads are all-gathered at a time, overlapped with the previous group's kernel."""
    rfa = load_ring_flash_attn()
    stride = int(os.environ.get(LLAMA3_STRIDE_ENV, "1"))
    cu = cu_seqlens.to(q.device, torch.int32)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_prepare(cu, causal=True, rank=rank, world_size=world)
    return rfa.llama3(q.contiguous(), k.contiguous(), v.contiguous(), cu_q, cu_k, max_q, max_k, stride,
                      k_slice, softmax_scale=softmax_scale, causal=True, group=group)


__all__ = ["IMPLS", "IMPL_ENV", "import_algorithms", "load_ring_flash_attn", "pick_impl", "run_llama3",
           "run_zigzag", "unavailable_reason"]
