"""Loss-free conversion between upstream PyTorch `state_dict`s / memories and `ct_jax` models.

Parameter paths mirror upstream's, so a key maps to a path by renaming; matrices are
transposed (torch stores `(out, in)`, Flax `(in, out)`; Conv1d `(out, in, r)` -> `(r, in, out)`).
Files: a checkpoint directory holds `model.safetensors` (upstream key names) and
`config.json` (the constructor kwargs), readable by both frameworks.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ct_jax._host import to_device
from ct_jax.config import ModelConfig
from ct_jax.io import atomic_write
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# (JAX path pattern, upstream key template) on the '.'-joined path: the first matching
# prefix rule, then every suffix rule in order.
_PREFIX_RENAMES = [
    (r"^token_emb\.embedding$", "token_emb.weight"),
    (r"^to_emb_dim\.", "to_logits.0."),
    (r"^to_logits\.", "to_logits.1."),
    (r"^(attn|ff)_layers\.(\d+)\.norm\.", r"\1_layers.\2.fn.norm."),
    (r"^(attn|ff)_layers\.(\d+)\.fn\.", r"\1_layers.\2.fn.fn."),
]
_SUFFIX_RENAMES = [
    (r"\.compress_mem_fn\.(kernel|bias)$", r".compress_mem_fn.conv.\1"),  # dilated_conv: .conv. already
    (r"\.decompress_mem_fn\.(kernel|bias)$", r".decompress_mem_fn.conv.\1"),
    (r"gru\.input_kernel$", "gru.weight_ih"),
    (r"gru\.hidden_kernel$", "gru.weight_hh"),
    (r"gru\.input_bias$", "gru.bias_ih"),
    (r"gru\.hidden_bias$", "gru.bias_hh"),
    (r"mogrify\.(Q|R)\.down\.", r"mogrify.\1.0.0."),
    (r"mogrify\.(Q|R)\.up\.", r"mogrify.\1.0.1."),
    (r"\.emb_layers\.(\d+)\.embedding$", r".emb_layers.\1.weight"),  # ct_jax.adaptive.AdaptiveEmbedding
    (r"\.kernel$", ".weight"),
    (r"\.scale$", ".weight"),
]
_TRANSPOSED = re.compile(r"(kernel|input_kernel|hidden_kernel)$")
# mogrifier < 0.0.5 stored bias-free factors as `mogrify.Q.0.weight` / `mogrify.Q.1.weight`.
_OLD_MOGRIFIER = re.compile(r"^(.*\.mogrify\.[QR])\.([01])\.weight$")


def torch_key(path: str) -> str:
    """Upstream `state_dict` key of a `ct_jax` parameter path such as `attn_layers.0.fn.to_q.kernel`."""
    for pattern, replacement in _PREFIX_RENAMES:
        path, count = re.subn(pattern, replacement, path)
        if count:
            break
    for pattern, replacement in _SUFFIX_RENAMES:
        path = re.sub(pattern, replacement, path)
    return path


def _param_paths(module: nnx.Module) -> dict[str, Any]:
    """'.'-joined parameter path -> its Param, of the model or any submodule."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {".".join(str(p) for p in path): variable for path, variable in flat}


def to_numpy(model: CompressiveTransformer) -> dict[str, np.ndarray]:
    """Model weights as an upstream-keyed `state_dict` of numpy arrays (exact copies)."""
    return module_to_numpy(model, "")


def module_to_numpy(module: nnx.Module, prefix: str) -> dict[str, np.ndarray]:
    """A submodule's weights under the upstream keys it has at `prefix` in the model (exact copies).

    `prefix` is its `ct_jax` attribute path, e.g. "to_logits" for a `ct_jax.adaptive.AdaptiveLogSoftmax`
    (keys `to_logits.1.head.weight`, ...) or "token_emb" for an `AdaptiveEmbedding`.
    """
    out = {}
    for path, variable in _param_paths(module).items():
        value = np.asarray(variable.get_value())
        out[torch_key(_joined(prefix, path))] = value.transpose() if _TRANSPOSED.search(path) else value
    return out


def _joined(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix else path


def module_from_torch(state_dict: Mapping[str, Any], module: nnx.Module, prefix: str) -> nnx.Module:
    """Loads the upstream-keyed weights of a submodule at `prefix` (as `module_to_numpy`) in place, strictly.

    Raises ValueError listing missing and unexpected keys and shape mismatches before changing anything.
    """
    return _load(state_dict, module, prefix, f"the module at {prefix!r}", allow_non_finite=True)


def _load(state_dict: Mapping[str, Any], module: nnx.Module, prefix: str, what: str, *,
          allow_non_finite: bool) -> nnx.Module:
    """Strictly loads `state_dict` into `module`'s parameters (upstream keys at `prefix`), all or nothing:
    every missing or unexpected key, shape or dtype mismatch and non-finite weight is listed first."""
    state = _upgrade_old_mogrifier({key: _as_numpy(value) for key, value in state_dict.items()})
    params = _param_paths(module)
    expected = {torch_key(_joined(prefix, path)): path for path in params}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = []
    converted = {}
    for key, path in expected.items():
        if key not in state:
            continue
        value = state[key].transpose() if _TRANSPOSED.search(path) else state[key]
        target = params[path].get_value()
        if value.shape != target.shape:
            shape = value.transpose().shape if _TRANSPOSED.search(path) else value.shape
            wanted = tuple(reversed(target.shape)) if _TRANSPOSED.search(path) else target.shape
            mismatched.append(f"{key}: expected {wanted}, got {shape}")
            continue
        if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
            mismatched.append(f"{key}: expected a floating dtype, got {value.dtype}")
            continue
        with np.errstate(over="ignore"):  # a weight too large for the dtype becomes inf: refused below
            converted[path] = np.asarray(value, dtype=target.dtype)
    # checked and cast on the host: on the device each parameter shape would compile its own programs
    non_finite = [] if allow_non_finite else sorted(
        torch_key(_joined(prefix, path)) for path, value in converted.items() if not np.isfinite(value).all())
    if missing or unexpected or mismatched or non_finite:
        problems = []
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if mismatched:
            problems.append(f"shape/dtype mismatches {mismatched}")
        if non_finite:
            problems.append(f"weights holding NaN or Inf {non_finite} (allow_non_finite=True loads them anyway)")
        raise ValueError(f"state_dict does not match {what}: " + "; ".join(problems))
    for path, value in converted.items():
        params[path].set_value(to_device(value))
    return module


def to_torch(model: CompressiveTransformer) -> dict[str, Any]:
    """Model weights as an upstream `state_dict` of torch tensors; loads with `strict=True`."""
    return tensors(to_numpy(model))


def tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Numpy arrays as torch tensors of the same dtype (bfloat16 included, which torch.from_numpy refuses)."""
    import torch

    out = {}
    for key, value in arrays.items():
        if value.dtype.name == "bfloat16":
            out[key] = torch.from_numpy(np.array(value).view(np.int16)).view(torch.bfloat16)
        else:
            out[key] = torch.from_numpy(np.array(value))
    return out


def cast_dtypes(state: Mapping[str, Any]) -> dict[str, int]:
    """{dtype name: count} of the floating tensors of `state` that loading casts to float32 (the model's dtype)."""
    counts: dict[str, int] = {}
    for value in state.values():
        name = str(getattr(value, "dtype", "")).removeprefix("torch.")
        if name != "float32":
            counts[name] = counts.get(name, 0) + 1
    return counts


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            import ml_dtypes

            return value.view(dtype=__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return value.numpy()
    return np.asarray(value)


def _upgrade_old_mogrifier(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps the bias-free mogrifier (< 0.0.5) layout to 0.0.5's, with zero biases (same function)."""
    out = {}
    for key, value in state.items():
        match = _OLD_MOGRIFIER.match(key)
        if match is None:
            out[key] = value
            continue
        new_prefix = f"{match.group(1)}.0.{match.group(2)}"
        out[f"{new_prefix}.weight"] = value
        out[f"{new_prefix}.bias"] = np.zeros(value.shape[0], value.dtype)
    return out


def from_torch(state_dict: Mapping[str, Any], model: CompressiveTransformer, *,
               allow_non_finite: bool = False) -> CompressiveTransformer:
    """Loads an upstream / `ct_torch_ref` `state_dict` into `model` in place (strict) and returns it.

    Raises ValueError listing every missing or unexpected key, every shape mismatch and
    (unless `allow_non_finite`) every weight holding NaN or Inf, before any parameter is changed.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of parameter names to tensors or arrays, "
                        f"got {type(state_dict).__name__}")
    if not isinstance(model, CompressiveTransformer):
        raise TypeError(f"model must be a ct_jax.CompressiveTransformer, got {type(model).__name__}")
    return _load(state_dict, model, "", "the model", allow_non_finite=allow_non_finite)


def memory_to_torch(memories: Memory):
    """The valid part of a `ct_jax.Memory` as upstream `Memory(mem, compressed_mem)` tensors.

    Shapes are exactly upstream's: `(n_memory_layers, b, valid_len, dim)`. Upstream's memory
    has one length for the whole batch, so every row must hold the same number of slots. A
    memory with `mem_usage` (compression="most_used") becomes `ct_torch_ref.UsageMemory`,
    usage `(n_memory_layers, b, valid_len)`.
    """
    import torch

    from ct_torch_ref import Memory as TorchMemory
    from ct_torch_ref import UsageMemory

    counts = {name: np.unique(np.asarray(getattr(memories, name))) for name in ("mem_valid", "compressed_mem_valid")}
    for name, values in counts.items():
        if len(values) > 1:
            raise ValueError(
                f"memories.{name} differs between rows ({np.asarray(getattr(memories, name)).tolist()}); upstream's "
                f"Memory holds one length for the whole batch, so only memories whose rows hold equal amounts convert"
            )
    mem_valid, cmem_valid = int(counts["mem_valid"][0]), int(counts["compressed_mem_valid"][0])
    mem = np.asarray(memories.mem)
    cmem = np.asarray(memories.compressed_mem)
    mem = mem[:, :, mem.shape[2] - mem_valid :]
    cmem = cmem[:, :, cmem.shape[2] - cmem_valid :]
    mem_t, cmem_t = torch.from_numpy(np.array(mem)), torch.from_numpy(np.array(cmem))
    if memories.mem_usage is None:
        return TorchMemory(mem_t, cmem_t)
    usage = np.asarray(memories.mem_usage)
    return UsageMemory(mem_t, cmem_t, torch.from_numpy(np.array(usage[:, :, usage.shape[2] - mem_valid :])))


def memory_from_torch(memory, model_or_config) -> Memory:
    """Upstream `Memory(mem, compressed_mem)` (or a `(mem, cmem)` pair) as fixed-shape `ct_jax.Memory`.

    Under compression="most_used" a `UsageMemory` (mem, compressed_mem, mem_usage) keeps its
    usage; a plain Memory starts with zero usage.
    """
    config = getattr(model_or_config, "config", model_or_config)
    mem, cmem = (_as_numpy(t) for t in tuple(memory)[:2])
    layers = len(config.memory_layers)
    for name, value, capacity in (("mem", mem, config.mem_len), ("compressed_mem", cmem, config.cmem_len)):
        if value.ndim != 4 or value.shape[0] != layers or value.shape[3] != config.dim:
            raise ValueError(
                f"memory.{name} must have shape ({layers}, batch, <= {capacity}, {config.dim}), got {value.shape}"
            )
        if value.shape[2] > capacity:
            raise ValueError(f"memory.{name} holds {value.shape[2]} slots, more than its capacity {capacity}")
    if mem.shape[1] != cmem.shape[1]:
        raise ValueError(f"memory.mem batch {mem.shape[1]} differs from memory.compressed_mem batch {cmem.shape[1]}")
    if cmem.shape[2] > 0 and mem.shape[2] != config.mem_len:
        raise ValueError(
            f"compressed memory is non-empty ({cmem.shape[2]} slots) while memory is not full "
            f"({mem.shape[2]} of {config.mem_len}); a model never produces that state"
        )
    pad = lambda value, capacity: np.pad(  # noqa: E731
        value, ((0, 0), (0, 0), (capacity - value.shape[2], 0)) + ((0, 0),) * (value.ndim - 3)
    )
    usage = None
    if config.compression == "most_used":
        given = tuple(memory)[2] if len(tuple(memory)) > 2 else None
        usage = np.zeros(mem.shape[:3], np.float32) if given is None else _as_numpy(given).astype(np.float32)
        if usage.shape != mem.shape[:3]:
            raise ValueError(f"memory.mem_usage must have shape {mem.shape[:3]} like mem, got {usage.shape}")
        usage = to_device(pad(usage, config.mem_len))
    return Memory(
        to_device(pad(mem, config.mem_len)),
        to_device(pad(cmem, config.cmem_len)),
        jnp.full((mem.shape[1],), mem.shape[2], jnp.int32),
        jnp.full((mem.shape[1],), cmem.shape[2], jnp.int32),
        usage,
    )


def save_pretrained(model: CompressiveTransformer, directory: str | os.PathLike, *,
                    weights: Mapping[str, np.ndarray] | None = None) -> Path:
    """Writes `model.safetensors` (upstream keys) and `config.json`, each atomically (`weights`: the arrays to
    write instead of the model's, e.g. in their source dtypes; `ct_jax.io.replace_folder` makes the pair atomic)."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    weights = {key: np.ascontiguousarray(value) for key, value in (weights or to_numpy(model)).items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(model.config.to_kwargs(), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config_text))
    return directory


def read_config(directory: str | os.PathLike) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory's `config.json`."""
    path = model_directory(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint directory {directory} (nor in its model/ folder, "
                                f"where a training run exports)")
    try:
        kwargs = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path} must hold a JSON object of constructor kwargs, got {type(kwargs).__name__}")
    return ModelConfig.from_kwargs(kwargs)


def json_kwargs(text_or_path: str) -> dict[str, Any]:
    """Constructor kwargs (all or some) given as JSON text, or as the path of a JSON file: a JSON object."""
    text = text_or_path
    if not text.lstrip().startswith(("{", "[")):
        path = Path(text_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"model config {text_or_path!r} is neither JSON text nor a file")
        text = path.read_text()
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"model config {text_or_path!r:.80} is not valid JSON: {error}") from error
    if not isinstance(kwargs, dict):
        raise TypeError(f"model arguments must be a mapping of constructor keywords (a JSON object), "
                        f"got {type(kwargs).__name__}: {kwargs!r:.80}")
    return kwargs


def config_from_json(text_or_path: str) -> ModelConfig:
    """A `ModelConfig` from constructor kwargs given as JSON text, or as the path of a JSON file."""
    return ModelConfig.from_kwargs(json_kwargs(text_or_path))


def model_directory(directory: str | os.PathLike) -> Path:
    """`directory`, or its `model/` when it is a training folder (the export lies there)."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file() and (directory / "model" / CONFIG_FILE).is_file():
        return directory / "model"
    return directory


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Weights from `.safetensors` (no code runs) or `.pt`/`.bin` (`torch.load(weights_only=True)`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} could not be read with torch.load(weights_only=True): {error}") from error
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} must hold a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    return {key: _as_numpy(value) for key, value in state.items()}


def model_for_weights(config: ModelConfig, *, seed: int = 0, **kwargs: Any) -> CompressiveTransformer:
    """A model of `config` (and `CompressiveTransformer` `kwargs`) to load weights into (`from_torch`,
    `nnx.update`): parameters of the right shapes and no values when the model holds nothing else (a random
    init computes values that loading replaces, and on CPU compiles each initializer per parameter shape);
    else a random init from `seed` (its dropout streams are state of their own)."""

    def build() -> CompressiveTransformer:
        return CompressiveTransformer(**config.to_kwargs(), rngs=nnx.Rngs(seed), **kwargs)

    shaped = nnx.eval_shape(build)
    return build() if jax.tree.leaves(nnx.state(shaped, nnx.Not(nnx.Param))) else shaped


def load_pretrained(directory: str | os.PathLike, *, dtype: Any = jnp.float32, seed: int = 0) -> CompressiveTransformer:
    """A `ct_jax` model from a checkpoint directory written by either framework (or a training folder)."""
    directory = model_directory(directory)
    model = model_for_weights(read_config(directory), seed=seed, dtype=dtype)
    return from_torch(read_state_dict(Path(directory) / WEIGHTS_FILE), model)
