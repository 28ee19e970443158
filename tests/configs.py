"""Tiny configurations and builders shared by several test modules.

CONFIGS maps a name to upstream constructor kwargs (treat as read-only; copy with
dict(CONFIGS[name])). Together they cover: heads 1 and > 1; memory_layers a strict subset
and all; mem_len 1x and 2x seq_len and not a multiple of it; seq_len not a multiple of
cmem_ratio (so evictions are left-padded); cmem_len above mem_len // cmem_ratio; cmem_len
0; GRU gating on and off, with and without the Mogrifier; GLU feed-forward; emb_dim below
and above dim; enhanced recurrence on and off; reconstruction_loss_weight != 1. Each was
checked to run on upstream 0.4.0 for 5+ segments (see tests/test_torch_ref.py).

TRAIN_MODEL / TRAIN_CONFIG are the training tests' tiny model and step (test_training,
test_checkpoint, test_parallel and its workers, test_long_run): one configuration, so the
compiled steps are cached once per process. Input segments come from `ct_jax.parity.make_inputs`.
`forward` is the model's call compiled once for the process: a config's forward (per mode, dtype
and shapes) is traced once and shared by every test module that runs it.
This module imports no torch (the parallel workers import it).
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from flax import nnx

from ct_jax import convert, training
from ct_jax.config import ModelConfig
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer
from ct_jax.options import OPTIONS

if TYPE_CHECKING:
    import torch

forward = nnx.jit(lambda model, tokens, memories=None, mask=None: model(tokens, memories, mask))

CONFIGS: dict[str, dict[str, Any]] = {
    # Upstream defaults: mem_len = seq_len, cmem_len = mem_len // 4, every layer remembers.
    "defaults": dict(num_tokens=32, dim=16, seq_len=4, depth=2, heads=2),
    # One head; memory in the top two of three layers; memory 2x seq_len (compression
    # starts on the third segment).
    "heads1_subset_mem2x": dict(
        num_tokens=24, dim=16, seq_len=4, depth=3, heads=1, memory_layers=[2, 3],
        mem_len=8, cmem_len=4, cmem_ratio=2,
    ),
    # Plain residuals; mem_len 10 not a multiple of seq_len 6, seq_len not a multiple of
    # ratio 4: evictions of 2 then 6 slots, left-padded by 2; cmem_len 3 > 10 // 4.
    "residual_uneven_evictions": dict(
        num_tokens=32, dim=16, seq_len=6, depth=2, heads=4, mem_len=10, cmem_len=3,
        cmem_ratio=4, gru_gated_residual=False,
    ),
    # Mogrifier GRU; 5 evicted slots padded by 1 to 6 -> 3 compressed; cmem_len 5 > 5 // 2.
    "mogrify_odd_seq": dict(
        num_tokens=32, dim=16, seq_len=5, depth=2, heads=2, mem_len=5, cmem_len=5,
        cmem_ratio=2, mogrify_gru=True,
    ),
    # mem_len 3 < ratio 4 makes the default cmem_len 0: nothing is ever compressed. GLU.
    "cmem_zero_glu": dict(
        num_tokens=16, dim=16, seq_len=2, depth=2, heads=4, mem_len=3, cmem_ratio=4,
        ff_glu=True,
    ),
    # emb_dim < dim (to_model_dim and to_logits.0 exist); no enhanced recurrence; memory in
    # layers 1 and 3 of 3; aux loss weighted 0.5.
    "small_emb_no_recurrence": dict(
        num_tokens=32, dim=16, emb_dim=8, seq_len=4, depth=3, heads=2, memory_layers=[1, 3],
        enhanced_recurrence=False, cmem_ratio=2, reconstruction_loss_weight=0.5,
    ),
    # Ratio 3, memory 2x seq_len, GLU with plain residuals, no enhanced recurrence.
    "glu_ratio3_mem2x": dict(
        num_tokens=40, dim=32, seq_len=6, depth=2, heads=4, mem_len=12, cmem_ratio=3,
        ff_glu=True, gru_gated_residual=False, enhanced_recurrence=False,
    ),
    # Only the top layer remembers; mem_len 6 not a multiple of 4 (evicts 2, then 4);
    # Mogrifier with dim 24; aux loss weighted 2.
    "top_layer_only_mogrify": dict(
        num_tokens=32, dim=24, seq_len=4, depth=3, heads=3, memory_layers=[3], mem_len=6,
        cmem_len=5, cmem_ratio=2, mogrify_gru=True, reconstruction_loss_weight=2.0,
    ),
    # emb_dim > dim, 8 heads of 4, three memory layers rolled by enhanced recurrence.
    "wide_emb_heads8": dict(
        num_tokens=48, dim=32, emb_dim=48, seq_len=8, depth=3, heads=8, mem_len=16,
        cmem_len=8, cmem_ratio=4,
    ),
}

# Adaptive input and softmax (tests/test_adaptive.py; kept out of CONFIGS, whose sweeps stay cheap):
# three cutoffs with div_val 2 (widths 32, 16, 8, 4) on the upstream layout; emb_dim > dim with
# div_val 4 down to width 1, memory in two of three layers, memory 2x seq_len.
ADAPTIVE_CONFIGS: dict[str, dict[str, Any]] = {
    "adaptive_div2": dict(
        num_tokens=60, dim=32, seq_len=6, depth=2, heads=4, mem_len=6, cmem_len=3, cmem_ratio=2,
        adaptive_cutoffs=[10, 25, 40], adaptive_div_val=2,
    ),
    "adaptive_wide_emb_div4": dict(
        num_tokens=50, dim=16, emb_dim=24, seq_len=4, depth=3, heads=2, memory_layers=[2, 3], mem_len=8,
        cmem_len=4, cmem_ratio=2, adaptive_cutoffs=[8, 30], adaptive_div_val=4,
    ),
}

# Weights are WEIGHT_GAIN / sqrt(fan_in) * N(0, 1): gain 1 with five Mogrifier gates (each
# up to 2x) drives float32 rounding of either framework to ~5e-6 of the float64 result.
WEIGHT_GAIN = 0.5


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Sets every parameter, pos_emb included (zero-initialised upstream, which hides
    positional bugs), to non-zero random values of a sensible scale; returns the model.

    Draws follow named_parameters() order, so upstream and ct_torch_ref models of one
    config get identical values from one seed.
    """
    import torch  # here: the parallel workers import this module without torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name == "pos_emb":
                value = 0.5 * noise
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif param.ndim == 1:  # LayerNorm gains
                value = 1.0 + 0.1 * noise
            elif name.startswith("token_emb") and ".emb_projs." not in name:  # tables; adaptive projections below
                value = noise
            else:  # weights: variance-preserving 1 / sqrt(fan_in)
                fan_in = math.prod(param.shape[1:])
                value = WEIGHT_GAIN * noise / math.sqrt(max(1, fan_in))
            value = torch.where(value == 0, torch.full_like(value, 1e-3), value)
            param.copy_(value.to(param.dtype))
    return model


@contextlib.contextmanager
def float64(enabled: bool = True) -> Iterator[None]:
    """JAX's 64-bit types for the block (`enabled`), switched off again after it."""
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def loaded_model(config: dict[str, Any], state_dict: Mapping[str, Any], **kwargs: Any) -> CompressiveTransformer:
    """The JAX model of `config` (and `kwargs`) holding `state_dict`'s weights, built from shapes only where it
    can be (`convert.model_for_weights`): a random init compiles each initializer per parameter shape."""
    return convert.from_torch(state_dict, convert.model_for_weights(ModelConfig.from_kwargs(config), **kwargs))


def random_config(seed: int) -> dict[str, Any]:
    """A random valid configuration from the whole space upstream accepts (tiny sizes).

    Covers what fixed configs might miss: seq_len 1, ratios above seq_len, cmem_len 0,
    mem_len not a multiple of seq_len, arbitrary memory-layer subsets, every flag.
    """
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 4])
    dim = heads * rng.choice([2, 4, 8])
    seq_len = rng.choice([1, 2, 3, 4, 5, 6])
    cmem_ratio = rng.choice([1, 2, 3, 4, 5])
    mem_len = seq_len + rng.randrange(0, 2 * seq_len + 3)
    cmem_len = mem_len // cmem_ratio + rng.choice([0, 0, 1, 3])
    depth = rng.choice([1, 2, 3])
    layers = sorted(rng.sample(range(1, depth + 1), rng.randint(1, depth)))
    return dict(
        num_tokens=rng.choice([5, 17, 40]), dim=dim, seq_len=seq_len, depth=depth,
        emb_dim=rng.choice([None, dim, dim // 2 or 1, dim + 4]), memory_layers=layers,
        enhanced_recurrence=rng.random() < 0.5, mem_len=mem_len, cmem_len=cmem_len,
        cmem_ratio=cmem_ratio, heads=heads, gru_gated_residual=rng.random() < 0.7,
        mogrify_gru=rng.random() < 0.4 and dim >= 4, ff_glu=rng.random() < 0.5,
        reconstruction_loss_weight=rng.choice([1.0, 0.5, 3.0]),
    )


# Training: the second of the two segments compresses, so the aux loss is exercised.
# A plain Transformer-XL with a full-size memory: cmem_len 0 although mem_len // cmem_ratio = 4 (upstream
# refuses it; here it means no compressed memory). Not in CONFIGS: upstream 0.4.0 cannot build it.
TRANSFORMER_XL: dict[str, Any] = dict(num_tokens=32, dim=16, seq_len=4, depth=2, heads=2, mem_len=8, cmem_len=0,
                                      cmem_ratio=2)

TRAIN_MODEL = dict(num_tokens=256, dim=16, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2, cmem_ratio=2)
TRAIN_CONFIG = training.TrainConfig(batch_size=8, n_segments=2, learning_rate=1e-2, steps=6, eval_every=3,
                                    eval_batches=2, checkpoint_every=2, keep_checkpoints=2)


def make_trainer(config: training.TrainConfig = TRAIN_CONFIG, *, devices: list[jax.Device] | None = None,
                 compiler_options: dict[str, Any] | None = training.FAST_CPU_COMPILE) -> training.Trainer:
    """A Trainer of TRAIN_MODEL under `config` (fast CPU compiles unless told otherwise)."""
    return training.Trainer(training.create_model(TRAIN_MODEL, config), config, compiler_options=compiler_options,
                            devices=devices)


def train_batch(seed: int, config: training.TrainConfig = TRAIN_CONFIG) -> np.ndarray:
    """A (batch_size, n_segments * seq_len + 1) int32 batch of random TRAIN_MODEL tokens."""
    window = config.n_segments * TRAIN_MODEL["seq_len"] + 1
    return np.random.default_rng(seed).integers(0, TRAIN_MODEL["num_tokens"], (config.batch_size, window),
                                                dtype=np.int32)


# Paper options (docs/paper-options.md) are tested on this config: evictions of 2 then 3
# slots with ratio 4, so "exact" padding (1 zero) and upstream's (3 zeros, dropping two
# evicted slots) differ; compression from the third segment on.
OPTIONS_BASE: dict[str, Any] = dict(
    num_tokens=24, dim=8, seq_len=3, depth=2, heads=2, mem_len=7, cmem_len=3, cmem_ratio=4,
)
# Every non-default value of every option, one at a time.
OPTION_VALUES: list[tuple[str, str]] = [
    (name, value)
    for name, values in {
        "compression": ("mean_pool", "max_pool", "dilated_conv", "most_used"),
        "reconstruction_target": ("evicted",),
        "aux_loss": ("autoencoder", "none"),
        "eviction_padding": ("exact",),
        "relative_positions": ("sinusoidal",),
    }.items()
    for value in values
]


def random_options(seed: int) -> dict[str, str]:
    """A random combination of the paper options (most_used never with the autoencoder)."""
    rng = random.Random(1000 + seed)
    options = {name: rng.choice(values) for name, values in OPTIONS.items()}
    if options["compression"] == "most_used" and options["aux_loss"] == "autoencoder":
        options["aux_loss"] = "attention"
    return options


def present_fields(got: Memory, expected: Memory) -> list[tuple[str, jax.Array, jax.Array]]:
    """(field, got, expected) for the fields both memories hold (mem_usage exists only under most_used)."""
    assert (got.mem_usage is None) == (expected.mem_usage is None), "mem_usage present on one side only"
    return [(field, a, b) for field, a, b in zip(Memory._fields, got, expected) if b is not None]
