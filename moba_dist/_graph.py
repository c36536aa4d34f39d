"""Code that ``torch.compile`` must not trace (no imports from the rest of the package, so any
module can use it)."""

from __future__ import annotations

import torch


def outside_graph(fn):
    """``fn`` wrapped to run eagerly, outside any ``torch.compile`` graph: a compiled function
    that calls it breaks its graph there once (the "function marked as skipped" break) and
    ``fn`` runs with the compiler off. ``torch._disable_dynamo`` imports the compiler only when
    the wrapper first runs; ``torch.compiler.disable`` (the fallback) would import it now,
    about a second in every process."""
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)


__all__ = ["outside_graph"]
