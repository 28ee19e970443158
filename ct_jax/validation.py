"""Checks of a forward call's inputs, raised before any state changes.

Shapes and dtypes are always checked. Token values are checked where they are concrete;
under `jit` they are traced, and the range check becomes a `checkify.debug_check`: a
no-op unless the caller wraps the function with
`jax.experimental.checkify.checkify(fn, errors=checkify.user_checks)`, which then reports
the first bad call (see README).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from ct_jax.config import ModelConfig
from ct_jax.memory import Memory


def check_tokens(tokens, config: ModelConfig) -> None:
    """tokens: (batch, t) integers in [0, num_tokens), 1 <= t <= seq_len."""
    shape, dtype = jnp.shape(tokens), jnp.result_type(tokens)
    if len(shape) != 2:
        raise ValueError(f"tokens must have shape (batch, t), got shape {shape}")
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"tokens must be integer token ids, got dtype {dtype}")
    if not 1 <= shape[1] <= config.seq_len:
        raise ValueError(f"tokens has a segment of length {shape[1]}; expected 1..seq_len={config.seq_len}")
    if shape[0] == 0:
        raise ValueError("tokens has batch size 0; expected at least 1 row")
    message = f"token ids must lie in [0, num_tokens={config.num_tokens})"
    if isinstance(tokens, jax.core.Tracer):
        checkify.debug_check(jnp.all((tokens >= 0) & (tokens < config.num_tokens)), message + " (traced call)")
        return
    values = np.asarray(tokens)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= config.num_tokens:
        raise ValueError(f"{message}, got values in [{low}, {high}]")


def check_batch_ids(inputs, targets, config: ModelConfig, ignore_index: int) -> None:
    """Where concrete (an eager loss or gradient call): inputs and the counted targets (!= ignore_index) in
    [0, num_tokens), as `check_tokens`; out-of-range ids would give NaN or a finite wrong loss. Traced (under
    jit) nothing is checked here: the model's `checkify` check covers the inputs."""
    if isinstance(inputs, jax.core.Tracer) or isinstance(targets, jax.core.Tracer):
        return
    for name, values in (("inputs", np.asarray(inputs)), ("targets", np.asarray(targets))):
        if name == "targets":
            values = values[values != ignore_index]
        if values.size and (values.min() < 0 or values.max() >= config.num_tokens):
            raise ValueError(f"token ids must lie in [0, num_tokens={config.num_tokens}), got {name} with values in "
                             f"[{int(values.min())}, {int(values.max())}]")


def check_mask(mask, tokens_shape: tuple[int, ...]) -> None:
    """mask: bool, the same shape as tokens (True = real token)."""
    if mask is None:
        return
    if jnp.shape(mask) != tuple(tokens_shape):
        raise ValueError(f"mask must have the tokens' shape {tuple(tokens_shape)}, got {jnp.shape(mask)}")
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"mask must be boolean (True = real token), got dtype {jnp.result_type(mask)}")


def check_memory(memories, config: ModelConfig, batch: int) -> None:
    """memories: a `ct_jax.Memory` built for this configuration and batch size."""
    if memories is None:
        return
    if not isinstance(memories, Memory):
        raise TypeError(
            f"memories must be a ct_jax.Memory (use ct_jax.convert.memory_from_torch for torch memories), "
            f"got {type(memories).__name__}"
        )
    layers = len(config.memory_layers)
    expected = {
        "mem": (layers, batch, config.mem_len, config.dim),
        "compressed_mem": (layers, batch, config.cmem_len, config.dim),
        "mem_valid": (batch,),
        "compressed_mem_valid": (batch,),
    }
    for name, shape in expected.items():
        got = jnp.shape(getattr(memories, name))
        if got != shape:
            raise ValueError(
                f"memories.{name} has shape {got}, expected {shape} (memory from another configuration "
                f"or batch size?)"
            )
    most_used = config.compression == "most_used"
    if (memories.mem_usage is not None) != most_used:
        raise ValueError(
            f"memories.mem_usage must be {'an array' if most_used else 'None'} for compression="
            f"{config.compression!r}, got {'None' if memories.mem_usage is None else 'an array'} "
            "(use ct_jax.Memory.empty(model, batch))"
        )
    if most_used and jnp.shape(memories.mem_usage) != (layers, batch, config.mem_len):
        raise ValueError(
            f"memories.mem_usage has shape {jnp.shape(memories.mem_usage)}, expected {(layers, batch, config.mem_len)}"
        )
    check_valid_counts(memories, config)


def check_valid_counts(memories: Memory, config: ModelConfig) -> None:
    """Where the counts are concrete (an eager call): 0 <= mem_valid <= mem_len, 0 <= compressed_mem_valid
    <= cmem_len, and compressed slots only once the memory is full. Counts may be scalars or per row."""
    counts = (memories.mem_valid, memories.compressed_mem_valid)
    if any(isinstance(count, jax.core.Tracer) for count in counts):
        return  # traced (under jit): no host check on the hot path
    mem_valid, cmem_valid = (np.asarray(count) for count in counts)
    for name, values, capacity in (("mem_valid", mem_valid, config.mem_len),
                                   ("compressed_mem_valid", cmem_valid, config.cmem_len)):
        if not np.issubdtype(values.dtype, np.integer):
            raise TypeError(f"memories.{name} must hold integer counts, got dtype {values.dtype}")
        if values.size and (values.min() < 0 or values.max() > capacity):
            raise ValueError(f"memories.{name} must lie in [0, {capacity}] (its buffer's slots), got "
                             f"{values.tolist()}")
    if np.any((cmem_valid > 0) & (mem_valid < config.mem_len)):
        raise ValueError(
            f"memories.compressed_mem_valid is non-zero ({cmem_valid.tolist()}) while the memory is not full "
            f"(mem_valid {mem_valid.tolist()} of {config.mem_len}); a model never produces that state"
        )
