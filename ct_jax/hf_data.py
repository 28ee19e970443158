"""Hugging Face datasets as corpora, offline: `--data hf:PATH_OR_NAME[:CONFIG]`.

PATH is a folder written by `save_to_disk`; NAME[:CONFIG] a dataset already in the local
Hugging Face cache (nothing is downloaded: this module turns the Hub's offline mode on
unless HF_DATASETS_OFFLINE says otherwise). Rows are documents, read from a `text` column;
the splits are the dataset's own train / validation (needed) and test (if present).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by `datasets` when it is imported

import datasets  # noqa: E402  (after the offline switch above)

DATA_FLAG = "--data"
HF_PREFIX = "hf:"
REQUIRED_SPLITS, OPTIONAL_SPLITS = ("train", "validation"), ("test",)
_BATCH = 1024  # rows read per Arrow batch when iterating


class HFDocuments(Sequence[str]):
    """One split's `column` as a sequence of documents, read lazily from the Arrow files (never loaded whole)."""

    def __init__(self, dataset: datasets.Dataset, column: str):
        self.dataset, self.column = dataset, column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> str:  # one document (no slices)
        return self.dataset[int(index)][self.column]

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.select_columns([self.column]).iter(batch_size=_BATCH):
            yield from batch[self.column]


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """(path or name, config or None) of `hf:PATH_OR_NAME[:CONFIG]`; an existing path is taken whole."""
    if not isinstance(spec, str) or not spec.startswith(HF_PREFIX) or not spec.removeprefix(HF_PREFIX).strip():
        raise ValueError(f"{DATA_FLAG} must be hf:PATH_OR_NAME[:CONFIG] for a Hugging Face dataset, got {spec!r}")
    target = spec.removeprefix(HF_PREFIX)
    if Path(target).expanduser().exists() or ":" not in target:
        return target, None
    name, config = target.rsplit(":", 1)
    return name, config or None


def _load(target: str, config: str | None, spec: str) -> dict:
    # A DatasetDict (a dict of split -> Dataset); annotated as dict, since the runtime type checker cannot
    # resolve the forward reference in DatasetDict's own generic base.
    path = Path(target).expanduser()
    if path.exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise ValueError(f"{DATA_FLAG} {spec!r}: {path} is not a dataset saved with save_to_disk "
                             f"({error})") from error
        if isinstance(loaded, datasets.Dataset):
            raise ValueError(f"{DATA_FLAG} {spec!r}: {path} holds one dataset without splits; save a DatasetDict "
                             f"with splits {REQUIRED_SPLITS} (e.g. DatasetDict(train=..., validation=...))")
        return loaded
    try:
        loaded = datasets.load_dataset(target, config)
    except (OSError, ValueError) as error:  # offline ConnectionError, DatasetNotFoundError (a FileNotFoundError)
        raise ValueError(
            f"{DATA_FLAG} {spec!r}: no folder {str(path)!r}, and no dataset {target!r}"
            f"{f' (config {config!r})' if config else ''} in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}; offline, nothing is downloaded): {error}"
        ) from error
    if isinstance(loaded, datasets.Dataset):  # defensive: load_dataset without split= gives a DatasetDict
        raise ValueError(f"{DATA_FLAG} {spec!r}: {target!r} loaded as one dataset without splits")
    return loaded


def load_hf_documents(spec: str, *, column: str = "text") -> dict[str, HFDocuments]:
    """{split: documents} of a local Hugging Face dataset: train and validation, and test where it has one."""
    target, config = parse_hf_spec(spec)
    loaded = _load(target, config, spec)
    missing = [split for split in REQUIRED_SPLITS if split not in loaded]
    if missing:
        raise ValueError(f"{DATA_FLAG} {spec!r}: the dataset has splits {sorted(loaded)}, missing {missing}; "
                         f"expected {REQUIRED_SPLITS} (and optionally {OPTIONAL_SPLITS})")
    splits = {}
    for split in (*REQUIRED_SPLITS, *OPTIONAL_SPLITS):
        if split not in loaded:
            continue
        dataset = loaded[split]
        if column not in dataset.column_names:
            raise ValueError(f"{DATA_FLAG} {spec!r}: split {split!r} has columns {dataset.column_names}, "
                             f"no {column!r} column (one document per row)")
        splits[split] = HFDocuments(dataset, column)
    return splits

