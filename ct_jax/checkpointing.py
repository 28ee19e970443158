"""Run files: orbax training checkpoints (keep the last K, atomic) and the metrics CSV / plot.

Checkpoints hold one host copy of the train state (params, optimizer state, step, RNG) and a
JSON record (data sampler position, configs), so a run resumes with any device count or
parallel mode. Every file written here is complete or absent: orbax finalises a step by
renaming its temporary folder, and the CSV and plot go through a temporary file + rename.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
import threading
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ct_jax._checks import check_int
from ct_jax.io import atomic_write

STATE_ITEM, RECORD_ITEM = "state", "record"
CHECKSUMS = "checksums"  # record key: {tree path: "dtype shape crc32"} of the saved state


def all_finite(tree: Any) -> bool:
    """True when every floating-point leaf of `tree` is finite."""
    leaves = (np.asarray(leaf) for leaf in jax.tree.leaves(tree))
    return all(np.isfinite(leaf).all() for leaf in leaves if np.issubdtype(leaf.dtype, np.inexact))


def checksums(tree: Any) -> dict[str, str]:
    """{tree path: "dtype shape crc32"} of every leaf: what a restored checkpoint is checked against."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        out[jax.tree_util.keystr(path)] = f"{array.dtype} {list(array.shape)} {zlib.crc32(array.view(np.uint8)):08x}"
    return out


def _silence_closed_loop_callbacks() -> None:
    """After a failed read, tensorstore completes the other pending reads into orbax's closed
    asyncio loop, each printing an "Event loop is closed" traceback: drop exactly those."""
    previous = sys.unraisablehook
    if getattr(previous, "_ct_jax_filter", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook._ct_jax_filter = True
    sys.unraisablehook = hook


def _storable(tree: Any) -> Any:
    """`tree` with every zero-size leaf (a Transformer-XL's empty compressed memory, cmem_len=0) as a 0-d
    placeholder of its dtype: orbax cannot save zero-size arrays, and `_unstored` rebuilds them."""
    return jax.tree.map(_placeholder, tree)


def _placeholder(leaf: Any) -> Any:
    if np.size(leaf) != 0:
        return leaf
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((), leaf.dtype)
    return np.zeros((), np.asarray(leaf).dtype)


def _unstored(restored: Any, template: Any) -> Any:
    """The inverse of `_storable`: the template's zero-size leaves, empty again."""
    return jax.tree.map(_empty_like, restored, template)


def _empty_like(restored: Any, template: Any) -> Any:
    return np.zeros(np.shape(template), np.asarray(restored).dtype) if np.size(template) == 0 else restored


class DamagedCheckpointError(ValueError):
    """A checkpoint step cannot be read, or its arrays differ from the checksums saved with it."""


class Checkpoints:
    """`ocp.CheckpointManager` over `directory`: numbered steps, the last `keep` kept.

    Saving is asynchronous (call `wait` before reading the files); a step appears only once
    complete, so a run killed mid-save resumes from the previous one. Each step's record
    holds a checksum of every saved array, and `restore` verifies them.
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, async_save: bool = True):
        check_int("keep", keep)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Saves a host pytree `state` and a JSON-able `record` (plus the state's checksums) as `step`;
        refuses non-finite values."""
        if not all_finite(state):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the train state holds NaN or Inf")
        state = _storable(state)
        record = {**record, CHECKSUMS: checksums(state)}
        items = {STATE_ITEM: ocp.args.StandardSave(state), RECORD_ITEM: ocp.args.JsonSave(record)}
        try:
            self._manager.save(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax / tensorstore / the OS: name the step and the folder
            raise self._write_error(error, f"checkpoint step {step}") from error

    def _write_error(self, error: Exception, what: str) -> RuntimeError:
        """A failed (possibly background) save, as one line naming `what` and the folder."""
        message = " ".join(str(error).split())[:300]
        return RuntimeError(f"{what} could not be written to {self.directory} ({type(error).__name__}: {message})")

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        return step

    def _read(self, step: int, items: dict[str, Any]) -> Any:  # orbax Composite: item name -> value
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax / tensorstore raise many types for missing or damaged files
            _silence_closed_loop_callbacks()
            message = " ".join(str(error).split())[:300]
            raise DamagedCheckpointError(f"step {step} cannot be read ({type(error).__name__}: {message})") from error

    def read_record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of `step` (default: the latest), without reading the state."""
        step = self._step(step)
        record = self._read(step, {RECORD_ITEM: ocp.args.JsonRestore()})[RECORD_ITEM]
        if not isinstance(record, dict):
            raise DamagedCheckpointError(f"step {step}'s record is not a JSON object: {record!r:.100}")
        return record

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, record) of `step` (default: the latest), its arrays verified against the checksums
        saved with them (DamagedCheckpointError otherwise); `template` gives the state's structure."""
        step = self._step(step)
        abstract = _storable(jax.tree.map(ocp.utils.to_shape_dtype_struct, template))
        items = {STATE_ITEM: ocp.args.StandardRestore(abstract), RECORD_ITEM: ocp.args.JsonRestore()}
        restored = self._read(step, items)
        state, record = jax.device_get(restored[STATE_ITEM]), restored[RECORD_ITEM]
        got = checksums(state)  # of what was saved: zero-size leaves as placeholders
        state = _unstored(state, template)
        expected = record.get(CHECKSUMS) if isinstance(record, dict) else None
        if expected is None:  # saved before checksums were recorded: at least no NaN
            if not all_finite(state):
                raise DamagedCheckpointError(f"step {step} holds NaN or Inf (and no checksums to say where)")
            return state, record
        differ = sorted(name for name in set(got) | set(expected) if got.get(name) != expected.get(name))
        if differ:
            raise DamagedCheckpointError(
                f"step {step} fails its checksums: {len(differ)} of {len(expected)} arrays differ from what was "
                f"saved ({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''})"
            )
        return state, record

    def set_aside(self, step: int, reason: str) -> Path:
        """Moves step `step` out of the managed folder, into `<directory>-set-aside/` (nothing is deleted)."""
        aside = self.directory.parent / f"{self.directory.name}-set-aside"
        aside.mkdir(parents=True, exist_ok=True)
        target = aside / f"{step}-{reason}"
        for copy in range(1, 1000):
            if not target.exists():
                break
            target = aside / f"{step}-{reason}-{copy}"
        os.replace(self.directory / str(step), target)
        self._manager.reload()
        return target

    def reload(self) -> None:
        """Rereads the step folders (after another process moved some)."""
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (RuntimeError if one failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # raised from the save's background thread
            raise self._write_error(error, "a pending checkpoint") from error

    def close(self, timeout: float = 600.0) -> None:
        """Finishes pending saves and stops the checkpointer's threads; gives up after `timeout` seconds
        (a failed save can leave them waiting forever), so that an error is reported rather than hanging."""
        errors: list[Exception] = []

        def close() -> None:
            try:
                self._manager.close()
            except Exception as error:  # raised here, in the caller's thread
                errors.append(error)

        closer = threading.Thread(target=close, name="ct_jax-checkpoints-close", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            print(f"warning: the checkpointer of {self.directory} did not finish within {timeout:g}s; "
                  "pending saves may be incomplete (an incomplete step is never listed)", file=sys.stderr)
        if errors:
            raise self._write_error(errors[0], "a pending checkpoint") from errors[0]


def restore_newest(directory: str | os.PathLike, template: Callable[[dict[str, Any]], Any]) -> tuple[int, Any, dict]:
    """(step, state, record) of the newest checkpoint in `directory` that reads and matches its checksums, for
    readers of a run (evaluate, generate): a damaged newer step is passed over, nothing is moved or written.

    `template(record)` gives the state's structure from the step's record (its model and train configs).
    Every step in `directory` was written only once a loss at its parameters was checked (`fit`), so the
    step returned is the run's newest verified one. Raises FileNotFoundError when there is none,
    DamagedCheckpointError when none reads.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints folder {directory}")
    checkpoints = Checkpoints(directory, async_save=False)
    try:
        steps = list(reversed(checkpoints.all_steps()))
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {checkpoints.directory}")
        failures = []
        for step in steps:
            try:
                state, record = checkpoints.restore(template(checkpoints.read_record(step)), step)
                return step, state, record
            except DamagedCheckpointError as error:
                failures.append(str(error))
        raise DamagedCheckpointError(f"no checkpoint in {checkpoints.directory} can be read: " + "; ".join(failures))
    finally:
        checkpoints.close()


class MetricsLog:
    """Per-step metrics in memory, written as a CSV (atomically) and plotted to a PNG.

    One row per train step; `val_bpb` is filled on validation steps (step 0 = before training), and
    there too the memory diagnostics (`val_cmem_knockout_bpb`: bits per byte with the compressed memory
    emptied minus without; the per-layer attention masses `LAYER_FIELD`), their columns after `FIELDS`.
    """

    FIELDS = ("step", "loss", "lm", "aux", "bpb", "grad_norm", "learning_rate", "tokens_per_s", "val_bpb", "test_bpb",
              "val_bits_per_token", "val_ppl", "val_word_ppl", "test_bits_per_token", "test_ppl", "test_word_ppl",
              "val_cmem_knockout_bpb")
    # per layer (1-based), at validation: the mean attention mass on compressed memory, memory and the segment
    LAYER_FIELD = re.compile(r"val_mass_(cmem|mem|segment)_([1-9][0-9]*)")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.rows: dict[int, dict[str, float]] = {}
        self.skipped: list[int] = []  # line numbers of unreadable rows (junk, a cut line), left out
        if self.path.is_file():
            text = self.path.read_text(errors="replace").replace("\0", "")  # csv refuses NUL bytes
            reader = csv.DictReader(text.splitlines())
            for row in reader:
                try:
                    values = {key: float(value) for key, value in row.items() if self.known(key) and value}
                    step = values.pop("step")
                    if step != int(step) or step < 0:
                        raise ValueError(f"bad step {step}")
                except (TypeError, ValueError, KeyError, OverflowError):
                    self.skipped.append(reader.line_num)
                    continue
                self.rows[int(step)] = values

    @classmethod
    def known(cls, name: str | None) -> bool:
        """Whether `name` is a column: one of `FIELDS` or a per-layer `LAYER_FIELD`."""
        return name in cls.FIELDS or (name is not None and cls.LAYER_FIELD.fullmatch(name) is not None)

    def columns(self) -> tuple[str, ...]:
        """`FIELDS`, then the per-layer columns present, by layer."""
        layered = {name for row in self.rows.values() for name in row if name not in self.FIELDS}
        parts = ("cmem", "mem", "segment")

        def order(name: str) -> tuple[int, int]:
            part, layer = self.LAYER_FIELD.fullmatch(name).groups()
            return int(layer), parts.index(part)

        return self.FIELDS + tuple(sorted(layered, key=order))

    def add(self, step: int, **values: float) -> None:
        """Merges `values` into the row of `step`."""
        unknown = sorted(name for name in values if not self.known(name))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; expected a subset of {self.FIELDS[1:]} or per-layer "
                             f"columns val_mass_{{cmem,mem,segment}}_LAYER")
        self.rows.setdefault(step, {}).update({key: float(value) for key, value in values.items()})

    def truncate(self, last_step: int) -> None:
        """Drops rows after `last_step` (a resumed run replays them)."""
        self.rows = {step: row for step, row in self.rows.items() if step <= last_step}

    def column(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the rows that have `name`."""
        steps = [step for step in sorted(self.rows) if name in self.rows[step]]
        return steps, [self.rows[step][name] for step in steps]

    def write(self) -> Path:
        columns = self.columns()

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(columns)
                for step in sorted(self.rows):
                    row = self.rows[step]
                    writer.writerow([step] + [_format(row.get(name)) for name in columns[1:]])

        return atomic_write(self.path, write_csv)

    def plot(self, path: str | os.PathLike) -> Path:
        """Train (per step and smoothed) and validation bits per byte against step, as a PNG."""
        # Imported here, not for a cycle: the Agg backend must be chosen before pyplot loads, and
        # matplotlib (~0.5 s) is needed only once, at the end of a run.
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        masses = [name for name in self.columns() if name.startswith(("val_mass_cmem_", "val_mass_mem_"))]
        figure, panels = plt.subplots(2 if masses else 1, 1, figsize=(8, 8 if masses else 5), squeeze=False)
        axes = panels[0, 0]
        steps, train = self.column("bpb")
        if steps:
            axes.plot(steps, train, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
            axes.plot(steps, _smooth(train), color="tab:blue", label="train (smoothed)")
        val_steps, val = self.column("val_bpb")
        if val_steps:
            axes.plot(val_steps, val, "o-", color="tab:orange", label="validation")
        axes.set_xlabel("step")
        axes.set_ylabel("bits per byte")
        axes.grid(alpha=0.3)
        axes.legend()
        if masses:  # the memory diagnostics: where each layer's attention goes
            lower = panels[1, 0]
            for name in masses:
                part, layer = self.LAYER_FIELD.fullmatch(name).groups()
                lower.plot(*self.column(name), "o-" if part == "cmem" else "s--", markersize=3,
                           label=f"layer {layer}: {'compressed memory' if part == 'cmem' else 'memory'}")
            lower.set_xlabel("step")
            lower.set_ylabel("attention mass (validation)")
            lower.grid(alpha=0.3)
            lower.legend(fontsize="small")
        figure.tight_layout()
        try:
            return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
        finally:
            plt.close(figure)


def _format(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _smooth(values: Iterable[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count))
    return out
