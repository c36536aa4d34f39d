"""Collectives for context parallelism, each in one place, each recording the bytes it moves.

Every differentiable collective is one ``torch.autograd.Function`` with its backward beside its
forward. Works on NCCL (CUDA tensors) and gloo (CPU tensors).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Comm:
    """A process group plus a byte ledger: ``sent[name]``/``received[name]`` per collective."""

    def __init__(self, group=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def _log(self, name: str, sent: int, received: int) -> None:
        self.sent[name] = self.sent.get(name, 0) + sent
        self.received[name] = self.received.get(name, 0) + received

    def all_gather(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``[W, *x.shape]``: every rank's ``x`` (same shape on all ranks). Not differentiable."""
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x.contiguous(), group=self.group)
        self._log(name, x.nbytes, x.nbytes * (self.world - 1))
        return torch.stack(out)

    def all_to_all_rows(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                        name: str) -> torch.Tensor:
        """Rows ``x[sum(send_splits[:d]) : ...]`` go to rank d; returns received rows in source
        order. Differentiable: the gradient of received rows travels back to their senders."""
        return _AllToAllRows.apply(x, send_splits, recv_splits, self, name)

    def start_all_to_all(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
                         name: str) -> PendingAllToAll:
        """Post the all-to-all of :meth:`all_to_all_rows` without waiting (not differentiable):
        compute issued before :meth:`PendingAllToAll.wait` overlaps with the transfer."""
        return _all_to_all(x, send_splits, recv_splits, self, name, async_op=True)


class PendingAllToAll:
    """An all-to-all in flight; :meth:`wait` returns the received rows (source order)."""

    def __init__(self, work, out: torch.Tensor, keep: torch.Tensor):
        self._work = work
        self._out = out
        self._keep = keep  # the send buffer must outlive the transfer

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        self._work = self._keep = None
        return self._out


def _all_to_all(x, send_splits, recv_splits, comm: Comm, name: str, async_op: bool = False):
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    work = dist.all_to_all_single(out, x, recv_splits, send_splits, group=comm.group,
                                  async_op=async_op)
    row = x[0].nbytes if x.shape[0] else out[0].nbytes if out.shape[0] else 0
    me = comm.rank
    comm._log(name, row * (sum(send_splits) - send_splits[me]),
              row * (sum(recv_splits) - recv_splits[me]))
    return PendingAllToAll(work, out, x) if async_op else out


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, comm, name):
        ctx.args = (send_splits, recv_splits, comm, name)
        return _all_to_all(x, send_splits, recv_splits, comm, name)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, comm, name = ctx.args
        return _all_to_all(grad, recv_splits, send_splits, comm, name + ".backward"), None, None, None, None
