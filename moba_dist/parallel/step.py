"""``StepPlan``: what every attention layer of one step shares, established once.

A model's layers all attend over the same packed stream in a step, so what depends on the
stream alone is settled once, by the first layer that uses the plan, and reused by the others
(and by activation-checkpointing recomputes):

  * one device: ``cu_seqlens`` read on the host and validated (host sync A);
  * context parallel: the cross-rank handshake (``handshake.agree``: slice lengths, the
    agreement check and ``cu_seqlens`` in one all-gather and one device-to-host copy; host
    sync A), so later layers run no handshake collective at all.

Layout tables (block starts, block parts, the fused kernel's segment table) are cached with the
stream's :class:`~moba_dist.parallel.plan.StreamPlan` and uploaded to the device once.

What stays per layer is what depends on the layer's own data: the gate, and, where kernel grids
or all-to-all splits are sized by the selection, one device-to-host copy of the selection counts
(host sync B: the varlen selected part and context parallel). On one device with the fused
selected kernel the plan is static (every (kv head, block) is a segment), so a layer reads
nothing from the device: a step's host syncs do not grow with the number of layers.
``host_syncs`` counts them for the whole step.
"""

from __future__ import annotations

import torch

from .._validation import check_cu_seqlens, check_cu_seqlens_form
from ..settings import Settings


class StepPlan:
    """The shared plan of one step's attention calls over one packed stream.

    Args:
        cu_seqlens: int32 (or int64) ``[B + 1]`` boundaries of the packed stream (for context
            parallelism: of the *global* stream, the same on every rank), on the CPU or on the
            device of the attention inputs. Every call that uses the plan must pass this tensor
            (or a CPU tensor with the same values).
        group: process group for context parallelism (``None``: the default group).
        context_parallel: whether the calls are context-parallel (each rank passes its slice).
        settings: the pipeline's switches for the step (:class:`moba_dist.Settings`); default:
            the ``MOBA_DIST_*`` environment, read here once.

    Construction communicates and reads nothing; the first call that uses the plan establishes
    it. Make a new plan when the batch changes. A plan is used by one process group and one
    device. Under ``torch.compile`` the one-device operator plans inside itself and a plan is
    not used.

    Context parallel: the handshake runs in the first call, so its checks (every rank's
    arguments valid, ranks agreeing on ``cu_seqlens``, chunk, top-k, heads, dtype, settings)
    cover that call; later calls check their arguments locally against the plan (slice length,
    device), as SPMD code that calls the same layers on every rank expects.

    Attributes:
        host_syncs: device-to-host reads that the calls using this plan waited for so far (the
            plan's own and every layer's, forward and backward).
        calls: attention calls that used the plan.
    """

    def __init__(self, cu_seqlens: torch.Tensor, *, group=None, context_parallel: bool = False,
                 settings: Settings | None = None):
        check_cu_seqlens_form(cu_seqlens)
        if settings is not None and not isinstance(settings, Settings):
            raise TypeError(f"settings must be a moba_dist.Settings or None, got {type(settings).__name__}")
        self.settings = settings if settings is not None else Settings.from_env()
        if not isinstance(context_parallel, bool):
            raise TypeError(f"context_parallel must be a bool, got {type(context_parallel).__name__}")
        self.cu_seqlens = cu_seqlens
        self.group = group
        self.context_parallel = context_parallel
        self.host_syncs = 0
        self.calls = 0
        self._host: torch.Tensor | None = None  # validated host int64 cu_seqlens
        self._offsets: torch.Tensor | None = None  # host int64 slice boundaries
        self._comm = None
        self._device: torch.device | None = None

    def __repr__(self) -> str:
        state = "established" if self._host is not None else "not yet used"
        kind = "context parallel" if self.context_parallel else "one device"
        return (f"StepPlan({kind}, {self.cu_seqlens.numel() - 1} sequences, {state}, "
                f"calls={self.calls}, host_syncs={self.host_syncs})")

    @property
    def established(self) -> bool:
        return self._host is not None

    def check_cu_seqlens(self, cu_seqlens: torch.Tensor) -> None:
        """``cu_seqlens`` is the plan's tensor, or a CPU tensor with its values."""
        if cu_seqlens is self.cu_seqlens:
            return
        check_cu_seqlens_form(cu_seqlens)
        if cu_seqlens.device.type == "cpu" and self.cu_seqlens.device.type == "cpu" and \
                torch.equal(cu_seqlens.to(torch.int64), self.cu_seqlens.to(torch.int64)):
            return
        raise ValueError("cu_seqlens: not the tensor this StepPlan was made for; pass plan.cu_seqlens, "
                         "or make a new StepPlan for a new batch")

    def check_device(self, q: torch.Tensor) -> None:
        if self._device is None:
            self._device = q.device
        elif q.device != self._device:
            raise ValueError(f"q is on {q.device}, but this StepPlan was established on {self._device}")

    # One device ---------------------------------------------------------------------------
    def _one_device_host(self, cu_seqlens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        if self.context_parallel:
            raise ValueError("plan: this StepPlan is for context-parallel calls; make one with "
                             "context_parallel=False for one device")
        self.check_cu_seqlens(cu_seqlens)
        self.check_device(q)
        if self._host is None:
            check_cu_seqlens_form(self.cu_seqlens, q.device)
            if self.cu_seqlens.device.type != "cpu":
                self.host_syncs += 1
            self._host = check_cu_seqlens(self.cu_seqlens, q.shape[0], q.device)
            self._offsets = torch.tensor([0, q.shape[0]], dtype=torch.int64)
            self._longest = int(self._host.diff().max())
        elif q.shape[0] != int(self._offsets[-1]):
            raise ValueError(f"q: {q.shape[0]} tokens, but this StepPlan's stream has "
                             f"{int(self._offsets[-1])}")
        return self._host

    def max_seqlen(self, cu_seqlens: torch.Tensor, q: torch.Tensor) -> int:
        """The longest sequence of a one-device stream (establishes the plan if needed)."""
        self._one_device_host(cu_seqlens, q)
        return self._longest

    def one_device(self, cu_seqlens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Validated host int64 ``cu_seqlens`` of a one-device call (read once); counts the call."""
        host = self._one_device_host(cu_seqlens, q)
        self.calls += 1
        return host

    # Context parallel ---------------------------------------------------------------------
    def agreed(self):
        """``(comm, cu_seqlens, offsets)`` once established by :meth:`establish_cp`, else None."""
        if self._host is None:
            return None
        return self._comm, self._host, self._offsets

    def establish_cp(self, comm, cu_seqlens: torch.Tensor, offsets: torch.Tensor, q: torch.Tensor) -> None:
        """Record what the first call's handshake agreed (the handshake's host sync is counted)."""
        self._comm, self._host, self._offsets = comm, cu_seqlens, offsets
        self.check_device(q)
        self.host_syncs += 1

    def check_slice(self, q: torch.Tensor) -> None:
        """A later context-parallel call: this rank's slice length and device match the plan."""
        self.check_device(q)
        rank = self._comm.rank
        n = int(self._offsets[rank + 1] - self._offsets[rank])
        if q.shape[0] != n:
            raise ValueError(f"q: {q.shape[0]} tokens, but rank {rank}'s slice in this StepPlan has {n}")


__all__ = ["StepPlan"]
