"""Synthetic long-context task for scripts/train.py: key-value retrieval far back in a sequence.

One sequence of ``length`` tokens::

    BOS  [context: n_pairs (key, value) pairs at random even positions, filler tokens elsewhere]
         SEP  key_a value_a  key_b value_b  ...     (n_queries of the context's keys, asked again)

Keys are distinct within a sequence and every key owns ``n_values`` value tokens of its own; the
value of a pair is one of its key's values, drawn uniformly. Knowing the key alone therefore
narrows the answer to ``n_values`` tokens (chance accuracy ``1 / n_values``); only the pair in
the context, on average half a sequence back, tells which one. Only the answers are labelled
(every other label is -100), so the loss is the retrieval loss alone.

Training streams pack sequences of log-uniform lengths between ``min_seq_len`` and ``seq_len``:
short sequences teach the lookup quickly, long ones demand it across the whole context.
Held-out batches hold full-length sequences only, so the accuracy reported is the accuracy at
``seq_len`` tokens.

Batches are a pure function of ``(seed, split, dp_rank, step)``: all context-parallel ranks of a
data-parallel replica build the same global batch without communicating, and a resumed run sees
exactly the batches an uninterrupted run would have seen (the step is the whole data state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PAD, BOS, SEP = 0, 1, 2
_SPECIALS = 3
_SPLITS = {"train": 0, "eval": 1}


@dataclass(frozen=True)
class RetrievalTask:
    """Sizes of the retrieval task (see the module docstring).

    Vocabulary: 3 specials (PAD, BOS, SEP), ``n_filler`` filler tokens, ``n_keys`` keys, then
    ``n_values`` values for each key. ``min_seq_len=None`` means every sequence is ``seq_len``.
    """

    seq_len: int
    n_pairs: int
    n_queries: int
    n_keys: int
    n_values: int
    n_filler: int = 64
    min_seq_len: int | None = None

    def __post_init__(self):
        if self.min_seq_len is None:
            object.__setattr__(self, "min_seq_len", self.seq_len)
        for name in ("seq_len", "n_pairs", "n_queries", "n_keys", "n_values", "n_filler", "min_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_queries > self.n_pairs:
            raise ValueError(f"n_queries ({self.n_queries}) must be <= n_pairs ({self.n_pairs})")
        if self.n_pairs > self.n_keys:
            raise ValueError(f"n_pairs ({self.n_pairs}) must be <= n_keys ({self.n_keys}): keys are distinct")
        if not self.min_len <= self.min_seq_len <= self.seq_len:
            raise ValueError(
                f"need {self.min_len} <= min_seq_len <= seq_len (the shortest sequence that holds "
                f"{self.n_pairs} pairs and {self.n_queries} queries is {self.min_len} tokens), got "
                f"min_seq_len={self.min_seq_len}, seq_len={self.seq_len}")

    @property
    def min_len(self) -> int:
        """Shortest sequence with room for the pairs and queries."""
        return 2 + 2 * self.n_queries + 2 * self.n_pairs + 1

    @property
    def key0(self) -> int:
        return _SPECIALS + self.n_filler

    @property
    def value0(self) -> int:
        return self.key0 + self.n_keys

    @property
    def vocab_size(self) -> int:
        return self.value0 + self.n_keys * self.n_values

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the queried key's values."""
        return 1.0 / self.n_values

    def sequence(self, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence of ``length`` tokens: ``(input_ids, labels)``, int64 ``[length]`` on the CPU.

        Labels are the answers at the answer positions and -100 elsewhere (unshifted, HF style).
        """
        if length < self.min_len:
            raise ValueError(f"length must be >= {self.min_len}, got {length}")
        g, P, Q = generator, self.n_pairs, self.n_queries
        context = length - 2 - 2 * Q
        ids = torch.randint(_SPECIALS, self.key0, (length,), generator=g)
        ids[0] = BOS
        key_idx = torch.randperm(self.n_keys, generator=g)[:P]
        keys = self.key0 + key_idx
        values = self.value0 + key_idx * self.n_values + torch.randint(0, self.n_values, (P,), generator=g)
        # A pair starts at an even position so that it never straddles a block of an even MoBA
        # chunk size: the value's own block always holds its key.
        at = 2 + 2 * torch.randperm((context - 1) // 2, generator=g)[:P]
        ids[at], ids[at + 1] = keys, values
        asked = torch.randperm(P, generator=g)[:Q]
        q0 = 2 + context
        ids[q0 - 1] = SEP
        ids[q0::2], ids[q0 + 1::2] = keys[asked], values[asked]
        labels = torch.full_like(ids, -100)
        labels[q0 + 1::2] = ids[q0 + 1::2]
        return ids, labels

    def lengths(self, n_tokens: int, generator: torch.Generator) -> list[int]:
        """Training sequence lengths, log-uniform in ``[min_seq_len, seq_len]``, summing to
        ``n_tokens``. A remainder too short for the layout becomes a filler-only sequence."""
        lo, hi = math.log(self.min_seq_len), math.log(self.seq_len)
        out, left = [], n_tokens
        while left >= self.min_seq_len:
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            out.append(min(left, round(math.exp(lo + u * (hi - lo)))))
            left -= out[-1]
        if out and out[-1] < self.min_seq_len:  # the draw was cut by the end of the stream
            left += out.pop()
        return out + ([left] if left else [])

    def sample(self, n_tokens: int, generator: torch.Generator, *, full_length: bool = False):
        """Sequences packed into one stream of ``n_tokens``: ``(input_ids, position_ids, labels)``,
        int64 ``[n_tokens]`` on the CPU; position ids restart at 0 at each sequence.

        ``full_length``: every sequence has ``seq_len`` tokens (``n_tokens`` must be a multiple
        of it), as in evaluation; otherwise lengths vary as in :meth:`lengths`.
        """
        if full_length:
            if n_tokens % self.seq_len:
                raise ValueError(f"n_tokens ({n_tokens}) must be a multiple of seq_len ({self.seq_len})")
            lengths = [self.seq_len] * (n_tokens // self.seq_len)
        else:
            lengths = self.lengths(n_tokens, generator)
        ids, labels = [], []
        for n in lengths:
            if n >= self.min_len:
                i, y = self.sequence(n, generator)
            else:  # filler only, nothing to predict
                i = torch.randint(_SPECIALS, self.key0, (n,), generator=generator)
                i[0] = BOS
                y = torch.full_like(i, -100)
            ids.append(i)
            labels.append(y)
        pos = torch.cat([torch.arange(n) for n in lengths])
        return torch.cat(ids), pos, torch.cat(labels)


def batch_generator(seed: int, split: str, dp_rank: int, step: int) -> torch.Generator:
    """The generator of one batch: distinct streams for each (seed, split, dp rank, step)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {tuple(_SPLITS)}, got {split!r}")
    mixed = (((seed * 1_000_003 + _SPLITS[split]) * 1_000_033 + dp_rank) * 1_000_037 + step) % (2**63)
    return torch.Generator().manual_seed(mixed)


def make_batch(task: RetrievalTask, n_tokens: int, *, seed: int, split: str, dp_rank: int, step: int):
    """One packed batch of ``n_tokens``: ``(input_ids, position_ids, labels)``, int64 ``[1, T]`` on
    the CPU. Held-out (``split="eval"``) batches hold full-length sequences only."""
    ids, pos, labels = task.sample(n_tokens, batch_generator(seed, split, dp_rank, step),
                                   full_length=split == "eval")
    return ids[None], pos[None], labels[None]
