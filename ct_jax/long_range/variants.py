"""The compared models: Compressive Transformer variants and Transformer-XL baselines, as
model keyword dicts (sizes aside) plus `TrainConfig` overrides."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model setting: memory geometry, paper options and training overrides."""

    name: str
    mem_len: int
    cmem_len: int
    cmem_ratio: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # ModelConfig keywords
    train: dict[str, Any] = dataclasses.field(default_factory=dict)  # TrainConfig overrides

    @property
    def covered(self) -> int:
        """Tokens before a segment that the memories cover: `mem_len + cmem_len * cmem_ratio`."""
        return self.mem_len + self.cmem_len * self.cmem_ratio

    @property
    def attended(self) -> int:
        """Memory slots a query attends to: `mem_len + cmem_len`."""
        return self.mem_len + self.cmem_len

    def model_kwargs(self) -> dict[str, Any]:
        """ModelConfig keywords of the memory (a plain memory gets a ratio above mem_len, so that
        `cmem_len = 0` passes upstream's `cmem_len >= mem_len // cmem_ratio`)."""
        ratio = self.cmem_ratio if self.cmem_len else self.mem_len + 1
        return dict(mem_len=self.mem_len, cmem_len=self.cmem_len, cmem_ratio=ratio, **self.options)


def transformer_xl(name: str, mem_len: int) -> Variant:
    """A Transformer-XL baseline: plain memory of `mem_len` slots, no compressed memory."""
    return Variant(name, mem_len, 0, 1)


def baselines(mem_len: int, cmem_len: int, ratio: int) -> list[Variant]:
    """Transformer-XL with the CT's attended slots and with its covered span."""
    return [
        transformer_xl(f"TXL mem {mem_len + cmem_len} (same slots)", mem_len + cmem_len),
        transformer_xl(f"TXL mem {mem_len + cmem_len * ratio} (same span)", mem_len + cmem_len * ratio),
    ]


def ct(name: str, mem_len: int, cmem_len: int, ratio: int, train: dict[str, Any] | None = None,
       **options: Any) -> Variant:
    """A Compressive Transformer variant with paper `options` (ModelConfig keywords)."""
    return Variant(name, mem_len, cmem_len, ratio, dict(options), dict(train or {}))
