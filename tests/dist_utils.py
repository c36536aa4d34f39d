"""Spawn a gloo process group on CPU for one test; each call gets its own rendezvous file."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, fn, args, errq, barrier=True):
    # One intra-op thread per rank: W ranks share the CI machine's 2 cores, and with the default
    # thread count a rank's float64 CPU kernels were seen to differ from the exact result by up to
    # 2e-9 in about 1 run in 50 (the same inputs on the other ranks came out exact).
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        fn(rank, world, *args)
        if barrier:
            dist.barrier()
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world: int, *args, timeout: float = 300.0, barrier: bool = True) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes under gloo; re-raise the
    first failure in the parent. ``fn`` must be importable (module level).

    ``timeout``: seconds the parent waits for the processes. ``barrier``: end with a barrier on
    every rank (off for tests in which a rank leaves the group's collectives on purpose)."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world, init_file, fn, args, errq, barrier))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"distributed test timed out after {timeout}s")
        if not errq.empty():
            rank, tb = errq.get()
            raise AssertionError(f"rank {rank} failed:\n{tb}")
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        assert not bad, f"worker exit codes {bad}"
