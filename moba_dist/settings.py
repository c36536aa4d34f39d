"""``Settings``: the MoBA pipeline's switches in one explicit object.

Each field has a documented ``MOBA_DIST_*`` environment override. The variables are read once,
by :meth:`Settings.from_env`, when a :class:`~moba_dist.StepPlan` is made (or, for a call without
a plan, once at the start of that call); no field is read from the environment on a layer's
path. Two variables are not fields: ``$MOBA_DIST_ATTN_BACKEND`` and ``$MOBA_DIST_RING_IMPL``
stand in for the ``backend=`` and ``impl=`` arguments and are looked up where a call resolves
them (a dictionary lookup per call, no device work); the handshake checks that ranks agree on them.
Pass ``StepPlan(..., settings=Settings(...))`` to choose in code instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

SELECTED_ENV = "MOBA_DIST_SELECTED_KERNEL"
KEEP_FETCHED_ENV = "MOBA_DIST_KEEP_FETCHED"
RECORD_ENV = "MOBA_DIST_RECORD_SELECTION"
BALANCE_ENV = "MOBA_DIST_GATE_BALANCE"
GATE_ENV = "MOBA_DIST_GATE"
KV_IN_PLACE_ENV = "MOBA_DIST_KV_IN_PLACE"

_CHOICES = {
    "selected_kernel": ("auto", "triton", "varlen"),
    "gate_balance": ("auto", "0", "1"),
    "gate": ("auto", "torch"),
}


def _flag(raw: str | None) -> bool:
    return raw not in (None, "", "0", "false", "False")


@dataclass(frozen=True)
class Settings:
    """Switches of the MoBA pipeline (speed, memory and diagnostics; none changes a result beyond
    floating-point rounding).

    Attributes:
        selected_kernel: ``"auto"`` (CUDA bf16/fp16 with ``chunk <= 512``: the fused Triton
            kernel; otherwise varlen kernels on gathered rows), ``"triton"`` (also float32, and
            on CPU under ``TRITON_INTERPRET=1``) or ``"varlen"``. ``$MOBA_DIST_SELECTED_KERNEL``.
        keep_fetched: keep the fetched K/V rows for backward instead of fetching them again.
            ``$MOBA_DIST_KEEP_FETCHED=1``.
        record_selection: ``last_stats().selection`` holds the chosen blocks.
            ``$MOBA_DIST_RECORD_SELECTION=1``.
        gate_balance: ``"auto"`` (gate on work-balanced slices when that pays), ``"1"`` always,
            ``"0"`` never (context parallel only). ``$MOBA_DIST_GATE_BALANCE``.
        gate: ``"auto"`` (the fused Triton gate on CUDA) or ``"torch"`` (the pure-PyTorch gate
            everywhere). ``$MOBA_DIST_GATE``.
        kv_in_place: on one device, the varlen selected part's forward reads its key segments in
            place when the backend can (cuDNN: ragged offsets into ``k, v``), instead of
            gathering them per batch. ``$MOBA_DIST_KV_IN_PLACE=0`` turns it off.
    """

    selected_kernel: str = "auto"
    keep_fetched: bool = False
    record_selection: bool = False
    gate_balance: str = "auto"
    gate: str = "auto"
    kv_in_place: bool = True

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"Settings.{name}: expected one of {allowed}, got {value!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise TypeError(f"Settings.{f.name} must be a bool, got {type(value).__name__}")

    @classmethod
    def from_env(cls) -> Settings:
        """The defaults with the ``MOBA_DIST_*`` overrides that are set (ValueError naming the
        variable for a value it does not accept)."""
        env = os.environ
        values = dict(
            selected_kernel=env.get(SELECTED_ENV, "auto"),
            keep_fetched=_flag(env.get(KEEP_FETCHED_ENV)),
            record_selection=env.get(RECORD_ENV, "0") == "1",
            gate_balance=env.get(BALANCE_ENV, "auto"),
            gate=env.get(GATE_ENV, "auto"),
            kv_in_place=env.get(KV_IN_PLACE_ENV, "1") not in ("0", "false", "False"),
        )
        names = {"selected_kernel": SELECTED_ENV, "gate_balance": BALANCE_ENV, "gate": GATE_ENV}
        for name, var in names.items():
            if values[name] not in _CHOICES[name]:
                raise ValueError(f"{var}: expected one of {', '.join(_CHOICES[name])}, got {values[name]!r}")
        return cls(**values)


__all__ = ["BALANCE_ENV", "GATE_ENV", "KEEP_FETCHED_ENV", "KV_IN_PLACE_ENV", "RECORD_ENV", "SELECTED_ENV",
           "Settings"]
