"""Byte-level training data: memory-mapped corpora and a seeded, resumable, shardable sampler.

Pure numpy. Every split is a 1-D uint8 array that is an `np.memmap` (or a view of one), so
a corpus is never loaded whole. Raw files are mapped in place; compressed files and
multi-file corpora are first written once to a cache file (atomically) and that is mapped.
`read_corpus` is the one loader: a `Corpus` of splits with the offsets where their documents
begin (a file each in a folder corpus). The samplers here and in `ct_jax.streams` share the
process sharding (`process_shard`) and resume-state checks (`sampler_state`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import sysconfig
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from ct_jax._checks import check_int
from ct_jax.io import atomic_write, remove_orphan_temps

# Standard enwik8 split (Hutter prize / Transformer-XL): train [0, 90M), validation
# [90M, 95M), test [95M, 100M). Read at call time, so tests may monkeypatch it.
ENWIK8_SPLIT_OFFSETS: tuple[int, int, int] = (90_000_000, 95_000_000, 100_000_000)
# The default corpus (stdlib sources, ~11 MB on CPython 3.11) fits under this whole.
DEFAULT_MAX_BYTES = 32 * 2**20
# Directories skipped in the default corpus: third-party code, the (huge, repetitive) test
# suites, and the IDLE / 2to3 tool trees, which are not representative library code.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
)

DEFAULT_VALIDATION_EVERY = 10  # folder corpora: every 10th file (sorted) is validation
VALIDATION_FRACTION = 0.05  # a single text file (or a folder of one file): its tail fraction is validation
_ENWIK8_NAME = re.compile(r"enwik8(\.gz|\.zip)?")
_COMPRESSED_SUFFIXES = (".gz", ".zip")
_CACHE_FORMAT = "ct_jax-data-v1"
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile)  # gzip.BadGzipFile is an OSError

Splits = dict[str, np.ndarray]  # split name -> uint8 byte array (b,)


class Corpus(NamedTuple):
    """A loaded corpus: its splits and where the documents of each begin (streams reset there)."""

    splits: Splits
    starts: dict[str, np.ndarray]  # split name -> int64 (k,) document start offsets, 0 first; one document: [0]


def one_document(splits: Splits) -> Corpus:
    """`splits` as a corpus of one document per split (enwik8, a text file)."""
    return Corpus(splits, {name: np.zeros(1, np.int64) for name in splits})


def document_offsets(sizes: list[int]) -> np.ndarray:
    """Start offsets (k,) int64 of documents of `sizes` bytes laid back to back; an empty one starts where
    the next does (or at the end), so each distinct offset inside the split is one start."""
    starts = np.unique(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    return starts[starts < max(sum(sizes), 1)]


# ---------------------------------------------------------------------------------------
# Cache: one decompression / concatenation pass, written atomically, then memory-mapped.


def default_cache_dir() -> Path:
    """Where decompressed and concatenated corpora are cached: $XDG_CACHE_HOME/ct_jax."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ct_jax"


def _fingerprint(tag: str, files: Sequence[Path], extra: str = "") -> str:
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{tag}|{extra}".encode())
    for file in files:
        stat = file.stat()
        digest.update(f"|{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _memmap(path: Path) -> np.ndarray:
    # np.memmap cannot map an empty file; an empty split is then reported by the window check.
    if os.path.getsize(path) == 0:
        return np.zeros(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


def _cached(cache_dir: str | os.PathLike | None, name: str, write: Callable[[BinaryIO], None]) -> np.ndarray:
    # atomic_write: readers (and concurrent writers, e.g. several hosts on a shared disk)
    # see either no cache file or a complete one.
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / name
    remove_orphan_temps(path)  # of a writer killed mid-write
    if not path.exists():

        def write_file(tmp: str) -> None:
            with open(tmp, "wb") as out:
                write(out)

        atomic_write(path, write_file)
    return _memmap(path)


def _zip_member(path: Path, preferred: str | None) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except _ARCHIVE_ERRORS as error:
        raise ValueError(f"{path} is not a readable zip file (corrupt or truncated?): {error}") from error
    matches = [name for name in names if preferred and name.rsplit("/", 1)[-1] == preferred]
    if len(matches) == 1:
        return matches[0]
    if len(names) == 1:
        return names[0]
    wanted = f"a member named {preferred!r} or " if preferred else ""
    raise ValueError(f"zip archive {path} must contain {wanted}exactly one file; it contains {names}")


def _open_source(path: Path, cache_dir: str | os.PathLike | None, zip_member: str | None = None) -> np.ndarray:
    """Memmap a raw file in place, or a .gz/.zip through a one-time decompressed cache."""
    if path.suffix not in _COMPRESSED_SUFFIXES:
        return _memmap(path)
    member = _zip_member(path, zip_member) if path.suffix == ".zip" else None

    def write(out: BinaryIO) -> None:
        try:
            if member is None:
                with gzip.open(path, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
            else:
                with zipfile.ZipFile(path) as archive, archive.open(member) as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        except _ARCHIVE_ERRORS as error:
            raise ValueError(f"{path} is not a readable {path.suffix[1:]} file (corrupt or truncated?): "
                             f"{type(error).__name__}: {error}") from error

    name = f"{path.name}-{_fingerprint('decompressed', [path], member or '')}.bin"
    return _cached(cache_dir, name, write)


def _concatenated(tag: str, split: str, files: Sequence[Path], cache_dir: str | os.PathLike | None) -> np.ndarray:
    expected = sum(file.stat().st_size for file in files)

    def write(out: BinaryIO) -> None:
        for file in files:
            with open(file, "rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
        if out.tell() != expected:
            raise RuntimeError(
                f"{tag} corpus files changed while being cached ({out.tell()} bytes, expected {expected})"
            )

    return _cached(cache_dir, f"{tag}-{split}-{_fingerprint(tag, files, split)}.bin", write)


# ---------------------------------------------------------------------------------------
# Corpora.


def _existing(path: str | os.PathLike, spec: str | None = None) -> Path:
    if not os.fspath(path).strip():  # Path("") is the current directory
        given = f"the data spec {spec!r} names no path" if spec is not None else "the corpus path is empty"
        raise ValueError(f"{given}; give a file or folder (or no data spec for the default corpus)")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    return path


def _walk(root: Path, keep_dir: Callable[[str], bool], keep_file: Callable[[str], bool]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if keep_dir(name)]
        found += [Path(dirpath, name) for name in filenames if keep_file(name) and Path(dirpath, name).is_file()]
    return sorted(found, key=lambda file: file.relative_to(root).as_posix())


def split_files(files: list[Path], validation_every: int, max_bytes: int | None) -> tuple[list[Path], list[Path]]:
    """(train, validation) files of a folder corpus: file i of the kept ones goes to validation iff i % k == k - 1
    (fewer than k files: no validation file; `_files_corpus` then takes the last)."""
    check_int("validation_every", validation_every, 2)
    if max_bytes is not None:
        check_int("max_bytes", max_bytes, 1)
        # Whole files only, in sorted order, skipping any that would overflow the budget
        # (a prefix would stop at the first large file, e.g. _pydecimal.py).
        kept, total = [], 0
        for file in files:
            if total + file.stat().st_size <= max_bytes:
                kept.append(file)
                total += file.stat().st_size
        files = kept
    validation = files[validation_every - 1 :: validation_every]
    train = [file for i, file in enumerate(files) if i % validation_every != validation_every - 1]
    return train, validation


def _files_corpus(
    tag: str, root: Path, files: list[Path], cache_dir: str | os.PathLike | None, validation_every: int | None,
    max_bytes: int | None, log: Callable[[str], Any] | None = None,
) -> Corpus:
    """Split sorted files into train / validation (file i goes to validation iff i % k == k - 1), a document each.

    Fewer than k files: the last file is validation; a single file: its last VALIDATION_FRACTION of bytes
    (`log` is told which rule applied)."""
    every = DEFAULT_VALIDATION_EVERY if validation_every is None else validation_every
    train, validation = split_files(files, every, max_bytes)
    kept = train + validation
    if not kept:
        raise ValueError(f"{tag} corpus at {root} has no files" + (f" within max_bytes={max_bytes}" if max_bytes
                                                                    else ""))
    if len(kept) == 1:
        data = _concatenated(tag, "all", kept, cache_dir)
        n_train = len(data) - round(len(data) * VALIDATION_FRACTION)
        if log is not None:
            log(f"{tag} corpus at {root} has one file: its last {VALIDATION_FRACTION:.0%} of bytes is validation")
        return one_document({"train": data[:n_train], "validation": data[n_train:]})
    if not validation:
        train, validation = kept[:-1], kept[-1:]
        if log is not None:
            log(f"{tag} corpus at {root} has {len(kept)} files, fewer than validation_every={every} "
                f"(--validation-every): its last file, {validation[0].relative_to(root).as_posix()}, is validation")
    parts = {"train": train, "validation": validation}
    return Corpus({name: _concatenated(tag, name, kept, cache_dir) for name, kept in parts.items()},
                  {name: document_offsets([file.stat().st_size for file in kept]) for name, kept in parts.items()})


def load_enwik8(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
    split_offsets: tuple[int, int, int] | None = None,
) -> Splits:
    """enwik8 (raw, .gz, or .zip holding `enwik8`) with the standard 90M / 5M / 5M train / validation / test split."""
    path = _existing(path)
    if path.is_dir():
        raise ValueError(f"enwik8 path {str(path)!r} is a folder; expected the enwik8 file (raw, .gz or .zip)")
    train_end, validation_end, test_end = ENWIK8_SPLIT_OFFSETS if split_offsets is None else split_offsets
    if not 0 < train_end < validation_end < test_end:
        raise ValueError(
            f"split_offsets must be increasing positive byte offsets, got {(train_end, validation_end, test_end)}"
        )
    data = _open_source(path, cache_dir, zip_member="enwik8")
    if len(data) < test_end:
        raise ValueError(
            f"enwik8 at {path} has {len(data)} bytes; the standard split needs at least {test_end} bytes "
            f"(train {train_end}, validation {validation_end - train_end}, test {test_end - validation_end}). "
            f"For a truncated or other file use the generic loader: load_corpus('text:{path}')"
        )
    return {"train": data[:train_end], "validation": data[train_end:validation_end],
            "test": data[validation_end:test_end]}


def load_text_file(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
    validation_fraction: float = VALIDATION_FRACTION,
    max_bytes: int | None = None,
) -> Splits:
    """One file (raw, .gz or single-member .zip), optionally its first max_bytes; the tail fraction is validation."""
    path = _existing(path)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    data = _open_source(path, cache_dir)
    if max_bytes is not None:
        check_int("max_bytes", max_bytes, 1)
        data = data[:max_bytes]
    if len(data) == 0:
        raise ValueError(f"text corpus {path} is empty")
    n_train = len(data) - round(len(data) * validation_fraction)
    return {"train": data[:n_train], "validation": data[n_train:]}


def load_folder(
    path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, *,
    validation_every: int | None = DEFAULT_VALIDATION_EVERY, max_bytes: int | None = None,
    log: Callable[[str], Any] | None = None,
) -> Corpus:
    """Every file under a folder (recursive, sorted by relative path, hidden names skipped), concatenated per split;
    one document per file (the split rule: `_files_corpus`)."""
    root = _existing(path)
    if not root.is_dir():
        raise ValueError(f"path must be a folder, got file {str(root)!r}")
    return _files_corpus("folder", root, folder_files(root), cache_dir, validation_every, max_bytes, log)


def folder_files(root: Path) -> list[Path]:
    """A folder corpus's files: recursive, sorted by relative path, hidden names (.git ...) skipped."""
    return _walk(root, _visible, _visible)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _stdlib_dir(name: str) -> bool:
    return name not in STDLIB_EXCLUDED_DIRS


def _python_file(name: str) -> bool:
    return name.endswith(".py")


def stdlib_source_files() -> list[Path]:
    """The default corpus's files: the stdlib's .py sources minus STDLIB_EXCLUDED_DIRS, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _walk(root, _stdlib_dir, _python_file)


def load_stdlib_corpus(
    cache_dir: str | os.PathLike | None = None, *, validation_every: int | None = DEFAULT_VALIDATION_EVERY,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Corpus:
    """Default corpus present on every machine: this Python's stdlib sources (deterministic per installation),
    one document per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _files_corpus("stdlib", root, stdlib_source_files(), cache_dir, validation_every, max_bytes)


def check_window(splits: Splits, window: int) -> None:
    """Raise ValueError naming the first split shorter than one window."""
    for name, data in splits.items():
        _require_window(data, window, name)


def fingerprint(splits: Splits, samples: int = 64, chunk: int = 4096) -> str:
    """A cheap identity of the data: each split's name, length and `samples` spread chunks, hashed.

    Recorded in checkpoints, so a resume on other data is noticed without reading a corpus whole.
    """
    digest = hashlib.sha256(_CACHE_FORMAT.encode())
    for name in sorted(splits):
        split = splits[name]
        digest.update(f"|{name}|{len(split)}|".encode())
        starts = np.unique(np.linspace(0, max(len(split) - chunk, 0), samples).astype(np.int64))
        for start in starts:
            digest.update(np.asarray(split[start : start + chunk], np.uint8).tobytes())
    return digest.hexdigest()[:16]


def _require_window(data: np.ndarray, window: int, name: str) -> None:
    check_int("window", window, 2)
    if np.ndim(data) != 1:
        raise ValueError(f"split {name!r} must be a 1-D byte array, got shape {np.shape(data)}")
    if len(data) < window:
        raise ValueError(
            f"split {name!r} has {len(data)} bytes, fewer than one window of {window} bytes "
            f"(window = n_segments * seq_len + 1)"
        )


def _parse_spec(spec: str | os.PathLike) -> tuple[str, Path]:
    """("enwik8" | "text", existing path) of a data spec; ValueError / FileNotFoundError otherwise."""
    spec = os.fspath(spec)
    if spec.startswith("enwik8:"):
        return "enwik8", _existing(spec.removeprefix("enwik8:"), spec)
    if spec.startswith("text:"):
        return "text", _existing(spec.removeprefix("text:"), spec)
    path = _existing(spec, spec)
    return ("enwik8" if _ENWIK8_NAME.fullmatch(path.name) else "text"), path


# --data hf:PATH_OR_NAME[:CONFIG], a local Hugging Face dataset: ct_jax.hf_data.HF_PREFIX, not imported from there
# (that module loads `datasets`, slow, and only a corpus of that form needs it).
HF_PREFIX = "hf:"


def _split_bytes(documents: Sequence[str], max_bytes: int | None, sizes_path: Path) -> Callable[[BinaryIO], None]:
    """The writer of a split's cache file: its rows, UTF-8, back to back (whole rows up to `max_bytes`); their
    sizes go to `sizes_path` first, so a cache file never exists without them."""

    def write(out: BinaryIO) -> None:
        sizes = []
        for document in documents:
            encoded = document.encode("utf-8")
            if max_bytes is not None and out.tell() + len(encoded) > max_bytes:
                break
            out.write(encoded)
            sizes.append(len(encoded))

        def write_sizes(tmp: str) -> None:
            with open(tmp, "wb") as file:  # a file object: np.save would add ".npy" to a name
                np.save(file, np.asarray(sizes, np.int64))

        atomic_write(sizes_path, write_sizes)

    return write


def _hf_corpus(spec: str, cache_dir: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> Corpus:
    """A local Hugging Face dataset as a byte corpus (`ct_jax.data.Corpus`): each split's rows, UTF-8, back to
    back in a cache file (written once), a document per row; `max_bytes` keeps each split's first whole rows up
    to that many bytes."""
    from ct_jax import hf_data  # imports `datasets` (slow): only for this form

    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    splits, starts = {}, {}
    for name, documents in hf_data.load_hf_documents(spec).items():
        dataset_id = getattr(documents.dataset, "_fingerprint", None) or hashlib.sha256(spec.encode()).hexdigest()
        stem = f"hf-{name}-{dataset_id[:20]}-{max_bytes or 'all'}"
        sizes_path = directory / f"{stem}.sizes.npy"
        splits[name] = _cached(directory, f"{stem}.bin", _split_bytes(documents, max_bytes, sizes_path))
        starts[name] = document_offsets(np.load(sizes_path).tolist() or [0])
    return Corpus(splits, starts)


def check_spec(spec: str | os.PathLike | None) -> None:
    """Raises as `load_corpus` would for an empty spec or a missing path, without reading any data."""
    if spec is not None and os.fspath(spec).startswith(HF_PREFIX):
        if not os.fspath(spec).removeprefix(HF_PREFIX).strip():
            raise ValueError(f"the data spec {spec!r} names no dataset; expected hf:PATH_OR_NAME[:CONFIG]")
    elif spec is not None:
        _parse_spec(spec)


def read_corpus(
    spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *, window: int | None = None,
    max_bytes: int | None = None, validation_every: int | None = None, log: Callable[[str], Any] | None = None,
) -> Corpus:
    """The one corpus loader: splits and document starts by spec. None = stdlib sources (a document per file);
    'enwik8:PATH' or a file named enwik8[.gz|.zip] = enwik8; 'text:PATH' or any other path = a text file (one
    document) or a folder (a document per file; every `validation_every`-th file is validation, default 10,
    small folders as `load_folder` says, `log` told); 'hf:PATH_OR_NAME[:CONFIG]' = a local Hugging Face dataset (a
    document per row, cached as a file per split). With `window`, every split must hold one window."""
    if validation_every is not None:
        check_int("validation_every", validation_every, 2)
    if spec is not None and os.fspath(spec).startswith(HF_PREFIX):
        corpus = _hf_corpus(os.fspath(spec), cache_dir, max_bytes=max_bytes)
    elif spec is None:
        corpus = load_stdlib_corpus(cache_dir, max_bytes=DEFAULT_MAX_BYTES if max_bytes is None else max_bytes,
                                    validation_every=validation_every)
    else:
        kind, path = _parse_spec(spec)
        if kind == "enwik8":
            if max_bytes is not None:
                raise ValueError(
                    f"max_bytes={max_bytes} does not apply to enwik8's fixed splits; use 'text:{path}' for a prefix"
                )
            corpus = one_document(load_enwik8(path, cache_dir))
        elif path.is_dir():
            corpus = load_folder(path, cache_dir, max_bytes=max_bytes, validation_every=validation_every, log=log)
        else:
            corpus = one_document(load_text_file(path, cache_dir, max_bytes=max_bytes))
    if window is not None:
        check_window(corpus.splits, window)
    return corpus


def load_corpus(
    spec: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *, window: int | None = None,
    max_bytes: int | None = None,
) -> Splits:
    """`read_corpus(...).splits`: the splits alone, for callers that need no document starts."""
    return read_corpus(spec, cache_dir, window=window, max_bytes=max_bytes).splits


# ---------------------------------------------------------------------------------------
# Batching.


def _gather(data: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    # (b,) starts -> (b, window) int32 windows; fancy indexing reads only the touched pages.
    return np.asarray(data[starts[:, None] + np.arange(window)], dtype=np.int32)


class Shard(NamedTuple):
    """This process's rows [first, first + size) of a global batch."""

    first: int
    size: int


def process_shard(batch_size: int, process_index: int, process_count: int) -> Shard:
    """The rows of process `process_index` of `process_count` in a global batch of `batch_size` (checked)."""
    check_int("batch_size", batch_size)
    check_int("process_count", process_count)
    check_int("process_index", process_index, 0, below=process_count)
    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by process_count ({process_count})")
    size = batch_size // process_count
    return Shard(process_index * size, size)


def sampler_state(state: dict[str, Any], *extra: str) -> tuple[int, int]:
    """(seed, step) of a saved sampler state, which must hold exactly the keys seed, step and `extra`."""
    keys = sorted({"seed", "step", *extra})
    if set(state) != set(keys):
        raise ValueError(f"state must have keys {{{', '.join(map(repr, keys))}}}, got {sorted(state)}")
    return check_int("state['seed']", state["seed"], 0), check_int("state['step']", state["step"], 0)


class WindowSampler:
    """Endless batches of random `window`-byte windows, int32 (batch_size // process_count, window).

    Batch `step` is drawn from np.random.default_rng([seed, step]), so the whole state is
    (seed, step) and a restored sampler continues exactly. The global batch (batch_size rows)
    is drawn identically on every process; process p takes rows [p * local, (p + 1) * local).
    """

    def __init__(
        self, data: np.ndarray, window: int, batch_size: int, seed: int, *, process_index: int = 0,
        process_count: int = 1, name: str = "train",
    ):
        _require_window(data, window, name)
        self.shard = process_shard(batch_size, process_index, process_count)
        self.data, self.window, self.batch_size = data, window, batch_size
        self.seed, self.step = check_int("seed", seed, 0), 0
        self.local_batch_size = self.shard.size

    def global_starts(self, step: int) -> np.ndarray:
        """Start offsets (batch_size,) of batch `step` across all processes."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.data) - self.window + 1, size=self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        first, size = self.shard
        starts = self.global_starts(self.step)[first : first + size]
        self.step += 1
        return _gather(self.data, starts, self.window)

    def state_dict(self) -> dict[str, int]:
        """Everything needed to resume: {'seed', 'step'} (plain ints, checkpoint-friendly)."""
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a saved state, so the next batch is the one the saved sampler would have drawn."""
        self.seed, self.step = sampler_state(state)


def eval_batches(
    data: np.ndarray, window: int, batch_size: int, max_batches: int | None = None, *, drop_remainder: bool = False,
    name: str = "validation",
) -> Iterator[np.ndarray]:
    """Deterministic sequential int32 (batch_size, window) batches for evaluation.

    Windows start every window - 1 bytes (consecutive windows share one byte), so each byte
    after the first is a target exactly once. The last batch may be short unless drop_remainder.
    """
    _require_window(data, window, name)
    check_int("batch_size", batch_size, 1)
    if max_batches is not None:
        check_int("max_batches", max_batches, 1)
    starts = np.arange((len(data) - 1) // (window - 1)) * (window - 1)
    batch_firsts = range(0, len(starts), batch_size)[:max_batches]

    def batches() -> Iterator[np.ndarray]:
        for first in batch_firsts:
            chunk = starts[first : first + batch_size]
            if drop_remainder and len(chunk) < batch_size:
                return
            yield _gather(data, chunk, window)

    return batches()


def encode_text(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 tokens (n,), e.g. a generation prompt."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode_bytes(tokens: Any) -> str:
    """Byte tokens (n,) back to text; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 255):
        raise ValueError(f"tokens must be bytes in [0, 255], got range [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
