"""Host <-> device traffic of the MoBA pipeline, in one place.

``to_host`` is the only way the pipeline reads device values on the host: every call is a host
sync on CUDA and is counted in the call's statistics, so ``MoBAStats.host_syncs`` reports what
actually happened. ``to_device`` uploads host-planned index tables with one pinned,
non-blocking copy: a plain ``.to("cuda")`` of pageable memory would stall the host until the
device caught up, which is a host sync in all but name.
"""

from __future__ import annotations

import torch


def to_host(t: torch.Tensor, stats=None) -> torch.Tensor:
    """``t`` on the CPU; counts one host sync in ``stats.host_syncs`` (when given)."""
    if stats is not None:
        stats.host_syncs += 1
    return t.cpu()


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Copy host int64 tensors to ``device`` in one transfer; returns views of one buffer.

    On CUDA the host side is staged in pinned memory and copied without blocking the host, so
    nothing waits for the device. On the CPU the tensors come back unchanged.
    """
    if torch.device(device).type == "cpu" or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1).to(torch.int64) for t in tensors])
    dev = flat.pin_memory().to(device, non_blocking=True)
    return [piece.view(t.shape) for piece, t in zip(dev.split([t.numel() for t in tensors]), tensors)]


__all__ = ["to_device", "to_host"]
