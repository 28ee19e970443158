"""TensorBoard event files beside a run's metrics.csv: the same scalars, for people watching a run live."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event

# metrics.csv column -> TensorBoard tag; a per-layer column `val_mass_{part}_{layer}` -> memory/mass_{part}/layer{layer}
TAGS = {
    "loss": "train/loss", "lm": "train/loss_per_token", "aux": "train/aux_loss", "bpb": "train/bits_per_byte",
    "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate", "tokens_per_s": "train/tokens_per_s",
    "val_bpb": "validation/bits_per_byte", "val_bits_per_token": "validation/bits_per_token",
    "val_ppl": "validation/perplexity", "val_word_ppl": "validation/word_perplexity",
    "val_cmem_knockout_bpb": "memory/compressed_knockout_bits_per_byte",
    "test_bpb": "test/bits_per_byte", "test_bits_per_token": "test/bits_per_token", "test_ppl": "test/perplexity",
    "test_word_ppl": "test/word_perplexity",
}


def tag(column: str) -> str:
    """The TensorBoard tag of a metrics.csv column."""
    if column.startswith("val_mass_"):
        part, layer = column.removeprefix("val_mass_").rsplit("_", 1)
        return f"memory/mass_{part}/layer{layer}"
    return TAGS.get(column, column)


class EventLog:
    """Scalars written as TensorBoard events into `directory` (tensorboardX). `first_step`: a resumed
    run's step; events after it from the interrupted run are purged (TensorBoard shows one curve)."""

    def __init__(self, directory: str | os.PathLike, first_step: int = 0):
        self.directory = Path(directory)
        self.writer = SummaryWriter(str(self.directory), purge_step=first_step or None, flush_secs=30)

    def add(self, step: int, **values: float) -> None:
        """Writes `values` (metrics.csv columns) at `step`."""
        for column, value in values.items():
            self.writer.add_scalar(tag(column), float(value), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_scalars(directory: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] of the event files in `directory`, in the order written (TFRecords
    read without TensorBoard; a resumed run's purge is not applied: its steps may repeat)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos + 12 <= len(data):  # a record: length (u64), its crc (u32), the event, the event's crc (u32)
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
