"""Run a test body on a gloo process group of CPU processes; each call gets its own rendezvous.

Starting a process costs seconds (``import torch``, and ``transformers`` for the HF tests), a
test body often milliseconds, so by default the ranks are a pool of spawned processes kept by
this pytest process and reused from call to call: each call still runs in a new process group
(its own rendezvous file, destroyed at the end), with the environment and the global torch
settings it found restored afterwards. A call that fails or times out retires the whole pool
(a failed collective can leave the other ranks anywhere), and the next call starts a new one.
``fresh=True`` gives a call processes of its own, for bodies that must not share them.
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _run_body(rank, world, init_file, fn, args, barrier, report=None):
    """Join a new gloo group, run ``fn``, leave. ``report(error)``, if given, hears the
    traceback (or None) before the group is destroyed: a failed rank's leaving makes its peers
    fail too, and its own report must arrive first."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        if barrier:
            dist.barrier()
    except BaseException:
        if report is None:
            raise
        report(traceback.format_exc())
    else:
        if report is not None:
            report(None)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _one_thread():
    # One intra-op thread per rank: W ranks share the CI machine's 2 cores, and with the default
    # thread count a rank's float64 CPU kernels were seen to differ from the exact result by up to
    # 2e-9 in about 1 run in 50 (the same inputs on the other ranks came out exact).
    torch.set_num_threads(1)


def _entry(rank, world, init_file, fn, args, errq, barrier=True):
    _one_thread()
    try:
        _run_body(rank, world, init_file, fn, args, barrier)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise


def _serve(rank, tasks, results):
    """A pooled rank: run jobs until told to stop (``None``) or until one fails."""
    _one_thread()
    env = dict(os.environ)
    while True:
        job = tasks.get()
        if job is None:
            return
        world, init_file, fn, args, barrier = job
        deterministic = torch.are_deterministic_algorithms_enabled()
        dtype = torch.get_default_dtype()
        errors = []

        def report(error, errors=errors):
            if not errors:  # one result per job; a later failure (in leaving) ends the process
                results.put((rank, error))
            errors.append(error)

        try:
            _run_body(rank, world, init_file, fn, args, barrier, report)
        except BaseException:  # joining or leaving the group failed
            report(traceback.format_exc())
        finally:
            os.environ.clear()
            os.environ.update(env)
            torch.use_deterministic_algorithms(deterministic)
            torch.set_default_dtype(dtype)
        if any(e is not None for e in errors):
            return


class _Pool:
    def __init__(self):
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.ranks: list[tuple] = []  # (process, task queue)

    def grow(self, world: int) -> None:
        while len(self.ranks) < world:
            tasks = self.ctx.SimpleQueue()
            proc = self.ctx.Process(target=_serve, args=(len(self.ranks), tasks, self.results), daemon=True)
            proc.start()
            self.ranks.append((proc, tasks))

    def close(self) -> None:
        for proc, _ in self.ranks:
            if proc.is_alive():
                proc.kill()
            proc.join()
        self.ranks = []


_pool: _Pool | None = None


def _retire_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.close()
        _pool = None


atexit.register(_retire_pool)


def _run_pooled(fn, world, args, timeout, barrier, init_file):
    global _pool
    if _pool is not None and not all(proc.is_alive() for proc, _ in _pool.ranks):
        _retire_pool()
    if _pool is None:
        _pool = _Pool()
    pool = _pool
    pool.grow(world)
    for _, tasks in pool.ranks[:world]:
        tasks.put((world, init_file, fn, args, barrier))
    errors, deadline = [], time.monotonic() + timeout
    try:
        for _ in range(world):
            # Once a rank has failed, the others get a short grace to report theirs: one may
            # be waiting in a collective the failed rank will never join.
            wait = deadline - time.monotonic() if not errors else min(deadline - time.monotonic(), 10.0)
            rank, error = pool.results.get(timeout=max(wait, 0.01))
            if error is not None:
                errors.append((rank, error))
    except queue.Empty:
        _retire_pool()
        if not errors:
            raise TimeoutError(f"distributed test timed out after {timeout}s") from None
    if errors:
        _retire_pool()
        # The first to report is the cause as a rule; the others failed in its wake.
        rank, tb = errors[0]
        also = f" (then ranks {[r for r, _ in errors[1:]]})" if len(errors) > 1 else ""
        raise AssertionError(f"rank {rank} failed{also}:\n{tb}")


def _run_fresh(fn, world, args, timeout, barrier, init_file):
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
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


def run_distributed(fn, world: int, *args, timeout: float = 300.0, barrier: bool = True,
                    fresh: bool = False) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` CPU processes in a new gloo group; re-raise
    the first failure in the parent. ``fn`` must be importable (module level).

    ``timeout``: seconds the parent waits for the processes. ``barrier``: end with a barrier on
    every rank (off for tests in which a rank leaves the group's collectives on purpose).
    ``fresh``: new processes for this call instead of the pooled ones (see the module doc)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        run = _run_fresh if fresh else _run_pooled
        run(fn, world, args, timeout, barrier, init_file)
