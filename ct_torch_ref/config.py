"""Constructor kwargs of the reference model: validated, defaults resolved, JSON-ready (config.json)."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

from .adaptive import check_adaptive
from .options import check_option


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a probability (a float in [0, 1]), got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def _memory_layers(value: Iterable[int] | None, depth: int) -> list[int]:
    if value is None:
        return list(range(1, depth + 1))
    try:
        items = list(value)
        if any(isinstance(layer, bool) for layer in items):
            raise TypeError
        layers = [operator.index(layer) for layer in items]
    except TypeError:
        raise TypeError(
            f"memory_layers must be an iterable of ints in [1, depth={depth}], got {value!r}"
        ) from None
    if not layers:
        raise ValueError(
            f"memory_layers must name at least one layer in [1, depth={depth}], got an empty "
            "list; use a model without memory elsewhere if that is what you want"
        )
    invalid = [layer for layer in layers if not 1 <= layer <= depth]
    if invalid:
        raise ValueError(
            f"memory_layers entries must be in [1, depth={depth}] (1-based), got {layers}; "
            f"invalid: {invalid}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"memory_layers must not repeat a layer, got {layers}")
    return sorted(layers)


def normalize_config(
    num_tokens: int,
    dim: int,
    seq_len: int,
    depth: int,
    emb_dim: int | None = None,
    memory_layers: Iterable[int] | None = None,
    enhanced_recurrence: bool = True,
    mem_len: int | None = None,
    cmem_len: int | None = None,
    cmem_ratio: int = 4,
    heads: int = 8,
    gru_gated_residual: bool = True,
    mogrify_gru: bool = False,
    attn_dropout: float = 0.0,
    ff_glu: bool = False,
    ff_dropout: float = 0.0,
    attn_layer_dropout: float = 0.0,
    reconstruction_attn_dropout: float = 0.0,
    reconstruction_loss_weight: float = 1.0,
    compression: str = "conv",
    reconstruction_target: str = "memory",
    aux_loss: str = "attention",
    eviction_padding: str = "upstream",
    relative_positions: str = "learned",
    clamp_len: int | None = None,
    adaptive_cutoffs: Sequence[int] | None = None,
    adaptive_div_val: int = 1,
) -> dict[str, Any]:
    """Validates upstream's constructor kwargs and returns them with defaults resolved.

    The result is JSON-serialisable (memory_layers a sorted list) and builds the same model.
    The adaptive keywords appear only for an adaptive model, and clamp_len only when set, so a
    default model's config (and config.json) keeps the keys it had before they existed.
    """
    for name, value in dict(
        num_tokens=num_tokens, dim=dim, seq_len=seq_len, depth=depth, heads=heads,
        cmem_ratio=cmem_ratio,
    ).items():
        _positive_int(name, value)
    if dim % heads != 0:
        raise ValueError(f"dim must be divisible by heads, got dim={dim}, heads={heads}")
    emb_dim = dim if emb_dim is None else _positive_int("emb_dim", emb_dim)

    mem_len = seq_len if mem_len is None else _int("mem_len", mem_len)
    if mem_len < seq_len:
        raise ValueError(f"mem_len must be an int >= seq_len={seq_len}, got {mem_len!r}")
    min_cmem_len = mem_len // cmem_ratio
    cmem_len = min_cmem_len if cmem_len is None else _int("cmem_len", cmem_len)
    if 0 < cmem_len < min_cmem_len or cmem_len < 0:  # 0: no compressed memory (upstream refuses it when mem_len
        # >= cmem_ratio; its `[:, -0:]` would keep every compressed slot, here none is kept)
        raise ValueError(
            f"cmem_len must be an int >= mem_len // cmem_ratio = {mem_len} // {cmem_ratio} "
            f"= {min_cmem_len}, or 0 for no compressed memory, got {cmem_len!r}"
        )
    options = dict(
        compression=check_option("compression", compression),
        reconstruction_target=check_option("reconstruction_target", reconstruction_target),
        aux_loss=check_option("aux_loss", aux_loss),
        eviction_padding=check_option("eviction_padding", eviction_padding),
        relative_positions=check_option("relative_positions", relative_positions),
    )
    cutoffs, div_val = check_adaptive(num_tokens, emb_dim, adaptive_cutoffs, adaptive_div_val)
    if cutoffs is None and div_val != 1:
        raise ValueError(
            f"adaptive_div_val={div_val} needs adaptive_cutoffs (it sets the clusters' widths), got "
            "adaptive_cutoffs=None; pass cutoffs, or leave adaptive_div_val at 1"
        )
    adaptive = {} if cutoffs is None else dict(adaptive_cutoffs=cutoffs, adaptive_div_val=div_val)
    clamp = {} if clamp_len is None else dict(clamp_len=_positive_int("clamp_len", clamp_len))
    if clamp and options["relative_positions"] != "sinusoidal":
        raise ValueError(
            f"clamp_len={clamp_len} needs relative_positions='sinusoidal' (learned positions read a table row "
            f"per distance, which cannot be clamped without changing its drift), got "
            f"relative_positions={options['relative_positions']!r}; leave clamp_len unset"
        )
    if compression == "most_used" and aux_loss == "autoencoder":
        raise ValueError(
            "aux_loss='autoencoder' decodes windows of evicted slots, but compression="
            "'most_used' keeps single slots; use aux_loss 'attention' or 'none' with it"
        )

    return dict(
        num_tokens=num_tokens,
        dim=dim,
        seq_len=seq_len,
        depth=depth,
        emb_dim=emb_dim,
        memory_layers=_memory_layers(memory_layers, depth),
        enhanced_recurrence=bool(enhanced_recurrence),
        mem_len=mem_len,
        cmem_len=cmem_len,
        cmem_ratio=cmem_ratio,
        heads=heads,
        gru_gated_residual=bool(gru_gated_residual),
        mogrify_gru=bool(mogrify_gru),
        attn_dropout=_probability("attn_dropout", attn_dropout),
        ff_glu=bool(ff_glu),
        ff_dropout=_probability("ff_dropout", ff_dropout),
        attn_layer_dropout=_probability("attn_layer_dropout", attn_layer_dropout),
        reconstruction_attn_dropout=_probability(
            "reconstruction_attn_dropout", reconstruction_attn_dropout
        ),
        reconstruction_loss_weight=_finite("reconstruction_loss_weight", reconstruction_loss_weight),
        **options,
        **clamp,
        **adaptive,
    )


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)
