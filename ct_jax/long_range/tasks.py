"""Synthetic recall rows: a fact (a run of key symbols) placed at a chosen distance before its query.

A row is `n_segments * seq_len + 1` tokens of random filler symbols. The fact, a run of
`fact_len` distinct key symbols, starts `distance` tokens before the query, which repeats
the fact's first `cue_len` symbols and then the rest: the rest is predictable only by
recalling the fact. The query sits in the last segment, so every query token reads the
same memory (the memory changes only between segments): at its first token, or, for a
distance short enough to hold fact and query in one segment, with the fact at its first
token (the fact is then in the attention window).

Vocabulary: symbols `0 .. n_keys - 1` are keys, `n_keys .. n_keys + n_filler - 1` filler.
Chance on a recalled symbol is about `ln(n_keys - cue_len)` nats (the next key is one of
the keys not yet seen in the run; reported as `ln n_keys`, the uninformed guess).
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np
from jaxtyping import Bool, Int


class Span(enum.StrEnum):
    """Where the fact sits when its query is read."""

    WINDOW = "window"  # in the current segment (plain attention)
    MEMORY = "memory"  # wholly in the plain memory
    COMPRESSED = "compressed"  # wholly in the compressed span, beyond the plain memory
    BEYOND = "beyond"  # wholly beyond the compressed span (recall impossible)
    STRADDLES = "straddles"  # across a boundary (reported, not a target)


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """A family of recall rows (see the module docstring); `distances` in tokens, fact start to query start."""

    seq_len: int = 16
    n_segments: int = 4
    n_keys: int = 16
    n_filler: int = 16
    fact_len: int = 8
    cue_len: int = 1
    distances: tuple[int, ...] = (48,)

    def __post_init__(self) -> None:
        for name in ("seq_len", "n_segments", "n_keys", "n_filler", "fact_len", "cue_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.cue_len < self.fact_len <= self.n_keys:
            raise ValueError(
                f"need cue_len < fact_len <= n_keys, got cue_len={self.cue_len}, fact_len={self.fact_len}, "
                f"n_keys={self.n_keys}"
            )
        if self.fact_len > self.seq_len:
            raise ValueError(f"fact_len ({self.fact_len}) must fit in one segment (seq_len {self.seq_len})")
        object.__setattr__(self, "distances", tuple(self.distances))
        if not self.distances:
            raise ValueError("distances must name at least one distance")
        for distance in self.distances:
            fits = isinstance(distance, int) and self.fact_len <= distance <= self.last_segment
            if isinstance(distance, bool) or not fits:
                raise ValueError(
                    f"each distance must be an int in [fact_len, (n_segments - 1) * seq_len] = "
                    f"[{self.fact_len}, {self.last_segment}] (fact and query must not overlap and the fact "
                    f"must fit before the query), got {distance!r}"
                )

    @property
    def vocab(self) -> int:
        return self.n_keys + self.n_filler

    @property
    def window(self) -> int:
        """Tokens per row: `n_segments * seq_len + 1`."""
        return self.n_segments * self.seq_len + 1

    @property
    def last_segment(self) -> int:
        """Position of the last segment's first token."""
        return (self.n_segments - 1) * self.seq_len

    def query_start(self, distance: int) -> int:
        """Position of the query's first token for a fact `distance` tokens before it."""
        in_window = distance + self.fact_len <= self.seq_len
        return self.last_segment + (distance if in_window else 0)

    @property
    def chance(self) -> float:
        """Loss of the uninformed guess over the keys, nats."""
        return math.log(self.n_keys)

    def target_positions(self, distance: int) -> np.ndarray:
        """Input positions whose next token is a recalled fact symbol (the query's cue onward)."""
        start = self.query_start(distance)
        return np.arange(start + self.cue_len - 1, start + self.fact_len - 1)

    def sample(self, rng: np.random.Generator, batch: int, distance: int | None = None
               ) -> tuple[Int[np.ndarray, "b l"], Int[np.ndarray, " b"]]:
        """(tokens (batch, window) int32, distance per row): distances drawn uniformly unless given."""
        if distance is not None and distance not in self.distances:
            raise ValueError(f"distance must be one of {self.distances}, got {distance!r}")
        tokens = rng.integers(self.n_keys, self.vocab, size=(batch, self.window), dtype=np.int32)
        keys = np.argsort(rng.random((batch, self.n_keys)), axis=1)[:, : self.fact_len].astype(np.int32)
        chosen = np.full(batch, distance) if distance is not None else rng.choice(self.distances, size=batch)
        rows = np.arange(batch)[:, None]
        run = np.arange(self.fact_len)[None, :]
        starts = np.array([self.query_start(int(d)) for d in chosen])
        tokens[rows, (starts - chosen)[:, None] + run] = keys
        tokens[rows, starts[:, None] + run] = keys
        return tokens, chosen.astype(np.int32)


def span_of(task: RecallTask, distance: int, mem_len: int, covered: int) -> Span:
    """Where a fact `distance` tokens before the query sits for a model whose plain memory holds
    `mem_len` tokens and whose memories together cover `covered` tokens (mem + cmem * ratio)."""
    first = task.query_start(distance) - distance
    last = first + task.fact_len - 1
    segment_start = task.last_segment  # the query's segment: the memory ends right before it
    mem_start, cover_start = segment_start - mem_len, segment_start - covered
    if first >= segment_start:
        return Span.WINDOW
    if first >= mem_start:
        return Span.MEMORY if last < segment_start else Span.STRADDLES
    if last < mem_start and first >= cover_start:
        return Span.COMPRESSED
    if last < cover_start:
        return Span.BEYOND
    return Span.STRADDLES


def recall_mask(task: RecallTask, distances: Int[np.ndarray, " b"]) -> Bool[np.ndarray, "b n"]:
    """(batch, window - 1) True at each row's input positions whose target is a recalled symbol."""
    mask = np.zeros((len(distances), task.window - 1), bool)
    for row, distance in enumerate(distances):
        mask[row, task.target_positions(int(distance))] = True
    return mask
