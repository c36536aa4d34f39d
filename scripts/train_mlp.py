"""Sequence-chunked MLPs for long-context training (a train.py helper).

At 1M tokens a decoder layer's MLP intermediates (``[T, intermediate]`` for the gate and up
projections, their activation and product, and their gradients) are the largest tensors of the
step, larger than attention's. :func:`chunk_mlps` makes each layer's MLP run over the sequence
in chunks of ``chunk`` tokens, each under its own (non-reentrant) activation checkpoint: only the
chunk's input is kept, the intermediates exist for one chunk at a time, in forward and in the
recompute of backward. The result is the same function (an MLP acts on each token alone), at
the cost of one more MLP forward per chunk in backward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def chunked_forward(forward, chunk: int):
    """``forward`` (an MLP's, ``[..., S, H] -> [..., S, H]``) applied in chunks of ``chunk``
    positions along ``S``, each chunk under a non-reentrant checkpoint."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] <= chunk:
            return forward(x)
        parts = [checkpoint(forward, piece, use_reentrant=False) for piece in x.split(chunk, dim=-2)]
        return torch.cat(parts, dim=-2)

    run.chunk = chunk
    return run


def chunk_mlps(layers, chunk: int) -> None:
    """Make every decoder layer's ``mlp`` run chunked (its ``forward`` is wrapped on the
    instance: parameter names, and so checkpoints, are unchanged)."""
    for layer in layers:
        if not hasattr(layer.mlp.forward, "chunk"):
            layer.mlp.forward = chunked_forward(layer.mlp.forward, chunk)
