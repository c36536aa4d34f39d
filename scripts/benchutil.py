"""Shared helpers for the GPU scripts: timing with CUDA events, peak memory, FLOP counts."""

from __future__ import annotations

import statistics
import time

import torch


def init_distributed(cpu: bool) -> tuple[int, int, torch.device, torch.dtype]:
    """Start the default process group (gloo on CPU, NCCL on GPU) and pick this rank's device
    and dtype: ``(rank, world, device, dtype)``."""
    import os

    import torch.distributed as dist

    dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        return rank, world, torch.device("cpu"), torch.float32
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(dev)
    return rank, world, dev, torch.bfloat16


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fwd_bwd(fn, inputs, grad, warmup: int = 1, iters: int = 3) -> tuple[float, float]:
    """Median milliseconds of ``fn(*inputs).backward(grad)`` and peak memory (GiB) during it.

    ``inputs`` must be leaf tensors with ``requires_grad``; their grads are cleared each time."""
    dev = inputs[0].device
    cuda = dev.type == "cuda"
    times = []
    for i in range(warmup + iters):
        for t in inputs:
            t.grad = None
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            t0 = time.perf_counter()
        fn(*inputs).backward(grad)
        if cuda:
            stop.record()
            torch.cuda.synchronize(dev)
            ms = start.elapsed_time(stop)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def causal_flops(total: int, heads: int, head_dim: int) -> float:
    """fwd+bwd FLOPs of full causal attention over one sequence: fwd 4*T^2/2*H*D, bwd 2.5x fwd."""
    return 3.5 * 4 * total * total / 2 * heads * head_dim


def moba_flops(total: int, heads: int, head_dim: int, chunk: int, topk: int) -> float:
    """fwd+bwd FLOPs of the attention MoBA must do: each query reads min(pos+1, ~topk*chunk) keys
    (past blocks are full; the current block is causal, counted at half)."""
    pos = torch.arange(total, dtype=torch.float64)
    own = (pos % chunk) + 1
    past = torch.clamp(torch.div(pos, chunk, rounding_mode="floor"), max=topk - 1) * chunk
    return 3.5 * 4 * float((own + past).sum()) * heads * head_dim
