"""Sharding by names: logical axes of every parameter, and one rule table mapping them to mesh axes.

As MaxText does, arrays are described by logical axis names (`embed`, `mlp`, `vocab`...)
and a rule table, in priority order, says which mesh axis each name may be split over. An
array is split along the first of its axes (in rule order) whose rule names a mesh axis the
array does not use yet and whose size that mesh axis divides; every other axis is whole.
Optimizer states (Adam's `mu`, `nu`) mirror the parameters' paths, so they get the same
layout; the memory carried between training steps has a `batch` axis, split like the
tokens; scalars (step counts, RNG keys) are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical axes of a parameter by its name, and by (module, name) where a layer's shape differs.
PARAM_AXES: dict[str | tuple[str, str], tuple[str, ...]] = {
    "embedding": ("vocab", "embed"),
    "pos_emb": ("heads", "relative_position", "head_dim"),
    "kernel": ("embed", "mlp"),  # a linear layer (in, out)
    "input_kernel": ("embed", "mlp"),  # GRU gate (in, 3 * dim)
    "hidden_kernel": ("embed", "mlp"),
    "bias": ("mlp",),
    "input_bias": ("mlp",),
    "hidden_bias": ("mlp",),
    "scale": ("embed",),  # LayerNorm
    ("norm", "bias"): ("embed",),
    ("compress_mem_fn", "kernel"): ("window", "embed", "mlp"),  # Conv1d (ratio, in, out)
    ("w2", "kernel"): ("mlp", "embed"),
    ("up", "kernel"): ("mlp", "embed"),  # Mogrifier's low-rank up-projection
    ("to_logits", "kernel"): ("embed", "vocab"),
    ("to_logits", "bias"): ("vocab",),
    # adaptive input and softmax (ct_jax.adaptive; "embedding" above covers each cluster's table)
    ("emb_projs", "kernel"): ("mlp", "embed"),  # a cluster's width -> emb_dim
    ("head", "kernel"): ("embed", "vocab"),  # shortlist + one logit per tail cluster
    ("head", "bias"): ("vocab",),
    # tail.{i}.0 (emb_dim, width) and tail.{i}.1 (width, cluster size) share the path name: the
    # input axis splits first under FSDP_RULES, the output one when the input does not divide
    ("tail", "kernel"): ("embed", "vocab"),
    # the memory carried in the train state (ct_jax.Memory's fields)
    "mem": ("layers", "batch", "slots", "embed"),
    "compressed_mem": ("layers", "batch", "slots", "embed"),
    "mem_valid": ("batch",),
    "compressed_mem_valid": ("batch",),
}

# Data parallelism: only batch axes are split; parameters and optimizer state are replicated.
DATA_RULES: tuple[tuple[str, str], ...] = (("batch", "data"),)

# Fully sharded data parallelism: every parameter split over the batch axis `data` (by its
# embedding axis where it divides, else the next name here); XLA gathers what a layer needs.
FSDP_RULES: tuple[tuple[str, str], ...] = DATA_RULES + (
    ("embed", "data"), ("mlp", "data"), ("vocab", "data"), ("relative_position", "data"), ("heads", "data"),
    ("head_dim", "data"), ("window", "data"),
)


def _key_name(key: Any) -> str | None:
    name = getattr(key, "key", getattr(key, "name", None))
    return name if isinstance(name, str) else None


def logical_axes(path: Sequence[Any], ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the array at `path` (a pytree key path), None for unnamed axes."""
    names = [name for name in map(_key_name, path) if name is not None and name != "value"]
    for index in range(len(names) - 1, -1, -1):
        name, parent = names[index], names[index - 1] if index else None
        axes = PARAM_AXES.get((parent, name), PARAM_AXES.get(name))
        if axes is not None and len(axes) == ndim:
            return axes
    return (None,) * ndim


def batch_axis(path: Sequence[Any], ndim: int) -> int | None:
    """The index of the `batch` axis of the array at `path`, or None (a parameter, a scalar)."""
    axes = logical_axes(path, ndim)
    return axes.index("batch") if "batch" in axes else None


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], rules: Sequence[tuple[str, str]],
                   mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array with logical `axes`: the rules, in order, split axes that divide evenly."""
    spec: list[str | None] = [None] * len(shape)
    for logical, mesh_axis in rules:
        if mesh_axis in spec:
            continue
        for index, name in enumerate(axes):
            if name == logical and spec[index] is None and shape[index] % mesh.shape[mesh_axis] == 0:
                spec[index] = mesh_axis
                break
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]]) -> Any:
    """A NamedSharding for every leaf of `tree` (arrays or shape structs) from its path's logical axes."""

    def sharding(path, leaf) -> NamedSharding:
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(logical_axes(path, len(shape)), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(sharding, tree)
