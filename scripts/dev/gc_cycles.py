"""Does one MoBA forward+backward leave tensors in reference cycles (freed only when Python's
cyclic GC happens to run, so they live on into the next layers)? Runs the call with the GC off
and DEBUG_SAVEALL, then lists what the collector finds: tensors (bytes) and the frames and
object types in the cycles.

    python scripts/dev/gc_cycles.py --tokens 262144 --configs 4096:12,128:8
"""

import argparse
import gc
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import moba_dist  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=262144)
ap.add_argument("--configs", default="4096:12,128:8")
a = ap.parse_args()
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
t = a.tokens
q, k, v = (torch.randn(t, h, 128, device=dev, dtype=dt).requires_grad_() for h in (8, 2, 2))
cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
for cfg in a.configs.split(","):
    c, kk = (int(x) for x in cfg.split(":"))
    moba_dist.moba_attn_varlen(q, k, v, cu, t, c, kk).sum().backward()  # warm-up
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    for phase in ("forward", "backward"):
        if phase == "forward":
            out = moba_dist.moba_attn_varlen(q, k, v, cu, t, c, kk)
        else:
            out.sum().backward()
            del out
        found = gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
        nbytes = sum(x.untyped_storage().nbytes() for x in tensors)
        kinds = Counter(type(o).__name__ for o in gc.garbage)
        frames = Counter(f"{o.f_code.co_filename.rsplit('/', 2)[-1]}:{o.f_code.co_name}"
                         for o in gc.garbage if type(o).__name__ == "frame")
        print(f"{cfg} {phase}: {found} objects in cycles, {len(tensors)} tensors, {nbytes / 2**20:.1f} MiB; "
              f"types {kinds.most_common(12)}; frames {frames.most_common(12)}", flush=True)
        gc.garbage.clear()
    gc.set_debug(0)
    gc.enable()
    q.grad = k.grad = v.grad = None
