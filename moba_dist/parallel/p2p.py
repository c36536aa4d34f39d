"""Asynchronous ring exchange: send a buffer to the next rank, receive one from the previous.

Used by the ring attention loops to overlap communication with compute: a step posts the
exchange for the *next* step, runs its kernels, then waits. Sizes are known on every rank from the
plan, so nothing is negotiated at run time. Bytes go into the :class:`~.comm.Comm` ledger.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Comm


class PendingRecv:
    """An exchange in flight; :meth:`wait` returns the received tensor."""

    def __init__(self, works, recv: torch.Tensor, keep: torch.Tensor):
        self._works = works
        self._recv = recv
        self._keep = keep  # the send buffer must stay alive until the send completes

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._works = []
        self._keep = None
        return self._recv


class RingExchange:
    """Ring neighbours of this rank in ``comm``'s group, with a ledger name and a p2p tag.

    ``tag`` keeps two exchanges that are in flight at once between the same pair apart on gloo
    (NCCL matches them by issue order, which is the same on both sides).
    """

    def __init__(self, comm: Comm, name: str, tag: int = 0):
        self.comm = comm
        self.name = name
        self.tag = tag
        w, r = comm.world, comm.rank
        self.next = self._global((r + 1) % w)
        self.prev = self._global((r - 1) % w)

    def _global(self, group_rank: int) -> int:
        if self.comm.group is None:
            return group_rank
        return dist.get_global_rank(self.comm.group, group_rank)

    def start(self, send: torch.Tensor, recv_shape: tuple[int, ...],
              recv_dtype: torch.dtype | None = None) -> PendingRecv:
        """Post ``send -> next`` and ``recv <- prev`` (``recv_shape``, send's dtype by default).

        Empty tensors are not sent: the peer knows their size from the same plan and skips them.
        """
        send = send.contiguous()
        recv = torch.empty(recv_shape, dtype=recv_dtype or send.dtype, device=send.device)
        ops = []
        if send.numel():
            ops.append(dist.P2POp(dist.isend, send, self.next, self.comm.group, self.tag))
        if recv.numel():
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.comm.group, self.tag))
        works = dist.batch_isend_irecv(ops) if ops else []
        self.comm._log(self.name, send.nbytes, recv.nbytes)
        return PendingRecv(works, recv, send)


__all__ = ["PendingRecv", "RingExchange"]
