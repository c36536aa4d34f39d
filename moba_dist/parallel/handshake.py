"""Cross-rank agreement, checked before any other communication: one all-gather, one copy.

Every context-parallel call opens with :func:`agree`. Each rank contributes one row of
:data:`ROW_WORDS` int64 words (60 today: 480 bytes):

  * its local slice length (the slice-length all-gather this replaces),
  * its local validation error, if any: a type code and the first 256 bytes of the message,
  * a fingerprint of everything that must be identical on every rank for the ranks to plan the
    same collectives and compute one consistent result (see :data:`FIELDS`): the entry point,
    ``cu_seqlens`` (its length and a 62-bit hash of its values, computed where it lives),
    ``moba_chunk_size``, ``moba_topk``, ``softmax_scale`` (bit pattern), Hq, Hkv, D, dtype,
    device type, the resolved attention backend, the requested ring implementation, whether
    deterministic algorithms are on, which optional packages import, and every ``MOBA_DIST_*``
    environment setting.

The gathered ``[W, F]`` table comes to the host in one device-to-host copy, together with this
rank's ``cu_seqlens`` when it lives on the GPU: this is host sync A of the pipeline. Then every
rank runs the same checks on the same table, so every rank raises the same error or none:

  1. a rank reported a local validation error: all raise it (same type, naming the rank);
  2. fingerprints differ: all raise :class:`RankMismatchError` naming the fields and the ranks;
  3. ``cu_seqlens`` values are invalid, or do not end at the total of the slice lengths: all
     raise ``ValueError`` (the values agree, so the verdict does).

Errors that make the handshake itself impossible raise at once, before it, on the rank that
sees them (:func:`open_group`): no initialized process group, a ``group`` that is not a process
group or does not contain the calling rank, no CUDA device for an NCCL group. Every other
argument error waits for the handshake, so no rank is left waiting in a collective.

Cost per call: ``W * 480`` bytes all-gathered (3.75 KiB at W = 8), one collective's latency
(tens of microseconds over NVLink), one small host-to-device copy of this rank's row (pinned,
non-blocking), a few tiny kernels hashing ``cu_seqlens`` on its device, and the device-to-host
copy that host sync A needed anyway; host work is microseconds.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import to_device
from ..settings import Settings
from .comm import Comm

PROTOCOL = 2  # bump when the row layout changes
MSG_BYTES = 256
ENV_PREFIX = "MOBA_DIST_"
# Settings that change what ranks compute or communicate, one field each; any other MOBA_DIST_*
# variable is covered by one catch-all field. LOCAL_ENV stays local to a rank: what it records,
# and its workspace budget (which sizes local batches only, never what is communicated).
ENV_FIELDS = ("MOBA_DIST_ATTN_BACKEND", "MOBA_DIST_RING_IMPL", "MOBA_DIST_KEEP_FETCHED",
              "MOBA_DIST_GATE_BALANCE", "MOBA_DIST_LLAMA3_HEADS_K_STRIDE")
LOCAL_ENV = ("MOBA_DIST_RECORD_SELECTION", "MOBA_DIST_WORKSPACE_BYTES")

# (key, what the error message calls it), in row order after the header.
FIELDS: tuple[tuple[str, str], ...] = (
    ("protocol", "moba_dist handshake protocol (same moba_dist version on every rank?)"),
    ("entry", "function called"),
    ("cu_len", "len(cu_seqlens)"),
    ("chunk", "moba_chunk_size"),
    ("topk", "moba_topk"),
    ("scale", "softmax_scale"),
    ("hq", "q heads (Hq)"),
    ("hkv", "k/v heads (Hkv)"),
    ("d", "head dim (D)"),
    ("dtype", "dtype of q, k, v"),
    ("device", "device type"),
    ("backend", "attention backend (backend= or $MOBA_DIST_ATTN_BACKEND, resolved)"),
    ("impl", "ring implementation (impl= or $MOBA_DIST_RING_IMPL)"),
    ("deterministic", "torch.use_deterministic_algorithms"),
    ("flash_attn", "flash-attn importable"),
    ("ring_flash_attn", "ring-flash-attn importable"),
    ("settings", "Settings.keep_fetched / gate_balance (a StepPlan's, or $MOBA_DIST_KEEP_FETCHED / "
                 "$MOBA_DIST_GATE_BALANCE)"),
    *((f"env:{name}", f"${name}") for name in ENV_FIELDS),
    ("env:other", "other MOBA_DIST_* environment variables"),
)
_HASH_WORDS = 2  # cu_seqlens value hash, appended last (computed on cu_seqlens' device)
_HEAD = 3  # [slice length, error code, message length]
_MSG_WORDS = MSG_BYTES // 8
ROW_WORDS = _HEAD + _MSG_WORDS + len(FIELDS) + _HASH_WORDS

_ERROR_TYPES = {1: ValueError, 2: TypeError, 3: RuntimeError}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPES = ("cpu", "cuda")
_P = (1 << 31) - 1  # Mersenne prime: products of two residues fit in int64
_MASK30 = (1 << 30) - 1
_MIXERS = ((0x2545F491, 0x6C078965, 0x1B873593, 0x5BD1E995),
           (0x27D4EB2F, 0x165667B1, 0x3C6EF372, 0x7F4A7C15))


class RankMismatchError(ValueError):
    """Ranks of one group called a context-parallel function with arguments or settings that
    must be identical on every rank, and are not."""


@dataclass(frozen=True)
class Agreement:
    """What the handshake established, identical on every rank (host int64 tensors)."""

    cu_seqlens: torch.Tensor  # [B + 1], validated
    offsets: torch.Tensor  # [W + 1] slice boundaries


def open_group(group, entry: str) -> Comm:
    """The :class:`Comm` of ``group``, or raise at once when no handshake is possible.

    Raises:
        RuntimeError: torch.distributed is not built in.
        TypeError: ``group`` is not a process group.
        ValueError: ``group`` is None and no default process group is initialized, or the
            calling process is not a member of ``group``.
    """
    if not dist.is_available():
        raise RuntimeError(f"{entry}: torch.distributed is not available in this PyTorch build; "
                           "use moba_dist.moba_attn_varlen on one device")
    if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(f"{entry}: group does not contain this process (new_group returned "
                         "NON_GROUP_MEMBER here); call it only on the group's ranks")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{entry}: group must be a torch.distributed.ProcessGroup or None, "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(
            f"{entry}: group={'None' if group is None else 'given'} but torch.distributed is not "
            "initialized; call torch.distributed.init_process_group(...) first (e.g. under "
            "torchrun), or on one device use moba_dist.moba_attn_varlen, or MoBAConfig.attention, "
            "which runs on one device when no process group is initialized")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{entry}: group does not contain this process (global rank "
                         f"{dist.get_rank()}); call it only on the ranks of group")
    return Comm(group)


def _gpu_only(comm: Comm) -> bool:
    backend = str(dist.get_backend(comm.group)).lower()
    return "nccl" in backend and "gloo" not in backend


def handshake_device(comm: Comm, q) -> torch.device:
    """Where the handshake row lives: q's device when the group's backend can move its tensors,
    else the backend's own device (so a bad ``q`` still reaches the handshake)."""
    gpu_only = _gpu_only(comm)
    if isinstance(q, torch.Tensor) and q.device.type in _DEVICE_TYPES and (
            q.device.type == "cuda" or not gpu_only):
        return q.device
    if gpu_only:
        if not torch.cuda.is_available():
            raise RuntimeError("the group's backend is NCCL but CUDA is not available here")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_device_for_group(comm: Comm, q: torch.Tensor) -> None:
    """Local check: the group's backend can move tensors on q's device."""
    if q.device.type != "cuda" and _gpu_only(comm):
        raise ValueError(f"q is on {q.device} but group's backend "
                         f"({dist.get_backend(comm.group)}) moves CUDA tensors only; use CUDA "
                         "tensors, or a gloo group for CPU tensors")


def _str_word(text: str | None) -> int:
    data = b"\x00unset" if text is None else text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def _float_word(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _env_words() -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and k not in LOCAL_ENV}
    words = {f"env:{name}": _str_word(env.pop(name, None)) for name in ENV_FIELDS}
    words["env:other"] = _str_word("\n".join(f"{k}={v}" for k, v in sorted(env.items())))
    return words


def _settings_word(settings: Settings) -> int:
    """The settings that change what is communicated (the backward's re-fetch, the gate's
    balancing all-to-all); the others change local work only and may differ between ranks."""
    return _str_word(f"keep_fetched={settings.keep_fetched} gate_balance={settings.gate_balance}")


def fingerprint(entry: str, q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                chunk: int, topk: int, scale: float, backend: str, impl: str,
                flash_attn: bool, ring_flash_attn: bool, settings: Settings | None = None) -> dict[str, int]:
    """This rank's host-side fingerprint words (the ``cu_seqlens`` hash is added by :func:`agree`).

    ``chunk``/``topk`` are 0 for the ring; ``backend`` is the resolved kernel backend's name,
    ``impl`` the requested ring implementation after the environment default."""
    words = {
        "protocol": PROTOCOL,
        "entry": _str_word(entry),
        "cu_len": cu_seqlens.numel(),
        "chunk": chunk,
        "topk": topk,
        "scale": _float_word(scale),
        "hq": q.shape[1],
        "hkv": k.shape[1],
        "d": q.shape[2],
        "dtype": _DTYPES.index(q.dtype) + 1 if q.dtype in _DTYPES else _str_word(str(q.dtype)),
        "device": _DEVICE_TYPES.index(q.device.type) + 1,
        "backend": _str_word(backend),
        "impl": _str_word(impl),
        "deterministic": int(torch.are_deterministic_algorithms_enabled()),
        "flash_attn": int(flash_attn),
        "ring_flash_attn": int(ring_flash_attn),
        "settings": _settings_word(settings if settings is not None else Settings.from_env()),
    }
    words.update(_env_words())
    return words


_coef_cache: dict[tuple[int, str], torch.Tensor] = {}


def _coefficients(n: int, device: torch.device) -> torch.Tensor:
    """``[2, n]`` fixed pseudo-random residues mod p, the same on every rank and build (integer
    arithmetic only, no RNG); cached per (n, device) so later calls launch no kernel for them."""
    key = (n, str(device))
    coef = _coef_cache.get(key)
    if coef is None:
        i = torch.arange(n, dtype=torch.int64)
        rows = []
        for a, b, c, d in _MIXERS:
            x = (i * a + b) % _P
            x = (x * x + c) % _P
            x = (x * x + d) % _P
            rows.append(x % (_P - 1) + 1)
        coef = to_device([torch.stack(rows)], device)[0]
        if len(_coef_cache) > 64:
            _coef_cache.clear()
        _coef_cache[key] = coef
    return coef


def cu_seqlens_hash(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 hash of the values of ``cu_seqlens`` (int32 or int64), on its device, with no
    host sync: two universal hashes mod ``2**31 - 1`` of the values' 30-bit pieces. Integer
    arithmetic, so the same on every rank, device and run."""
    x = cu_seqlens.to(torch.int64)
    # 30-bit pieces are distinct residues mod p (a 31-bit piece equal to p would hash like 0).
    words = torch.stack([x & _MASK30, (x >> 30) & _MASK30, (x >> 60) & _MASK30], 1).flatten()
    coef = _coefficients(words.numel(), x.device)
    return ((words[None, :] * coef) % _P).sum(1) % _P


def _encode_error(error: BaseException) -> list[int]:
    code = 1 if isinstance(error, ValueError) else 2 if isinstance(error, TypeError) else 3
    data = str(error).encode("utf-8")[:MSG_BYTES]
    padded = data + b"\x00" * (MSG_BYTES - len(data))
    return [code, len(data)] + [int.from_bytes(padded[i:i + 8], "little", signed=True)
                                for i in range(0, MSG_BYTES, 8)]


def _decode_message(row: list[int]) -> str:
    length = row[2]
    data = b"".join(w.to_bytes(8, "little", signed=True) for w in row[_HEAD:_HEAD + _MSG_WORDS])
    text = data[:length].decode("utf-8", "replace")
    return text + (" [...]" if length == MSG_BYTES else "")


def _describe(key: str, word: int) -> str:
    if key == "scale":
        return repr(struct.unpack("<d", struct.pack("<q", word))[0])
    if key == "dtype":
        return str(_DTYPES[word - 1]) if 1 <= word <= len(_DTYPES) else f"<{word:#x}>"
    if key == "device":
        return _DEVICE_TYPES[word - 1] if 1 <= word <= len(_DEVICE_TYPES) else f"<{word:#x}>"
    if key in ("protocol", "cu_len", "chunk", "topk", "hq", "hkv", "d"):
        return str(word)
    if key in ("deterministic", "flash_attn", "ring_flash_attn"):
        return str(bool(word))
    known = _known_strings()
    if word in known:
        return "unset" if known[word] is None else repr(known[word])
    return f"a value hashing to {word & 0xFFFFFF:06x}"


def _known_strings() -> dict[int, str | None]:
    """Strings a setting commonly holds, by hash, to show them by name in messages."""
    from ..kernels import available_backends
    from .ring_flash import IMPLS

    vocab = (*available_backends(), *IMPLS, "0", "1", "true", "false", "True", "False", "")
    return {_str_word(None): None, **{_str_word(w): w for w in vocab}}


def _groups(values: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for rank, value in enumerate(values):
        out.setdefault(value, []).append(rank)
    return out


def _raise_reported_errors(entry: str, table: list[list[int]], error: BaseException | None) -> None:
    bad = [r for r, row in enumerate(table) if row[1]]
    if not bad:
        return
    first = table[bad[0]]
    cls = _ERROR_TYPES.get(first[1], RuntimeError)
    msg = (f"{entry}: rank {bad[0]} of {len(table)} rejected its arguments: "
           f"{_decode_message(first)}")
    if len(bad) > 1:
        msg += f" (ranks {bad[1:]} rejected theirs too; see their own errors)"
    msg += " -- every rank raises this error, before any other communication"
    raise cls(msg) from error


def _raise_mismatch(entry: str, table: list[list[int]], local_env: dict[str, str | None]) -> None:
    base = _HEAD + _MSG_WORDS
    problems = []
    for j, (key, label) in enumerate(FIELDS):
        groups = _groups([row[base + j] for row in table])
        if len(groups) > 1 and key != "cu_len":
            shown = "; ".join(f"ranks {ranks}: {_describe(key, w)}" for w, ranks in groups.items())
            if key.startswith("env:"):
                here = local_env.get(key)
                shown += f"; this rank: {'unset' if here is None else repr(here)}"
            problems.append(f"{label} differs ({shown})")
    lens = _groups([row[base + 2] for row in table])
    hashes = _groups([tuple(row[-_HASH_WORDS:]) for row in table])
    if len(lens) > 1 or len(hashes) > 1:
        shown = "; ".join(f"ranks {ranks}: length {length}" for length, ranks in lens.items())
        if len(lens) == 1:
            shown = "; ".join(f"ranks {ranks}: value hash {h[0]:08x}{h[1]:08x}"
                              for h, ranks in hashes.items())
        problems.append(f"cu_seqlens differs ({shown}); it must be the global boundaries, "
                        "identical on every rank")
    if problems:
        raise RankMismatchError(
            f"{entry}: the ranks of the group disagree on what must be identical on every rank: "
            + "; ".join(problems) + " -- every rank raises this error, before any other communication")


def agree(comm: Comm, entry: str, device: torch.device, n_local: int, cu_seqlens,
          fields: dict[str, int] | None, error: BaseException | None) -> Agreement:
    """Run the handshake (one all-gather, one device-to-host copy) and raise on every rank alike.

    Args:
        comm: the group.
        entry: the public function's name (for messages).
        device: from :func:`handshake_device`.
        n_local: this rank's slice length.
        cu_seqlens: the caller's tensor; its form (type, shape, dtype, device) must have passed
            :func:`moba_dist._validation.check_cu_seqlens_form` unless ``error`` is set.
        fields: :func:`fingerprint` words, or ``None`` when ``error`` is set.
        error: this rank's local validation error, raised here on every rank.

    Returns:
        :class:`Agreement` with host ``cu_seqlens`` (int64, validated) and ``offsets [W + 1]``.
    """
    from .._validation import check_cu_seqlens_values

    ok = error is None
    head = [n_local if ok else 0] + (_encode_error(error) if not ok else [0] * (2 + _MSG_WORDS))
    words = [fields[key] for key, _ in FIELDS] if ok else [0] * len(FIELDS)
    host_row = torch.tensor(head + words, dtype=torch.int64)
    cu_on_device = ok and cu_seqlens.device.type != "cpu"
    if cu_on_device:  # hashed where it lives: no host sync
        row = torch.cat([to_device([host_row], device)[0], cu_seqlens_hash(cu_seqlens)])
    else:
        hashed = cu_seqlens_hash(cu_seqlens) if ok else torch.zeros(_HASH_WORDS, dtype=torch.int64)
        row = to_device([torch.cat([host_row, hashed])], device)[0]
    gathered = comm.all_gather(row, "handshake")  # [W, F]
    # Host sync A: the table and this rank's cu_seqlens in one copy.
    flat = torch.cat([gathered.flatten(), cu_seqlens.to(torch.int64)]) if cu_on_device else gathered.flatten()
    flat = flat.cpu()
    width = comm.world * ROW_WORDS
    table = flat[:width].view(comm.world, ROW_WORDS).tolist()

    _raise_reported_errors(entry, table, error)
    local_env = {f"env:{name}": os.environ.get(name) for name in ENV_FIELDS}
    local_env["env:other"] = "compare `env | grep MOBA_DIST_` across ranks"
    _raise_mismatch(entry, table, local_env)

    cu = flat[width:] if cu_on_device else cu_seqlens.to(torch.int64)
    check_cu_seqlens_values(cu, None)
    lens = torch.tensor([row[0] for row in table], dtype=torch.int64)
    offsets = torch.zeros(comm.world + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lens, 0)
    if int(cu[-1]) != int(offsets[-1]):
        raise ValueError(f"cu_seqlens[-1] ({int(cu[-1])}) must equal the total tokens over the "
                         f"group ({int(offsets[-1])}: slice lengths {lens.tolist()} by rank)")
    return Agreement(cu, offsets)


__all__ = ["Agreement", "FIELDS", "RankMismatchError", "ROW_WORDS", "agree", "check_device_for_group",
           "cu_seqlens_hash", "fingerprint", "handshake_device", "open_group"]
