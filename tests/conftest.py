import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter here. The mode is read when Triton is first
    # imported, and other tests may import it indirectly (PyTorch's compiler, on
    # torch.use_deterministic_algorithms), so it is set before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread per test process: the suite runs as `pytest -n 2` on 2 cores, beside the
# processes the tests spawn, and the kernels here are small, so more threads only spin and wait
# for each other (a 2-second test was seen taking 36 s in the full suite). Spawned processes
# and subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
