"""Tiny named model configurations and input builders shared by every parity test.

CONFIGS maps a name to upstream constructor kwargs (treat as read-only; copy with
dict(CONFIGS[name])). Together they cover: heads 1 and > 1; memory_layers a strict subset
and all; mem_len 1x and 2x seq_len and not a multiple of it; seq_len not a multiple of
cmem_ratio (so evictions are left-padded); cmem_len above mem_len // cmem_ratio; cmem_len
0; GRU gating on and off, with and without the Mogrifier; GLU feed-forward; emb_dim below
and above dim; enhanced recurrence on and off; reconstruction_loss_weight != 1. Each was
checked to run on upstream 0.4.0 for 5+ segments (see tests/test_torch_ref.py).
"""

from __future__ import annotations

import math
from typing import Any

import torch

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

# None: no mask. "right"/"left": rows padded at the end/start of the whole sequence (so
# some segments hold fully padded rows). "padded_row": row 1 fully padded everywhere.
# Weights are WEIGHT_GAIN / sqrt(fan_in) * N(0, 1): gain 1 with five Mogrifier gates (each
# up to 2x) drives float32 rounding of either framework to ~5e-6 of the float64 result.
WEIGHT_GAIN = 0.5

MASK_KINDS: tuple[str | None, ...] = (None, "right", "left", "padded_row")


def segment_lengths(config: dict[str, Any], n_segments: int) -> list[int]:
    """n_segments - 1 full segments of seq_len, then a short one (seq_len // 2, >= 1)."""
    seq_len = config["seq_len"]
    return [seq_len] * (n_segments - 1) + [max(1, seq_len // 2)]


def make_inputs(
    config: dict[str, Any],
    batch: int = 3,
    n_segments: int = 5,
    seed: int = 0,
    mask_kind: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Random token segments (int64, (batch, t)) and their masks (bool, True = real token).

    The last segment is short (t < seq_len whenever seq_len > 1). Masks are None for
    mask_kind None; otherwise one mask per segment, cut from a whole-sequence mask.
    """
    if mask_kind not in MASK_KINDS:
        raise ValueError(f"mask_kind must be one of {MASK_KINDS}, got {mask_kind!r}")
    if mask_kind is not None and batch < 2:
        raise ValueError(f"masks need batch >= 2 (one unpadded row), got batch={batch}")
    generator = torch.Generator().manual_seed(seed)
    lengths = segment_lengths(config, n_segments)
    total = sum(lengths)
    tokens = torch.randint(0, config["num_tokens"], (batch, total), generator=generator)
    segments = list(tokens.split(lengths, dim=1))
    if mask_kind is None:
        return segments, [None] * n_segments

    positions = torch.arange(total)
    # Row 0 is never padded; the others keep between one token and all but one.
    kept = torch.randint(1, total, (batch,), generator=generator)
    kept[0] = total
    if mask_kind == "right":
        mask = positions[None, :] < kept[:, None]
    elif mask_kind == "left":
        mask = positions[None, :] >= (total - kept)[:, None]
    else:  # "padded_row"
        mask = torch.ones(batch, total, dtype=torch.bool)
        mask[1] = False
    return segments, list(mask.split(lengths, dim=1))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Sets every parameter, pos_emb included (zero-initialised upstream, which hides
    positional bugs), to non-zero random values of a sensible scale; returns the model.

    Draws follow named_parameters() order, so upstream and ct_torch_ref models of one
    config get identical values from one seed.
    """
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
            elif name.startswith("token_emb"):
                value = noise
            else:  # weights: variance-preserving 1 / sqrt(fan_in)
                fan_in = math.prod(param.shape[1:])
                value = WEIGHT_GAIN * noise / math.sqrt(max(1, fan_in))
            value = torch.where(value == 0, torch.full_like(value, 1e-3), value)
            param.copy_(value.to(param.dtype))
    return model


def random_config(seed: int) -> dict[str, Any]:
    """A random valid configuration from the whole space upstream accepts (tiny sizes).

    Covers what fixed configs might miss: seq_len 1, ratios above seq_len, cmem_len 0,
    mem_len not a multiple of seq_len, arbitrary memory-layer subsets, every flag.
    """
    import random

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
    import random

    from ct_torch_ref.options import OPTIONS

    rng = random.Random(1000 + seed)
    options = {name: rng.choice(values) for name, values in OPTIONS.items()}
    if options["compression"] == "most_used" and options["aux_loss"] == "autoencoder":
        options["aux_loss"] = "attention"
    return options
