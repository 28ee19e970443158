"""Train one variant on a recall task with the library's `Trainer` and measure its loss per distance."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from ct_jax._host import to_device
from ct_jax.long_range.diagnose import reconstruction_errors
from ct_jax.long_range.tasks import RecallTask, recall_mask, span_of
from ct_jax.long_range.variants import Variant
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.training import TrainConfig, Trainer, create_model

# The small model of the observations (docs/long-range.md): 2 layers, dim 64, 4 heads.
SIZES = dict(dim=64, depth=2, heads=4)
# Every variant's optimiser (a variant may override it): Adam 3e-3, 50 warmup steps, clip 0.5, batch 16.
BASE_TRAIN = dict(batch_size=16, learning_rate=3e-3, warmup_steps=50, grad_clip_norm=0.5, eval_every=0,
                  checkpoint_every=0)


@dataclasses.dataclass
class RecallResult:
    """One trained variant and seed: recall loss (nats) per distance and the training curve."""

    variant: str
    seed: int
    steps: int
    memory_layers: list[int] | None  # the layers with memory (None: all)
    loss_by_distance: dict[int, float]
    knockout_by_distance: dict[int, float]  # the same with another row's compressed slots at the query
    span_by_distance: dict[int, str]
    slot_spread: list[float]  # per memory layer: compressed slots' spread / plain memory's (see token_losses_fn)
    curve: list[tuple[int, float]]  # (step, recall loss on the training distances' eval rows)
    seconds: float
    # `diagnose.reconstruction_errors` at `reconstruction_distance` (compressive models with mem_len == seq_len)
    reconstruction: dict[str, float] = dataclasses.field(default_factory=dict)
    reconstruction_distance: int | None = None


def token_losses_fn(model: CompressiveTransformer, knockout: bool = False,
                    compiler_options: dict[str, Any] | None = None) -> Callable:
    """A jitted `(params, tokens) -> (per-token NLL (b, l - 1), slot spread (layers,))` in eval mode,
    the memory carried over segments.

    Slot spread: per memory layer, the spread (std over slots, mean over features and rows) of
    the final compressed slots over that of the plain memory's; near 0 when every compressed
    slot holds about the same vector (nothing slot-specific kept).

    `knockout`: the last segment reads the compressed slots of another row (the next one in the
    batch; same counts and positions, same distribution, none of this row's facts): what the
    recall loses without its own compressed memory.
    """
    model.eval()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    model.train()
    seq_len = model.config.seq_len

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def losses(params: nnx.State, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        net = nnx.merge(graphdef, params, rest)
        b = tokens.shape[0]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        n = inputs.shape[1] // seq_len

        def by_segment(x: jax.Array) -> jax.Array:  # (b, n * seq_len) -> (n, b, seq_len)
            return jnp.moveaxis(x.reshape(b, n, seq_len), 1, 0)

        segments = (by_segment(inputs), by_segment(targets), jnp.arange(n) == n - 1)

        def body(memories, xs):
            x, y, last = xs
            if knockout:
                other = jnp.roll(memories.compressed_mem, 1, axis=1)  # (l, b, c, d): row i gets row i - 1's
                memories = memories._replace(compressed_mem=jnp.where(last, other, memories.compressed_mem))
            logits, memories, _ = net(x, memories)
            log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            return memories, -jnp.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]

        memories, nll = jax.lax.scan(body, Memory.empty(net, b, net.dtype), segments)  # (n, b, seq_len)
        return jnp.moveaxis(nll, 0, 1).reshape(b, n * seq_len), _spread(memories)

    return losses


def _spread(memories: Memory) -> Float[Array, " l"]:
    """(layers,) std over the valid compressed slots / std over the valid memory slots."""

    def std(x: jax.Array, valid: jax.Array) -> jax.Array:  # x (l, b, n, d) right-aligned, valid (b,) per row
        keep = (jnp.arange(x.shape[2])[None, :] >= x.shape[2] - valid[:, None])[None, :, :, None]  # (1, b, n, 1)
        count = jnp.maximum(valid, 1)[None, :, None].astype(x.dtype)  # (1, b, 1)
        mean = jnp.sum(jnp.where(keep, x, 0), axis=2, keepdims=True) / count[..., None]
        var = jnp.sum(jnp.where(keep, jnp.square(x - mean), 0), axis=2) / count
        return jnp.mean(jnp.sqrt(var), axis=(1, 2))

    compressed = std(memories.compressed_mem.astype(jnp.float32), memories.compressed_mem_valid)
    return compressed / std(memories.mem.astype(jnp.float32), memories.mem_valid)


def eval_rows(task: RecallTask, rows_per_distance: int, seed: int = 12345) -> dict[int, np.ndarray]:
    """Fixed evaluation rows per distance (the same for every variant and seed)."""
    rng = np.random.default_rng(seed)
    return {d: task.sample(rng, rows_per_distance, distance=d)[0] for d in task.distances}


def recall_loss(losses: Callable, params: nnx.State, task: RecallTask, rows: dict[int, np.ndarray]
                ) -> tuple[dict[int, float], list[float]]:
    """(mean NLL over the recalled symbols per distance, slot spread per layer on the last distance's rows)."""
    out, spread = {}, None
    for distance, tokens in rows.items():
        nll, spread = losses(params, to_device(tokens))
        mask = recall_mask(task, np.full(len(tokens), distance))
        out[distance] = float(np.asarray(nll)[mask].mean())
    return out, [float(v) for v in np.asarray(spread)]


def train_recall(task: RecallTask, variant: Variant, seed: int, steps: int, *,
                 memory_layers: tuple[int, ...] | None = None, eval_rows_per_distance: int = 128, curve_every: int = 0,
                 train_overrides: dict[str, Any] | None = None,
                 compiler_options: dict[str, Any] | None = None, log: Callable[[str], Any] | None = None
                 ) -> RecallResult:
    """Trains `variant` from scratch for `steps` updates on rows of `task` (each from empty memory).

    `memory_layers`: the layers that have memory (None: all). With memory at the top layer
    only, a model reaches exactly the tokens its memories cover: no lower layer relays older
    context through its own memory.
    `compiler_options`: XLA options for every compiled function (e.g. `training.FAST_CPU_COMPILE`).
    """
    start = time.perf_counter()
    model_kwargs = dict(num_tokens=task.vocab, seq_len=task.seq_len, **SIZES, **variant.model_kwargs())
    if memory_layers is not None:
        model_kwargs["memory_layers"] = list(memory_layers)
    fields = {**BASE_TRAIN, **variant.train, **(train_overrides or {})}
    config = TrainConfig(n_segments=task.n_segments, steps=steps, seed=seed, **fields)
    model = create_model(model_kwargs, config)
    trainer = Trainer(model, config, compiler_options=compiler_options)
    state = trainer.place(trainer.init_state())
    losses = token_losses_fn(model, compiler_options=compiler_options)
    rows = eval_rows(task, eval_rows_per_distance)
    data_rng = np.random.default_rng([seed, 7])
    curve = []
    for step in range(steps):
        batch, _ = task.sample(data_rng, config.batch_size)
        state, _ = trainer.train_step(state, batch)
        if curve_every and (step + 1) % curve_every == 0 and step + 1 < steps:
            by_distance, _ = recall_loss(losses, trainer.host(state).params, task, rows)
            curve.append((step + 1, float(np.mean(list(by_distance.values())))))
            if log:
                log(f"  {variant.name} seed {seed} step {step + 1}: {by_distance}")
    params = trainer.host(state).params
    by_distance, spread = recall_loss(losses, params, task, rows)
    knocked = by_distance
    if variant.cmem_len:
        knocked = recall_loss(token_losses_fn(model, True, compiler_options), params, task, rows)[0]
    curve.append((steps, float(np.mean(list(by_distance.values())))))
    spans = {d: span_of(task, d, variant.mem_len, variant.covered).value for d in task.distances}
    spread = spread if variant.cmem_len else []
    reconstruction = {}
    distance = _diagnosable_distance(task, variant)
    if distance is not None:
        trained = trainer.load_params(params)
        reconstruction = reconstruction_errors(trained, task, rows[distance], distance)
    seconds = time.perf_counter() - start
    layers = None if memory_layers is None else list(memory_layers)
    return RecallResult(variant.name, seed, steps, layers, by_distance, knocked, spans, spread, curve, seconds,
                        reconstruction, distance)


def _diagnosable_distance(task: RecallTask, variant: Variant) -> int | None:
    """The farthest distance whose fact sits in `variant`'s compressed span and starts a segment,
    if the variant compresses and keeps one plain memory segment; else None."""
    if not variant.cmem_len or variant.mem_len != task.seq_len:
        return None
    fits = [d for d in task.distances if span_of(task, d, variant.mem_len, variant.covered) == "compressed"
            and (task.query_start(d) - d) % task.seq_len == 0]
    return max(fits, default=None)
