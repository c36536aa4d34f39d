"""One byte budget for every transient workspace of a MoBA call.

MoBA's selected part gathers (query, head) rows, scores tiles, keeps partial results and their
gradients; each of those buffers is sized from one number, the *workspace budget* of the call,
and the batching (pair batches, gate tiles, partial-result windows, kernel score tiles) is
derived from it, never from a fixed row count.

Default: the bytes of the call's own ``q + k + v + out`` (``out`` is shaped like ``q``), so a
call never holds more scratch at once than its inputs and output, whatever the head dim, block
size or top-k. ``$MOBA_DIST_WORKSPACE_BYTES`` (read once, at import) or
:func:`set_workspace_bytes` override it with a fixed number of bytes. Larger budgets mean fewer,
larger batches (fewer kernel launches); results do not depend on the budget except through
floating-point summation order, and the block selection does not depend on it at all.

The accounting per buffer is documented where the buffer is made (``core.sel_batches``,
``kernels/triton_moba.py``, ``gating.gate_tiles``, ``kernels/torch_backend.py``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

WORKSPACE_ENV = "MOBA_DIST_WORKSPACE_BYTES"
MIN_WORKSPACE = 1 << 20  # below this, per-launch overhead dominates and nothing is saved


def _read_env() -> int | None:
    raw = os.environ.get(WORKSPACE_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(float(raw))
    except ValueError as e:
        raise ValueError(f"${WORKSPACE_ENV}: expected a number of bytes, got {raw!r}") from e
    if value <= 0:
        raise ValueError(f"${WORKSPACE_ENV}: expected a positive number of bytes, got {raw!r}")
    return value


_override: int | None = _read_env()


def set_workspace_bytes(value: int | None) -> None:
    """Fix the workspace budget of every later call to ``value`` bytes (``None``: the default,
    ``q + k + v + out`` of each call). Must be the same on every rank of a group."""
    global _override
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"workspace bytes: expected a positive int or None, got {value!r}")
    _override = value


def workspace_override() -> int | None:
    """The fixed budget in force, or ``None`` for the per-call default (for the handshake)."""
    return _override


def workspace_bytes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The transient-memory budget of one call on ``q [n, Hq, D]``, ``k, v [n, Hkv, D]``."""
    if _override is not None:
        return _override
    own = 2 * q.numel() * q.element_size() + k.numel() * k.element_size() + v.numel() * v.element_size()
    return max(MIN_WORKSPACE, own)


_limit: ContextVar[int | None] = ContextVar("moba_dist_workspace_limit", default=None)


@contextmanager
def workspace_limit(nbytes: int) -> Iterator[None]:
    """Kernel calls inside this block tile their scratch within ``nbytes`` instead of their own
    inputs' budget: MoBA's selected part runs the kernel on gathered rows (a small ``q``) and
    gives it the share of the *call's* budget that its batch buffers leave."""
    token = _limit.set(max(1, int(nbytes)))
    try:
        yield
    finally:
        _limit.reset(token)


def kernel_workspace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """The scratch budget of one kernel call on ``q, k, v``: the innermost
    :func:`workspace_limit` in force, else :func:`workspace_bytes` of these inputs."""
    limit = _limit.get()
    return workspace_bytes(q, k, v) if limit is None else limit


__all__ = ["WORKSPACE_ENV", "kernel_workspace", "set_workspace_bytes", "workspace_bytes",
           "workspace_limit", "workspace_override"]
