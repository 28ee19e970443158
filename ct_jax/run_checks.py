"""Checks a training run makes before it trains: the data's token ids against the model, and a
checkpoint's record against the settings and data of the run resuming it.

A refusal names what changed (old -> new) and what to do: rerun with the old values, or
train afresh in another output folder. It never advises discarding healthy checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ct_jax.config import ModelConfig
from ct_jax.data import Splits
from ct_jax.tokenizers import Tokenizer
from ct_jax.training import DataOrder, TrainConfig


def check_token_ids(splits: Splits, num_tokens: int, tokenizer: Tokenizer | None = None) -> None:
    """Refuses data holding ids outside [0, num_tokens) before any training (a step would give NaN losses),
    naming the split's largest id, the model's range and the tokenizer that made the ids."""
    for name, split in splits.items():
        if len(split) == 0 or (split.dtype == np.uint8 and num_tokens >= 256):
            continue
        low, high = int(np.min(split)), int(np.max(split))
        if low < 0 or high >= num_tokens:
            made_by = (f" ({tokenizer.spec}, vocabulary {tokenizer.vocab_size})" if tokenizer is not None
                       else " (byte data needs num_tokens >= 256)" if split.dtype == np.uint8 else "")
            raise ValueError(f"num_tokens={num_tokens} (--num-tokens) is too small for the data: the {name} split "
                             f"holds token ids up to {high}; the model reads ids in [0, {num_tokens}){made_by}: "
                             f"give --num-tokens >= {high + 1}, or leave it out to take the tokenizer's vocabulary")


def _flag(name: str, value: Any) -> str:
    """A setting as the train command's flag: `--dim 32`, `--no-remat`, `--memory-layers 1,2`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    if isinstance(value, list | tuple):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def _changes(now: dict[str, Any], before: dict[str, Any], names: Any = None) -> dict[str, tuple[Any, Any]]:
    """{name: (checkpoint's value, now)} of the settings (`names`, default all of `now`) that differ."""
    return {name: (before.get(name), now.get(name)) for name in (now if names is None else names)
            if before.get(name) != now.get(name)}


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changes.items())


def _restore_with(changes: dict[str, tuple[Any, Any]]) -> str:
    return " ".join(_flag(name, old) for name, (old, _) in changes.items() if old is not None)


def _state_shaping(train_config: dict[str, Any]) -> dict[str, Any]:
    """The training settings the saved state's structure depends on (optimizer state, carried memory)."""
    streams = train_config.get("data_order") == "streams"
    return dict(data_order=train_config.get("data_order"), optimizer=train_config.get("optimizer"),
                gradient_clipping=train_config.get("grad_clip_norm") != 0,
                batch_size=train_config.get("batch_size") if streams else None)


def check_record(record: dict[str, Any], model_config: ModelConfig, config: TrainConfig, data_fingerprint: str,
                  data_sizes: dict[str, int], directory: Path) -> list[str]:
    """Refuses a checkpoint that cannot be resumed with these settings or this data, naming what changed and
    what to do (its files are healthy and stay); returns warnings of what changed and still resumes."""
    step = record.get("step", "?")
    keep = f"the checkpoints in {directory} are healthy and left as they are"
    # Normalised, so records written before a keyword existed (its default) still match.
    stored = record.get("model_config")
    now_model = model_config.to_kwargs()
    if stored is None or ModelConfig.from_kwargs(stored).to_kwargs() != now_model:
        changed = _changes(now_model, ModelConfig.from_kwargs(stored).to_kwargs() if stored else {})
        raise ValueError(f"the checkpoint in {directory} (step {step}) is of another model: {_describe(changed)}; "
                         f"rerun with the checkpoint's values ({_restore_with(changed)}) to resume it, or pass "
                         f"another --out (out_dir) to train this model afresh; {keep}")
    before, now = record.get("train_config", {}), config.to_json()
    shaping = _changes(_state_shaping(now), _state_shaping(before))
    if shaping:
        changed = _changes(now, before, [name for name in ("data_order", "optimizer", "grad_clip_norm", "batch_size")
                                         if name in shaping or (name == "grad_clip_norm" and "gradient_clipping"
                                                                in shaping)])
        raise ValueError(f"cannot resume step {step} in {directory} with changed settings its saved state depends "
                         f"on: {_describe(changed)}; rerun with the checkpoint's values ({_restore_with(changed)}), "
                         f"or pass another --out (out_dir) for a fresh run with the new ones; {keep}")
    warnings = []
    changed = _changes(now, before)
    if changed:
        warnings.append(f"resuming with changed training settings: {_describe(changed)}")
    saved_fingerprint = record.get("data_fingerprint", data_fingerprint)
    if saved_fingerprint != data_fingerprint:
        sizes = _changes(data_sizes, record.get("data_sizes", {}))
        what = f"split bytes {_describe(sizes)}, " if sizes else ""
        restore = "the same --data and --max-bytes as the run that wrote it"
        if config.data_order is DataOrder.STREAMS:
            raise ValueError(f"the data changed since step {step} was checkpointed in {directory} ({what}fingerprint "
                             f"{saved_fingerprint} -> {data_fingerprint}): streams resume at byte positions of that "
                             f"data. Resume on the same data ({restore}), or pass another --out (out_dir) to train "
                             f"afresh on this data; {keep}")
        warnings.append(f"warning: the data changed since step {step} was checkpointed ({what}fingerprint "
                        f"{saved_fingerprint} -> {data_fingerprint}); resuming on the new data (to restore the old: "
                        f"{restore})")
    return warnings
