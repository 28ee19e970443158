"""The benchmark's figure: recall loss by distance for each variant, one panel per ratio,
every seed as a dot and the median as a line (docs/long-range.png)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ct_jax.io import atomic_write


def plot_recall(panels: dict[int, list[dict[str, Any]]], distances: Sequence[int], chance: float,
                path: str | os.PathLike) -> Path:
    """`panels`: ratio -> recall records (`loss_by_distance` with int keys); a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False, sharey=True)
    names = list(dict.fromkeys(r["variant"] for records in panels.values() for r in records))
    colors = {name: f"C{index}" for index, name in enumerate(names)}  # one colour per variant in every panel
    for axis, (ratio, records) in zip(axes[0], sorted(panels.items())):
        by_variant: dict[str, list[dict[int, float]]] = defaultdict(list)
        for record in records:
            by_variant[record["variant"]].append(record["loss_by_distance"])
        for name, runs in by_variant.items():
            color = colors[name]
            shown = [d for d in distances if all(d in run for run in runs)]
            for run in runs:
                axis.plot(shown, [run[d] for d in shown], ".", color=color, alpha=0.5)
            axis.plot(shown, [np.median([run[d] for run in runs]) for d in shown], "-", color=color,
                      label=f"{name} ({len(runs)} seeds)")
        axis.axhline(chance, color="grey", linestyle="--", linewidth=0.8, label="chance")
        axis.axhline(chance / 4, color="grey", linestyle=":", linewidth=0.8, label="quarter of chance")
        axis.set_title(f"ratio {ratio}")
        axis.set_xlabel("distance from fact to query (tokens)")
        axis.set_xticks(list(distances))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="center left")
    axes[0][0].set_ylabel("recall loss (nats)")
    figure.tight_layout()
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(figure)
