"""Streams of documents cut into segments: training batches with memory carried across steps,
and whole-split evaluation streams.

A split is a 1-D byte array holding its documents back to back (`document_starts` gives
where each begins: the files of a folder corpus; enwik8 or a text file is one document). A
stream walks through the split segment by segment: a segment holds up to `seq_len` inputs
of one document and their next-byte targets. When a document has nothing left to predict,
its last segment is padded (mask False, targets ignored) and the stream's next segment
starts the next document with `reset` set, so that row's memory is emptied first: no
segment mixes two documents and no padding is learned. A window of tokens from empty memory
is a `StreamBatch` too (`StreamBatch.from_windows`): the one batch type the losses take.
Pure numpy, like `ct_jax.data`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from ct_jax import data as datalib
from ct_jax._checks import check_int

IGNORE_INDEX = -100  # a target not counted (padding), as upstream's AutoregressiveWrapper


class StreamBatch(NamedTuple):
    """`n` segments of `seq_len` for each of `b` rows; `resets[r, s]`: empty row r's memory before segment s.

    The arrays are numpy from the samplers, jax inside a compiled step.
    """

    inputs: np.ndarray  # (b, n * seq_len) int32, 0 where padded
    targets: np.ndarray  # (b, n * seq_len) int32, IGNORE_INDEX where padded
    mask: np.ndarray | None  # (b, n * seq_len) bool, True = real input token; None: all real
    resets: np.ndarray  # (b, n) bool

    @classmethod
    def from_windows(cls, tokens: Any, seq_len: int, mask: Any = None, *, reset: bool = True) -> StreamBatch:
        """Windows of tokens (b, l) as a batch: inputs `tokens[:, :-1]`, targets `tokens[:, 1:]`, cut into
        segments of `seq_len` (the last may be shorter), every row reset before segment 0 (`reset=False`:
        the rows continue from the memories they are given). `mask` covers the inputs (l - 1) or the
        whole window (l; its last entry is dropped, as upstream); None: every token is real."""
        if tokens.ndim != 2 or tokens.shape[1] < 2:
            raise ValueError(f"tokens must have shape (batch, n * seq_len + 1) with length >= 2, got {tokens.shape}")
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if mask is not None:
            if mask.shape == tokens.shape:
                mask = mask[:, :-1]
            if mask.shape != inputs.shape:
                raise ValueError(f"mask must have shape {tokens.shape} or {inputs.shape}, got {mask.shape}")
        resets = np.zeros((tokens.shape[0], -(-inputs.shape[1] // check_int("seq_len", seq_len))), bool)
        resets[:, 0] = reset
        return cls(inputs, targets, mask, resets)


def document_starts(spec: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """`data.read_corpus(spec, max_bytes=...).starts`: where each split's documents begin (kept for callers)."""
    return datalib.read_corpus(spec, max_bytes=max_bytes).starts


def check_starts(split: np.ndarray, starts: np.ndarray | None, name: str = "split") -> np.ndarray:
    """Validated document starts of `split` (None: one document), as int64 (k,)."""
    if starts is None:
        starts = np.zeros(1, np.int64)
    starts = np.asarray(starts, np.int64)
    increasing = starts.ndim == 1 and len(starts) and starts[0] == 0 and np.all(np.diff(starts) > 0)
    if not increasing or starts[-1] >= len(split):
        raise ValueError(
            f"document starts of {name} must be increasing offsets from 0 below its length {len(split)}, got {starts}"
        )
    if not np.any(np.diff(np.append(starts, len(split))) >= 2):
        raise ValueError(f"{name} has no document of 2 bytes or more: nothing to predict")
    return starts


class _Walker:
    """Cuts a split into segments: `segment(pos, limit, reset, wrap)` -> (start, inputs, reset, next pos,
    next reset)."""

    def __init__(self, split: np.ndarray, starts: np.ndarray, seq_len: int):
        self.length, self.seq_len = len(split), seq_len
        self.starts, self.ends = starts, np.append(starts[1:], len(split))

    def document_end(self, pos: int) -> int:
        return int(self.ends[np.searchsorted(self.starts, pos, side="right") - 1])

    def segment(self, pos: int, limit: int, reset: bool, wrap: bool) -> tuple[int, int, bool, int, bool] | None:
        """The next segment at `pos` (inputs stop before `limit`), or None when the stream is done."""
        end = min(self.document_end(pos), limit)
        while end - pos < 2:  # nothing left to predict in this document: the next one, from empty memory
            if end >= limit:
                if not wrap:
                    return None
                end = 0
            pos, reset = end, True
            end = min(self.document_end(pos), limit)
        n_inputs = min(self.seq_len, end - 1 - pos)
        if n_inputs == self.seq_len:
            return pos, n_inputs, reset, pos + n_inputs, False
        return pos, n_inputs, reset, end, True  # a padded segment ends its document: the next starts afresh


def _fill(split: np.ndarray, batch: StreamBatch, row: int, column: int, start: int, n_inputs: int) -> None:
    chunk = np.asarray(split[start : start + n_inputs + 1], np.int32)
    batch.inputs[row, column : column + n_inputs] = chunk[:-1]
    batch.targets[row, column : column + n_inputs] = chunk[1:]
    batch.mask[row, column : column + n_inputs] = True


def _empty_batch(rows: int, segments: int, seq_len: int) -> StreamBatch:
    shape = (rows, segments * seq_len)
    return StreamBatch(np.zeros(shape, np.int32), np.full(shape, IGNORE_INDEX, np.int32), np.zeros(shape, bool),
                       np.zeros((rows, segments), bool))


class StreamSampler:
    """Endless training batches: `batch_size` parallel streams, each advanced `n_segments` segments per step.

    Stream i starts at offset `(shift + i * len // batch_size) % len` (shift drawn from
    `seed`; mid-document starts are fine: memory starts empty) and walks the split in
    order, wrapping at its end. Every process follows all streams' positions (cheap) and
    gathers only its own rows [p * local, (p + 1) * local), so the state is global:
    `{seed, step, positions, resets}`, plain ints and bools for the checkpoint record.
    """

    def __init__(self, split: np.ndarray, starts: np.ndarray | None, seq_len: int, n_segments: int, batch_size: int,
                 seed: int, *, process_index: int = 0, process_count: int = 1, name: str = "train"):
        check_int("seq_len", seq_len)
        check_int("n_segments", n_segments)
        self.shard = datalib.process_shard(batch_size, process_index, process_count)
        if np.ndim(split) != 1 or len(split) < 2:
            raise ValueError(f"split {name!r} must be a 1-D byte array of 2 bytes or more, got shape {np.shape(split)}")
        self.split, self.seq_len, self.n_segments, self.batch_size = split, seq_len, n_segments, batch_size
        self.walker = _Walker(split, check_starts(split, starts, name), seq_len)
        self.local_batch_size, self.first_row = self.shard.size, self.shard.first
        self.seed, self.step = check_int("seed", seed, 0), 0
        shift = int(np.random.default_rng(self.seed).integers(0, len(split)))
        self.positions = [(shift + i * len(split) // batch_size) % len(split) for i in range(batch_size)]
        self.resets = [True] * batch_size

    def __iter__(self) -> Iterator[StreamBatch]:
        return self

    def __next__(self) -> StreamBatch:
        batch = _empty_batch(self.local_batch_size, self.n_segments, self.seq_len)
        for stream in range(self.batch_size):
            pos, reset, row = self.positions[stream], self.resets[stream], stream - self.first_row
            for s in range(self.n_segments):
                start, n_inputs, this_reset, pos, reset = self.walker.segment(pos, len(self.split), reset, wrap=True)
                if 0 <= row < self.local_batch_size:
                    _fill(self.split, batch, row, s * self.seq_len, start, n_inputs)
                    batch.resets[row, s] = this_reset
            self.positions[stream], self.resets[stream] = pos, reset
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume (plain ints and bools, checkpoint-friendly)."""
        return {"seed": self.seed, "step": self.step, "positions": list(map(int, self.positions)),
                "resets": list(map(bool, self.resets))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a saved state, so the next batch is the one the saved sampler would have drawn."""
        seed, step = datalib.sampler_state(state, "positions", "resets")
        positions, resets = [int(p) for p in state["positions"]], [bool(r) for r in state["resets"]]
        if len(positions) != self.batch_size or len(resets) != self.batch_size:
            raise ValueError(f"state holds {len(positions)} streams, this sampler has batch_size={self.batch_size}")
        if any(not 0 <= p < len(self.split) for p in positions):
            raise ValueError(f"state['positions'] must lie in [0, {len(self.split)}), got {positions}")
        self.seed, self.step, self.positions, self.resets = seed, step, positions, resets


def evaluation_streams(split: np.ndarray, starts: np.ndarray | None, seq_len: int, batch_size: int,
                       name: str = "validation") -> StreamBatch:
    """The whole split as `batch_size` contiguous streams of equal length (the remainder dropped), cut into segments.

    Row i covers bytes [i * S, (i + 1) * S), S = len // batch_size, and every byte of it is a
    target exactly once except the row's first byte and the first byte of each document
    (predicted from empty memory they would carry no context: they are not counted). Rows
    with fewer segments are padded at the end with empty segments. Returns one StreamBatch
    of all the segments, (b, n_max * seq_len).
    """
    check_int("seq_len", seq_len)
    check_int("batch_size", batch_size)
    starts = check_starts(split, starts, name)
    length = len(split) // batch_size
    if length < 2:
        raise ValueError(f"{name} ({len(split)} bytes) is too short for {batch_size} streams of 2 bytes or more")
    walker = _Walker(split, starts, seq_len)
    plans = []
    for row in range(batch_size):
        plan, pos, limit, reset = [], row * length, (row + 1) * length, True
        while (segment := walker.segment(pos, limit, reset, wrap=False)) is not None:
            _, _, _, pos, reset = segment
            plan.append(segment[:3])
        plans.append(plan)
    n_max = max(len(plan) for plan in plans)
    batch = _empty_batch(batch_size, n_max, seq_len)
    for row, plan in enumerate(plans):
        for s, (start, n_inputs, reset) in enumerate(plan):
            _fill(split, batch, row, s * seq_len, start, n_inputs)
            batch.resets[row, s] = reset
    return batch
