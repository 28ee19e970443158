"""The model's constructor arguments: upstream 0.4.0's keywords, defaults and checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from ct_jax._checks import check_bool, check_float, check_int
from ct_jax.adaptive import check_adaptive
from ct_jax.options import (
    OPTIONS,
    AuxLoss,
    Compression,
    EvictionPadding,
    ReconstructionTarget,
    RelativePositions,
    check_option,
)

MISSING = dataclasses.MISSING


def documented(default: Any, help: str) -> Any:
    """A dataclass field carrying its `--help` text (ct_jax.cli reads it): each setting is described once."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Normalised constructor arguments of the Compressive Transformer.

    Field names and defaults are those of `compressive_transformer_pytorch` 0.4.0;
    `None` defaults are resolved as upstream does (`mem_len = seq_len`,
    `cmem_len = mem_len // cmem_ratio`, `memory_layers = 1..depth`).
    """

    num_tokens: int = documented(MISSING, "vocabulary size")
    dim: int = documented(MISSING, "model width")
    seq_len: int = documented(MISSING, "tokens per segment")
    depth: int = documented(MISSING, "layers")
    emb_dim: int | None = documented(None, "token embedding width, projected to dim (unset: dim)")
    memory_layers: Iterable[int] | None = documented(None, "layers (1-based) that keep memory (unset: all)")  # a tuple
    enhanced_recurrence: bool = documented(True, "each memory layer reads the memory of the layer above")
    mem_len: int | None = documented(None, "memory slots per memory layer (unset: seq_len)")
    cmem_len: int | None = documented(None, "compressed memory slots (unset: mem_len // cmem_ratio; 0: none, a "
                                      "plain Transformer-XL)")
    cmem_ratio: int = documented(4, "evicted memories per compressed slot")
    heads: int = documented(8, "attention heads (dim must be divisible by heads)")
    gru_gated_residual: bool = documented(True, "GRU gates instead of residual additions")
    mogrify_gru: bool = documented(False, "a Mogrifier before each GRU gate")
    attn_dropout: float = documented(0.0, "dropout of the attention weights")
    ff_glu: bool = documented(False, "gated (GLU) feed-forward")
    ff_dropout: float = documented(0.0, "feed-forward dropout")
    attn_layer_dropout: float = documented(0.0, "dropout of the attention block's output")
    reconstruction_attn_dropout: float = documented(0.0, "attention dropout in the reconstruction loss")
    reconstruction_loss_weight: float = documented(1.0, "weight of the auxiliary loss")
    # Paper-faithful options (docs/paper-options.md); the defaults are upstream's behaviour.
    # A string is turned into its enum member, which equals the string.
    compression: Compression | str = documented(Compression.CONV, "how evicted memories are compressed")
    reconstruction_target: ReconstructionTarget | str = documented(
        ReconstructionTarget.MEMORY, "what the attention-reconstruction loss reconstructs")
    aux_loss: AuxLoss | str = documented(AuxLoss.ATTENTION, "the compressor's auxiliary loss")
    eviction_padding: EvictionPadding | str = documented(
        EvictionPadding.UPSTREAM, "zeros padding the evicted memories to a multiple of cmem_ratio")
    relative_positions: RelativePositions | str = documented(RelativePositions.LEARNED, "relative position encoding")
    clamp_len: int | None = documented(
        None, "sinusoidal positions: distances beyond it read its encoding (Transformer-XL's; unset: none)")
    # Adaptive input and softmax (docs/paper-options.md); unset: the full embedding and softmax.
    adaptive_cutoffs: Sequence[int] | None = documented(
        None, "adaptive input/softmax cluster starts, e.g. 20000,40000,200000 (unset: full softmax)")  # a tuple
    adaptive_div_val: int = documented(1, "adaptive cluster i has width emb_dim // adaptive_div_val**i")

    def __post_init__(self) -> None:
        set_ = self._set
        for name in ("num_tokens", "dim", "seq_len", "depth", "heads", "cmem_ratio"):
            set_(name, check_int(name, getattr(self, name)))
        set_("emb_dim", check_int("emb_dim", self.emb_dim) if self.emb_dim is not None else self.dim)
        set_("mem_len", check_int("mem_len", self.seq_len if self.mem_len is None else self.mem_len, None))
        if self.mem_len < self.seq_len:
            raise ValueError(
                f"mem_len must be at least seq_len ({self.seq_len}), got {self.mem_len}"
            )
        min_cmem = self.mem_len // self.cmem_ratio
        set_("cmem_len", check_int("cmem_len", min_cmem if self.cmem_len is None else self.cmem_len, None))
        if 0 < self.cmem_len < min_cmem:  # 0: no compressed memory, a plain Transformer-XL (upstream refuses it)
            raise ValueError(
                f"cmem_len must be at least mem_len // cmem_ratio ({min_cmem}), or 0 for no compressed memory, "
                f"got {self.cmem_len}"
            )
        if self.dim % self.heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads, got heads={self.heads}")
        set_("memory_layers", _memory_layers(self.memory_layers, self.depth))
        for name in ("attn_dropout", "ff_dropout", "attn_layer_dropout", "reconstruction_attn_dropout"):
            set_(name, check_float(name, getattr(self, name), 0.0, maximum=1.0))  # [0, 1] as torch's nn.Dropout
        for name in ("enhanced_recurrence", "gru_gated_residual", "mogrify_gru", "ff_glu"):
            check_bool(name, getattr(self, name))
        set_("reconstruction_loss_weight", check_float("reconstruction_loss_weight", self.reconstruction_loss_weight))
        for name in OPTIONS:
            set_(name, check_option(name, getattr(self, name)))
        cutoffs, div_val = check_adaptive(self.num_tokens, self.emb_dim, self.adaptive_cutoffs, self.adaptive_div_val)
        if cutoffs is None and div_val != 1:
            raise ValueError(
                f"adaptive_div_val={div_val} needs adaptive_cutoffs (it sets the clusters' widths), got "
                "adaptive_cutoffs=None; pass cutoffs, or leave adaptive_div_val at 1"
            )
        set_("adaptive_cutoffs", cutoffs)
        if self.clamp_len is not None:
            set_("clamp_len", check_int("clamp_len", self.clamp_len))
            if self.relative_positions != "sinusoidal":
                raise ValueError(
                    f"clamp_len={self.clamp_len} needs relative_positions='sinusoidal' (learned positions read a "
                    f"table row per distance, which cannot be clamped without changing its drift), got "
                    f"relative_positions={self.relative_positions.value!r}; leave clamp_len unset"
                )
        if self.compression == "most_used" and self.aux_loss == "autoencoder":
            raise ValueError(
                "aux_loss='autoencoder' decodes windows of evicted slots, but compression="
                "'most_used' keeps single slots; use aux_loss 'attention' or 'none' with it"
            )

    def _set(self, name: str, value: Any) -> None:
        """Stores a normalised value in this frozen dataclass (construction only)."""
        object.__setattr__(self, name, value)

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads

    @property
    def pos_len(self) -> int:
        """Rows of the relative-position table: `seq_len + mem_len + cmem_len`."""
        return self.seq_len + self.mem_len + self.cmem_len

    @property
    def trained_reach(self) -> int:
        """The largest relative distance (in slots) whose encoding this model reads: the last query of a
        window to the oldest compressed slot, `seq_len + mem_len + cmem_len - 1`, or `clamp_len` if smaller.

        Keys are `cmem|mem|window`, each slot (compressed or not) one step of distance. Evaluated with
        longer memories, the model sees farther distances than it trained on; building that model with
        `clamp_len=trained_reach` of the training config keeps every encoding one training saw.
        """
        reach = self.pos_len - 1
        return reach if self.clamp_len is None else min(reach, self.clamp_len)

    @property
    def adaptive(self) -> bool:
        """Whether the model uses adaptive input and softmax (`adaptive_cutoffs` set)."""
        return self.adaptive_cutoffs is not None

    @property
    def uses_dropout(self) -> bool:
        return any(
            r > 0
            for r in (self.attn_dropout, self.ff_dropout, self.attn_layer_dropout, self.reconstruction_attn_dropout)
        )

    def to_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs as JSON-friendly values (the `config.json` of a checkpoint)."""
        kwargs = dataclasses.asdict(self)
        kwargs["memory_layers"] = list(self.memory_layers)
        if self.adaptive:
            kwargs["adaptive_cutoffs"] = list(self.adaptive_cutoffs)
        else:  # written only when adaptive, as ct_torch_ref: a default config.json keeps its keys
            del kwargs["adaptive_cutoffs"], kwargs["adaptive_div_val"]
        if self.clamp_len is None:  # written only when set, as ct_torch_ref
            del kwargs["clamp_len"]
        return kwargs

    @classmethod
    def from_kwargs(cls, kwargs: Any) -> ModelConfig:  # checks its own argument (a JSON object)
        """Builds a config from constructor kwargs, naming any keyword upstream does not have."""
        if not isinstance(kwargs, dict):
            raise TypeError(f"model arguments must be a mapping of constructor keywords (a JSON object), "
                            f"got {type(kwargs).__name__}: {kwargs!r:.80}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown model arguments {unknown}; expected a subset of {sorted(known)}")
        return cls(**kwargs)


def _memory_layers(memory_layers: Iterable[int] | None, depth: int) -> tuple[int, ...]:
    if memory_layers is None:
        return tuple(range(1, depth + 1))
    layers = list(memory_layers)
    if not layers:
        raise ValueError("memory_layers must name at least one layer in 1..depth, got []")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"memory_layers entries must be ints in 1..{depth} (depth), got {layer!r}")
        if not 1 <= layer <= depth:
            raise ValueError(f"memory_layers entries must be ints in 1..{depth} (depth), got {layer!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"memory_layers must not repeat a layer, got {layers}")
    return tuple(sorted(layers))
