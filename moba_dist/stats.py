"""Statistics of the last MoBA call in this process, for users to read after a step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MoBAStats:
    """What one call of ``moba_attn_varlen``, ``moba_attn_varlen_cp``, ``ring_attn_varlen_cp``
    or ``MoBAConfig.attention`` did on this rank.

    Byte figures are per rank and count only traffic to or from *other* ranks.
    ``bytes_sent``/``bytes_received`` map a collective's name to its measured bytes
    (``kv_fetch.backward`` appears once backward has run); ``planned_fetch_bytes`` is the
    all-to-all volume the planner predicted, and ``allgather_kv_bytes`` what an all-gather of the
    whole K and V would have brought to this rank instead.
    """

    # "moba"; "full": one device, full causal attention (top-k covered every sequence, or a
    # full layer of MoBAConfig); "ring": ring attention over the group (ring_attn_varlen_cp, or
    # moba_attn_varlen_cp when top-k covered every sequence)
    path: str = "moba"
    world_size: int = 1
    rank: int = 0
    local_tokens: int = 0
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    planned_fetch_bytes: int = 0
    fetched_pairs: int = 0  # (block, kv head) items received from other ranks
    allgather_kv_pairs: int = 0  # (block, kv head) items an all-gather of K and V would bring
    allgather_kv_bytes: int = 0
    selected_blocks_per_query: float = 0.0  # mean over (query, head), current block included
    selected_kernel: str = ""  # "triton" (fused kernel) or "varlen" (backend) for the selected part
    host_syncs: int = 0  # device-to-host reads this call waited for (see moba_dist/device.py)
    # [n, Hq, topk - 1] int64 past blocks chosen by each local (query, head), global block ids
    # sorted ascending, -1 (fewer past blocks than slots) first; only with
    # MOBA_DIST_RECORD_SELECTION=1, for analysis and invariance checks.
    selection: torch.Tensor | None = None
    # Figures still on the device, read on the host when the statistics are read (so the call
    # itself does not wait for them): name -> (0-d tensor, divisor, offset) for
    # ``offset + value / divisor``.
    pending: dict = field(default_factory=dict, repr=False, compare=False)

    def resolve(self) -> MoBAStats:
        """Read the pending device figures into their fields (one device-to-host read each)."""
        for name, (value, divisor, offset) in self.pending.items():
            setattr(self, name, offset + float(value) / max(divisor, 1))
        self.pending.clear()
        return self


_last: MoBAStats | None = None


def record(stats: MoBAStats) -> None:
    global _last
    _last = stats


def last_stats() -> MoBAStats | None:
    """The :class:`MoBAStats` of the most recent call in this process of any public attention
    function (None before any). A call that raised records nothing.

    The ``bytes_*`` dicts are live: backward adds its all-to-all to them when it runs. Figures the
    call left on the device (``selected_blocks_per_query`` of a call that planned without host
    syncs) are read here."""
    return _last.resolve() if _last is not None else None
