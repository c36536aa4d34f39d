"""The README's code runs as printed: its snippets fenced as ```python name=quickstart|cp|hf|generate-cp are
extracted and executed, the CP, HF and CP-generation ones on 2 spawned CPU processes under gloo (each snippet
initializes its process group from torchrun's environment variables, set here per rank), and their
results are checked against the one-process functions on the same inputs."""

from __future__ import annotations

import os
import re
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

README = Path(__file__).resolve().parent.parent / "README.md"
WORLD = 2


def snippet(name: str) -> str:
    found = re.findall(rf"^```python name={name}\n(.*?)^```", README.read_text(), re.S | re.M)
    assert len(found) == 1, f"README.md: expected one ```python name={name} block, found {len(found)}"
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(name: str, port: int, rank: int) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    ns: dict = {"__name__": "__main__"}
    exec(compile(snippet(name), f"README.md[{name}]", "exec"), ns)
    return ns


def _check_cp(ns: dict) -> None:
    import moba_dist

    q, k, v = (t.clone().requires_grad_() for t in (ns["q"], ns["k"], ns["v"]))
    cu = ns["cu_seqlens"]
    out = moba_dist.moba_attn_varlen(q, k, v, cu, max_seqlen=int(cu.diff().max()),
                                     moba_chunk_size=64, moba_topk=3)
    out.sum().backward()
    lo, hi = ns["lo"], ns["hi"]
    for got, want in [(ns["out_local"], out[lo:hi]), (ns["q_local"].grad, q.grad[lo:hi]),
                      (ns["k_local"].grad, k.grad[lo:hi]), (ns["v_local"].grad, v.grad[lo:hi])]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert ns["full_local"].shape == ns["q_local"].shape and torch.isfinite(ns["full_local"]).all()
    # The StepPlan loop: four layers, as four one-device calls on the whole stream.
    h = q.detach()
    for _ in range(4):
        h = moba_dist.moba_attn_varlen(h, k.detach(), v.detach(), cu, int(cu.diff().max()), 64, 3)
    torch.testing.assert_close(ns["h"], h[lo:hi], rtol=1e-5, atol=1e-5)
    assert ns["plan"].calls == 4 and ns["plan"].host_syncs == 5


def _worker(rank: int, ports: tuple[int, int, int], results) -> None:
    torch.set_num_threads(1)
    try:
        _check_cp(_run("cp", ports[0], rank))
        ns = _run("hf", ports[1], rank)
        import moba_dist.hf

        # The one-process loss of the same batch (outside the block: plain moba_attn_varlen).
        ids, pos = ns["ids"], ns["pos"]
        full = ns["model"](input_ids=ids, position_ids=pos, labels=ids,
                           shift_labels=moba_dist.hf.shift_labels(ids, pos)).loss
        grads = all(p.grad is not None for p in ns["model"].parameters())
        gen = _run("generate-cp", ports[2], rank)
        model = gen["model"]
        cache = moba_dist.hf.MoBACache(model.config)
        want = model.generate(gen["ids"], max_new_tokens=8, do_sample=False,
                              **moba_dist.hf.cache_kwargs(model, cache))
        assert gen["out"].equal(want), "README generate-cp: tokens differ from one process"
        results.put((rank, None, float(ns["loss"]), float(full), grads))
    except BaseException:
        results.put((rank, traceback.format_exc(), None, None, None))
        raise


def test_quickstart_snippet_runs():
    ns: dict = {"__name__": "__main__"}
    exec(compile(snippet("quickstart"), "README.md[quickstart]", "exec"), ns)
    assert ns["out"].shape == ns["q"].shape and ns["q"].grad is not None


def test_cp_hf_and_generate_cp_snippets_run_on_two_ranks():
    pytest.importorskip("transformers")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    ports = (_free_port(), _free_port(), _free_port())
    procs = [ctx.Process(target=_worker, args=(r, ports, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    for p in procs:
        if p.is_alive():
            p.kill()
            raise TimeoutError("README snippets timed out")
    got = [results.get() for _ in range(WORLD) if not results.empty()]
    for rank, tb, *_ in got:
        assert tb is None, f"rank {rank} failed:\n{tb}"
    assert len(got) == WORLD and all(p.exitcode == 0 for p in procs)
    losses = [r[2] for r in got]
    full = got[0][3]
    assert abs(sum(losses) - full) <= 1e-5 * abs(full), (losses, full)
    assert all(r[4] for r in got), "some parameters got no gradient"
