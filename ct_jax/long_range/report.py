"""Median and spread over seeds, and the Markdown tables of docs/long-range.md."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np


def summarize(values: Sequence[float]) -> str:
    """`median [min, max]` of per-seed values (a single value alone), two decimals."""
    values = [float(v) for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def recall_table(results: Iterable[dict], distances: Sequence[int], chance: float) -> str:
    """Rows = variants, columns = distances (span in the header), cells = median [min, max] over seeds."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        by_variant[result["variant"]].append(result)
    header = "| variant | seeds | steps | " + " | ".join(f"d={d}" for d in distances) + " |"
    lines = [header, "|" + "---|" * (3 + len(distances))]
    for name, runs in by_variant.items():
        cells = []
        for d in distances:
            values = [r["loss_by_distance"][d] for r in runs if d in r["loss_by_distance"]]
            spans = {r["span_by_distance"][d] for r in runs if d in r["span_by_distance"]}
            cells.append(f"{summarize(values)} ({'/'.join(sorted(spans))})" if values else "-")
        steps = "/".join(str(s) for s in sorted({r["steps"] for r in runs}))
        lines.append(f"| {name} | {len(runs)} | {steps} | " + " | ".join(cells) + " |")
    lines.append(f"\nLoss in nats on the recalled symbols, median [min, max] over seeds; "
                 f"chance ln {round(np.exp(chance))} "
                 f"= {chance:.2f}; (span) = where the fact sits for that model.")
    return "\n".join(lines)


def text_table(results: Iterable[dict], reference: str) -> str:
    """Rows = variants, cells = streamed bits per byte, median [min, max], and the per-seed gap to `reference`."""
    by_variant: dict[str, dict[int, dict]] = defaultdict(dict)
    for result in results:
        by_variant[result["variant"]][result["seed"]] = result
    lines = ["| variant | seeds | steps | tokens | bpb | gap to reference (same seed) |", "|---|---|---|---|---|---|"]
    base = by_variant.get(reference, {})
    for name, runs in by_variant.items():
        values = [r["bpb"] for r in runs.values()]
        gaps = [r["bpb"] - base[s]["bpb"] for s, r in runs.items() if s in base]
        gap = "reference" if name == reference else (f"{summarize(gaps)}" if gaps else "-")
        any_run = next(iter(runs.values()))
        cells = [name, len(runs), any_run["steps"], any_run["tokens"], summarize(values), gap]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def spread_table(results: Iterable[dict]) -> str:
    """Rows = compressive variants, cells = slot spread per memory layer, median [min, max] over seeds."""
    by_variant: dict[str, list[list[float]]] = defaultdict(list)
    layer_names: list[int] = []
    for result in results:
        if result.get("slot_spread"):
            by_variant[result["variant"]].append(result["slot_spread"])
            layer_names = result.get("memory_layers") or list(range(1, len(result["slot_spread"]) + 1))
    if not by_variant:
        return ""
    layers = max(len(v[0]) for v in by_variant.values())
    lines = ["| variant | " + " | ".join(f"layer {layer_names[i]}" for i in range(layers)) + " |",
             "|" + "---|" * (1 + layers)]
    for name, spreads in by_variant.items():
        cells = [summarize([s[i] for s in spreads]) for i in range(layers)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("\nSlot spread: std over the compressed slots / std over the plain memory's slots, end of a row "
                 "(mean pooling of independent slots at ratio r gives about 1/sqrt(r); near 0: the slots are alike).")
    return "\n".join(lines)


def reconstruction_table(results: Iterable[dict]) -> str:
    """Rows = compressive variants with `reconstruction` records, cells = median [min, max] over seeds
    of the relative attention-reconstruction error (`ct_jax.long_range.diagnose`) for the
    queries that compress and for those that recall, beside the recall loss at that distance."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        if result.get("reconstruction"):
            by_variant[result["variant"]].append(result)
    if not by_variant:
        return ""
    lines = ["| variant | seeds | d | error, compressing queries | error, recall queries | recall loss |",
             "|---|---|---|---|---|---|"]
    for name, runs in by_variant.items():
        distance = runs[0]["reconstruction_distance"]
        keys = ("compressing_queries", "recall_queries")
        cells = [summarize([r["reconstruction"][key] for r in runs]) for key in keys]
        loss = summarize([r["loss_by_distance"][distance] for r in runs])
        lines.append(f"| {name} | {len(runs)} | {distance} | " + " | ".join(cells) + f" | {loss} |")
    lines.append("\nError: mean squared difference between a head's read of the fact's segment through its compressed "
                 "slots and through its original memory slots, over the mean square of the latter (top memory layer; "
                 "compressing queries: the segment running when the fact's segment was compressed, which the "
                 "attention-reconstruction loss trains on; recall queries: the query segment's, at the recalled "
                 "symbols).")
    return "\n".join(lines)
