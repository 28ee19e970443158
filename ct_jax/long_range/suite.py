"""The benchmark's runs: which variants, ratios, seeds and budgets the quick and full modes train."""

from __future__ import annotations

import dataclasses
from typing import Any

from ct_jax.long_range.harness import SIZES
from ct_jax.long_range.tasks import RecallTask
from ct_jax.long_range.variants import Variant, baselines, ct
from ct_jax.presets import LONG_RANGE

MEM_LEN, CMEM_LEN = 16, 16


def recall_task(quick: bool = False) -> RecallTask:
    """Facts at distances 8 (window), 16 (memory), 32 and 48 (compressed span at ratios 2 and 4),
    64 (beyond at ratio 2, compressed at ratio 4), query in the 5th segment of 16 tokens."""
    if quick:
        return RecallTask(n_segments=4, distances=(16, 48))
    return RecallTask(n_segments=5, distances=(8, 16, 32, 48, 64))


def long_range(name: str, ratio: int, **changes: Any) -> Variant:
    """The `LONG_RANGE` preset at `ratio`, optionally with model options or train fields changed."""
    model = {**LONG_RANGE["model"], **{k: v for k, v in changes.items() if k != "train"}}
    train = {**LONG_RANGE["train"], **changes.get("train", {})}
    return ct(name, MEM_LEN, CMEM_LEN, ratio, train=train, **model)


def main_variants(ratio: int) -> list[Variant]:
    """The headline comparison at `ratio`: LONG_RANGE, upstream's defaults and both Transformer-XLs
    (the same network and training as LONG_RANGE, without compressed memory)."""
    model = {k: v for k, v in LONG_RANGE["model"].items() if k not in ("compression", "aux_loss")}
    txl = [dataclasses.replace(v, options=model, train=dict(LONG_RANGE["train"]))
           for v in baselines(MEM_LEN, CMEM_LEN, ratio)]
    return [long_range("CT LONG_RANGE", ratio), ct("CT upstream defaults", MEM_LEN, CMEM_LEN, ratio), *txl]


def ablations(ratio: int) -> list[Variant]:
    """The paper's options one at a time on upstream's defaults, and LONG_RANGE with one part changed."""
    out = [
        ct("CT paper target (evicted)", MEM_LEN, CMEM_LEN, ratio, reconstruction_target="evicted"),
        ct("CT conv + memory gradients", MEM_LEN, CMEM_LEN, ratio, train=dict(memory_gradients=True)),
        ct("CT conv, aux autoencoder", MEM_LEN, CMEM_LEN, ratio, aux_loss="autoencoder"),
        ct("CT conv, no aux loss", MEM_LEN, CMEM_LEN, ratio, aux_loss="none"),
    ]
    for compression in ("mean_pool", "max_pool", "dilated_conv", "most_used"):
        out.append(ct(f"CT {compression}", MEM_LEN, CMEM_LEN, ratio, compression=compression))
    out.append(long_range("LONG_RANGE without memory gradients", ratio, train=dict(memory_gradients=False)))
    out.append(long_range("LONG_RANGE with mean pooling", ratio, compression="mean_pool"))
    out.append(long_range("LONG_RANGE with dilated conv", ratio, compression="dilated_conv"))
    out.append(long_range("LONG_RANGE + attention aux (evicted)", ratio, aux_loss="attention",
                          reconstruction_target="evicted"))
    out.append(long_range("LONG_RANGE with learned positions, GRU, enhanced recurrence", ratio,
                          relative_positions="learned", gru_gated_residual=True, enhanced_recurrence=True))
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one mode runs."""

    task: RecallTask
    ratios: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    ablation_seeds: tuple[int, ...]
    text_seeds: tuple[int, ...]
    text_steps: int
    text_eval_streams: int = 32  # the validation split read as this many contiguous streams, memory carried
    text_eval_segments: int | None = None  # segments per stream evaluated (None: the whole split)
    text_max_bytes: int | None = None  # corpus bytes loaded (None: the loader's default)
    memory_layers: tuple[int, ...] | None = (SIZES["depth"],)  # recall models' layers with memory (None: all)
    fast_compile: bool = False  # XLA options that compile 2-3x faster for a slower step (smoke runs)
    names: tuple[str, ...] | None = None  # only the variants (main and ablations) of these names (None: all)

    def recall_runs(self, ablation: bool = False) -> list[tuple[int, Variant, int]]:
        """(ratio, variant, seed) of the main recall runs, seeds outermost (or of the ablations, at
        the last, hardest ratio); a baseline shared by two ratios runs once, recorded under the first."""
        wanted = lambda variant: self.names is None or variant.name in self.names  # noqa: E731
        if ablation:
            return [(self.ratios[-1], v, seed) for seed in self.ablation_seeds for v in ablations(self.ratios[-1])
                    if wanted(v)]
        runs, seen = [], set()
        for seed in self.seeds:
            for ratio in self.ratios:
                for variant in main_variants(ratio):
                    if not wanted(variant):
                        continue
                    key = (repr(variant.model_kwargs()), repr(variant.train), seed)
                    if key not in seen:
                        seen.add(key)
                        runs.append((ratio, variant, seed))
        return runs

    def text_variants(self) -> list[Variant]:
        """LONG_RANGE at the first ratio and Transformer-XL with its attended slots (same network)."""
        ratio = self.ratios[0]
        return [long_range("CT LONG_RANGE", ratio), main_variants(ratio)[2]]


QUICK = Plan(recall_task(quick=True), ratios=(2,), seeds=(0,), steps=30, ablation_seeds=(), text_seeds=(0,),
             text_steps=10, text_eval_segments=8, text_max_bytes=1 << 20,
             fast_compile=True, names=("CT LONG_RANGE", f"TXL mem {MEM_LEN + CMEM_LEN} (same slots)"))
FULL = Plan(recall_task(), ratios=(2, 4), seeds=(0, 1, 2), steps=1500, ablation_seeds=(0,), text_seeds=(0, 1, 2),
            text_steps=600)
