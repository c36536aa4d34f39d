"""``context_parallel``: the block inside which attention runs context-parallel over a group, and
``shard``, which cuts the full batch into this rank's contiguous slice of model kwargs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..parallel.step import StepPlan
from .packing import shard_batch

# A plain module-level stack, not a ContextVar: on CUDA, autograd runs backward (and the
# activation-checkpointing recompute inside it) on its own device threads, which do not see the
# calling thread's ContextVar values. Attention must find the context there too.
_ACTIVE: list[ContextParallel] = []


def active_context() -> ContextParallel | None:
    """The innermost open :func:`context_parallel` block of this process, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


class ContextParallel:
    """State of one :func:`context_parallel` block: the group, and the layout of the batch that
    :meth:`shard` cut last (used by every attention call of the block until the next ``shard``).

    Attributes:
        group: the process group (``None``: the default group).
        rank, size: this process's rank in ``group`` and the group's size.
        cu_seqlens: int32 host ``[N + 1]`` boundaries of the *global* packed stream, or None
            before the first :meth:`shard`.
        local_slice: ``slice(start, end)`` of this rank's tokens in the flattened global stream.
        plan: the :class:`moba_dist.StepPlan` of that batch, which every attention call of the
            block shares (the handshake and its host sync run once per ``shard``, in the first
            layer, not in every layer), or None before the first :meth:`shard`.
    """

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("context_parallel needs an initialized torch.distributed process group "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        self.size = dist.get_world_size(group)
        self.cu_seqlens: torch.Tensor | None = None
        self.local_slice: slice | None = None
        self.plan: StepPlan | None = None

    def shard(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """This rank's contiguous slice of a batch, as keyword arguments of an HF causal LM.

        Every rank of the group must pass the same full batch. A ``[B, S]`` batch is flattened
        row by row into one packed stream of ``T = B * S`` tokens (each row ends a sequence;
        within a row, sequences start where ``position_ids`` is 0). Rank r gets the r-th of W
        contiguous slices whose lengths differ by at most one, the first ``T % W`` ranks holding
        the extra token (:func:`~moba_dist.hf.slice_offsets`).

        Args:
            input_ids: ``[B, S]`` or ``[S]`` token ids.
            position_ids: same shape (or ``[1, S]``), restarting at 0 for each packed sequence;
                default ``arange(S)`` for every row.
            labels: same shape as ``input_ids``, ``-100`` where no loss is wanted; optional.

        Returns:
            ``input_ids``, ``position_ids`` (global positions, so RoPE is right), each ``[1, n]``,
            and with ``labels``: ``labels [1, n]``, ``shift_labels [1, n]`` (the full stream's
            labels shifted left by one *before* slicing, ``-100`` at each sequence's last token)
            and ``num_items_in_batch`` (0-d int64 tensor: targets that are not ``-100`` in the
            whole stream). With these, ``model(**inputs).loss`` is this rank's share of the
            global mean loss: summed over the group it is the single-process loss.

        Communicates nothing; one device-to-host copy of the ``T`` sequence-start flags when
        ``position_ids`` lives on a GPU. The global ``cu_seqlens`` it computes stays in the
        context, so attention never gathers position ids.
        """
        out, cu, local = shard_batch(input_ids, position_ids, labels, self.rank, self.size)
        self.cu_seqlens = cu
        self.local_slice = local
        self.plan = StepPlan(cu, group=self.group, context_parallel=True)
        return out


@contextmanager
def context_parallel(group=None) -> Iterator[ContextParallel]:
    """Run ``moba_dist`` attention context-parallel over ``group`` inside the block.

    Inside, every attention call of a model using ``attn_implementation="moba_dist"`` (and every
    :class:`moba_dist.MoBAAttention` without its own group) takes its input as this rank's slice
    of the global packed stream cut by the last :meth:`ContextParallel.shard`, and runs
    :func:`moba_dist.moba_attn_varlen_cp` (full-attention layers:
    :func:`moba_dist.ring_attn_varlen_cp`) over ``group``. Run forward, backward and any
    activation-checkpointing recompute inside the block, on every rank of the group, in the same
    order. ``group=None`` is the default group; pass the CP sub-group when the world also has a
    data-parallel dimension.

    One block is active per process (the innermost, when nested); attention looks it up in a
    process-wide variable, so it is found in autograd's backward threads too.
    """
    cp = ContextParallel(group)
    _ACTIVE.append(cp)
    try:
        yield cp
    finally:
        _ACTIVE.remove(cp)


__all__ = ["ContextParallel", "active_context", "context_parallel"]
