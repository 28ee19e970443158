"""The model a command's --checkpoint names: a checkpoint directory (model.safetensors + config.json), a
training run's export (RUN/model/), or, for a run without an export yet (interrupted, or still running),
the run's newest verified training checkpoint (RUN/checkpoints/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ct_jax import convert
from ct_jax._host import to_device
from ct_jax.checkpointing import restore_newest
from ct_jax.config import ModelConfig
from ct_jax.model import CompressiveTransformer
from ct_jax.tokenizers import TOKENIZER_RECORD, Tokenizer, load_tokenizer
from ct_jax.training import DataOrder, TrainConfig, TrainState, create_model, init_state, make_optimizer

CHECKPOINTS_FOLDER = "checkpoints"  # of a training run (ct_jax.train_loop.fit)
MODEL_FOLDER = "model"  # a training run's export


MEMORY_FLAGS = {"mem_len": "--mem-len", "cmem_len": "--cmem-len"}  # `with_memory_lengths`' arguments as flags


class Loaded(NamedTuple):
    """A loaded model, what it was read from (in words for the user) and the training step of a checkpoint."""

    model: CompressiveTransformer
    source: str
    step: int | None = None  # None: an export (model.safetensors + config.json)


def _train_state(record: dict[str, Any]) -> TrainState:
    """The host train state at step 0 of the run a checkpoint record describes: the structure to restore into."""
    config = TrainConfig(**record["train_config"])
    model = create_model(ModelConfig.from_kwargs(record["model_config"]), config)
    stream_batch = config.batch_size if config.data_order is DataOrder.STREAMS else None
    return jax.device_get(init_state(model, make_optimizer(config), config.seed, stream_batch))


def load_model(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> Loaded:
    """The model of a checkpoint directory, a run's `model/`, or else a run's newest verified checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--checkpoint {path} does not exist")
    folder = convert.model_directory(path)
    if (folder / convert.CONFIG_FILE).is_file():
        return Loaded(convert.load_pretrained(folder, dtype=dtype), str(folder))
    if not (path / CHECKPOINTS_FOLDER).is_dir():
        raise FileNotFoundError(f"--checkpoint {path} holds no {convert.CONFIG_FILE}, no model/ and no "
                                f"{CHECKPOINTS_FOLDER}/: give a checkpoint directory or a training run's folder")
    step, state, record = restore_newest(path / CHECKPOINTS_FOLDER, _train_state)
    model = convert.model_for_weights(ModelConfig.from_kwargs(record["model_config"]), dtype=dtype)
    nnx.update(model, jax.tree.map(to_device, state.params))
    return Loaded(model, f"step {step} of {path / CHECKPOINTS_FOLDER} (the run's newest verified checkpoint; "
                         f"it has no model/ export)", step)


def load_run_tokenizer(path: str | os.PathLike, model: CompressiveTransformer) -> Tokenizer:
    """The tokenizer stored with a --checkpoint (`TOKENIZER_RECORD` in it, or in the run folder above its
    `model/`; none: bytes), refused when `model`'s num_tokens cannot hold the tokenizer's ids."""
    path = Path(path)
    places = (path, path.parent) if path.name == MODEL_FOLDER else (path,)
    folder = next((f for f in places if (f / TOKENIZER_RECORD).is_file()), path)
    tokenizer = load_tokenizer(folder)
    stored = (folder / TOKENIZER_RECORD).is_file()
    if stored and model.config.num_tokens < tokenizer.vocab_size:
        raise ValueError(f"the model at {path} has num_tokens={model.config.num_tokens}, fewer than the "
                         f"{tokenizer.vocab_size} ids of its tokenizer {tokenizer.spec!r} "
                         f"({folder / TOKENIZER_RECORD})")
    return tokenizer


def _param_shapes(model: CompressiveTransformer) -> dict[str, tuple[int, ...]]:
    """Every parameter's path and shape."""
    return {"/".join(map(str, path)): tuple(variable.shape)
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def with_memory_lengths(model: CompressiveTransformer, *, mem_len: int | None = None,
                        cmem_len: int | None = None) -> CompressiveTransformer:
    """`model`'s parameters in a model whose memory holds `mem_len` / `cmem_len` slots (None: as trained),
    to evaluate with other memory lengths than training; refused (ValueError naming the flag) where a
    parameter's shape depends on them: learned relative positions (`pos_emb`, seq_len + mem_len + cmem_len
    rows). Sinusoidal positions and every compressor have none."""
    changes = {name: value for name, value in (("mem_len", mem_len), ("cmem_len", cmem_len)) if value is not None}
    if not changes or all(getattr(model.config, name) == value for name, value in changes.items()):
        return model
    described = ", ".join(f"{MEMORY_FLAGS[name]} {value}" for name, value in changes.items())
    try:
        config = ModelConfig.from_kwargs({**model.config.to_kwargs(), **changes})
    except ValueError as error:
        raise ValueError(f"{described}: {error}") from None

    def build() -> CompressiveTransformer:
        return CompressiveTransformer(**config.to_kwargs(), rngs=nnx.Rngs(0), dtype=model.dtype,
                                      attention_impl=model.attention_impl)

    trained, resized = _param_shapes(model), _param_shapes(nnx.eval_shape(build))
    differing = sorted(path for path in trained.keys() | resized.keys() if trained.get(path) != resized.get(path))
    if differing:
        path = differing[0]
        raise ValueError(f"{described}: the model's parameters depend on the memory lengths ({path} "
                         f"{trained.get(path)} would need {resized.get(path)}; relative_positions="
                         f"{model.config.relative_positions!r}): evaluate at the trained lengths (mem_len "
                         f"{model.config.mem_len}, cmem_len {model.config.cmem_len}), or train with "
                         f"--relative-positions sinusoidal")
    out = build()
    nnx.update(out, nnx.state(model, nnx.Param))
    return out
