"""What the text benchmark trains: model sizes, the compared memories, tokenizers, seeds and budget.

Every model reads segments of 64 tokens. The Compressive Transformer keeps 64 memories and 64
compressed slots at ratio 4 (128 attended slots covering 320 tokens before the segment); the
Transformer-XLs are the same network without compression, attending to the same 128 slots or
covering the same 320 tokens. All train the paper's way: streams through the documents, the
memory carried across steps, with `presets.LONG_RANGE`'s options and optimiser.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ct_jax.long_range.variants import Variant, baselines, ct
from ct_jax.presets import LONG_RANGE, MAIN_JOB

SEQ_LEN, MEM_LEN, CMEM_LEN, RATIO = 64, 64, 64, 4


@dataclasses.dataclass(frozen=True)
class Size:
    """A network size: width, layers, heads."""

    name: str
    dim: int
    depth: int
    heads: int

    def model_kwargs(self) -> dict[str, Any]:
        return dict(dim=self.dim, depth=self.depth, heads=self.heads, seq_len=SEQ_LEN)


SIZES = {size.name: size for size in (Size("XS", 32, 2, 2), Size("S", 64, 2, 4), Size("M", 128, 3, 4))}
CT_NAME = f"CT mem {MEM_LEN} + cmem {CMEM_LEN} x{RATIO}"


def variants() -> list[Variant]:
    """The recommended CT (`LONG_RANGE`) and Transformer-XL with its attended slots and with its span."""
    model = {k: v for k, v in LONG_RANGE["model"].items() if k not in ("compression", "aux_loss")}
    txl = [dataclasses.replace(v, options=model) for v in baselines(MEM_LEN, CMEM_LEN, RATIO)]
    return [ct(CT_NAME, MEM_LEN, CMEM_LEN, RATIO, **LONG_RANGE["model"]), *txl]


def train_fields(steps: int, seed: int) -> dict[str, Any]:
    """`TrainConfig` fields: the main job's batch and schedule with `LONG_RANGE`'s optimiser, streamed,
    validated only at the end (the whole split), checkpointed only at the end."""
    fields = {**MAIN_JOB["train"], **LONG_RANGE["train"]}
    return dict(fields, steps=steps, seed=seed, data_order="streams", eval_every=0, checkpoint_every=0)


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run of the benchmark."""

    size: str
    tokenizer: str
    variant: str
    seed: int
    steps: int

    @property
    def folder(self) -> str:
        name = "".join(c if c.isalnum() else "-" for c in self.variant).strip("-")
        return f"{self.size}/{self.tokenizer.replace(':', '-')}/{self.steps}/{name}/seed{self.seed}"


def runs(sizes: list[str], tokenizers: list[str], seeds: list[int], steps: int,
         names: list[str] | None = None) -> list[Run]:
    """Every (size, tokenizer, seed, variant), seeds outermost so a partial benchmark has whole seeds;
    `names` keeps only those variants (all by default)."""
    chosen = [variant_named(name) for name in names] if names else variants()
    return [Run(size, tokenizer, variant.name, seed, steps) for seed in seeds for size in sizes
            for tokenizer in tokenizers for variant in chosen]


def variant_named(name: str) -> Variant:
    for variant in variants():
        if variant.name == name:
            return variant
    raise ValueError(f"variant must be one of {[v.name for v in variants()]}, got {name!r}")
