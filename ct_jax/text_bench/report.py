"""The text benchmark's tables (Markdown): per size and tokenizer, each model's bits per byte over seeds,
the gap to the Compressive Transformer, the knockouts, the loss by distance and the attention masses."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ct_jax.text_bench.plan import CT_NAME, SIZES, variants
from ct_jax.text_bench.run import read_records

BUCKETS = ("in window", "CT memory reach", "same-slot TXL reach", "CT / same-span TXL reach", "CT 4x cmem reach",
           "beyond")


def _spread(values: list[float], digits: int = 3) -> str:
    """Median (min-max) over seeds, or the one value."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _gap(ct: float, other: float) -> float:
    """The CT's bits/byte relative to another model's, percent (negative: the CT is better)."""
    return 100 * (ct - other) / other


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]]:
    """(size, tokenizer, steps) -> variant -> records (one per seed), sizes in plan order."""
    order = {name: i for i, name in enumerate(SIZES)}
    groups: dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]] = {}
    for record in sorted(records, key=lambda r: (order.get(r["size"], 99), r["tokenizer"], r["steps"], r["seed"])):
        key = (record["size"], record["tokenizer"], record["steps"])
        groups.setdefault(key, {}).setdefault(record["variant"], []).append(record)
    return groups


def _main_table(by_variant: dict[str, list[dict[str, Any]]]) -> str:
    ct = {r["seed"]: r["bpb"] for r in by_variant.get(CT_NAME, [])}
    lines = ["| model | seeds | bits/byte | CT vs this model (median, range of per-seed gaps) | "
             "compressed memory emptied | all memory emptied | compressed memory 4x at eval |",
             "|---|---|---|---|---|---|---|"]
    for variant in variants():
        rows = by_variant.get(variant.name, [])
        if not rows:
            continue
        gaps = [_gap(ct[r["seed"]], r["bpb"]) for r in rows if r["seed"] in ct]
        gap = f"{statistics.median(gaps):+.1f}% ({min(gaps):+.1f} to {max(gaps):+.1f})" if gaps and rows[0][
            "variant"] != CT_NAME else "-"
        knocked = [100 * (r["nocmem_bpb"] - r["bpb"]) / r["bpb"] for r in rows if "nocmem_bpb" in r]
        longer = [100 * (r["longer_bpb"] - r["bpb"]) / r["bpb"] for r in rows if "longer_bpb" in r]
        lines.append(f"| {variant.name} | {len(rows)} | {_spread([r['bpb'] for r in rows])} | {gap} | "
                     f"{_spread([r['nocmem_bpb'] for r in rows if 'nocmem_bpb' in r])}"
                     f"{f' ({statistics.median(knocked):+.1f}%)' if knocked else ''} | "
                     f"{_spread([r['nomem_bpb'] for r in rows if 'nomem_bpb' in r])} | "
                     f"{_spread([r['longer_bpb'] for r in rows if 'longer_bpb' in r])}"
                     f"{f' ({statistics.median(longer):+.1f}%)' if longer else ''} |")
    return "\n".join(lines)


def _bucket_table(by_variant: dict[str, list[dict[str, Any]]]) -> str:
    measured = [rows for rows in by_variant.values() if rows and "bucket_bits" in rows[0]]
    if not measured:
        return ""
    edges = measured[0][0]["bucket_edges"]
    names = [f"{name} (< {edge})" for name, edge in zip(BUCKETS, edges)] + [f"beyond (>= {edges[-1]})"]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for variant in variants():
        rows = [r for r in by_variant.get(variant.name, []) if "bucket_bits" in r]
        for prefix, label in (("", ""), ("nocmem_", ", compressed memory emptied")):
            if rows and f"{prefix}bucket_bits" in rows[0]:
                cells = [statistics.median(r[f"{prefix}bucket_bits"][i] for r in rows) for i in range(len(names))]
                lines.append(f"| {variant.name}{label} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    counts = measured[0][0]["bucket_count"]
    lines.append("| tokens per bucket | " + " | ".join(f"{c:,}" for c in counts) + " |")
    return "\n".join(lines)


def _mass_table(by_variant: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["| model | layer | compressed memory | memory | segment |", "|---|---|---|---|---|"]
    for variant in variants():
        rows = [r for r in by_variant.get(variant.name, []) if r.get("attention_mass")]
        if rows:
            for layer in range(len(rows[0]["attention_mass"])):
                cells = [statistics.median(r["attention_mass"][layer][part] for r in rows) for part in range(3)]
                lines.append(f"| {variant.name} | {layer + 1} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _scale_table(groups: dict[tuple[str, str, int], dict[str, list[dict[str, Any]]]]) -> str:
    """The CT's gap to each Transformer-XL by size and budget (median over seeds of the per-seed gaps)."""
    others = [v.name for v in variants() if v.name != CT_NAME]
    lines = ["| size | tokenizer | steps | CT bits/byte | " + " | ".join(f"CT vs {name}" for name in others)
             + " | compressed memory emptied |", "|---" * (5 + len(others)) + "|"]
    for (size, tokenizer, steps), by_variant in groups.items():
        ct = {r["seed"]: r for r in by_variant.get(CT_NAME, [])}
        if not ct:
            continue
        cells = []
        for name in others:
            gaps = [_gap(ct[r["seed"]]["bpb"], r["bpb"]) for r in by_variant.get(name, []) if r["seed"] in ct]
            cells.append(f"{statistics.median(gaps):+.1f}% ({len(gaps)} seeds)" if gaps else "-")
        knocked = [100 * (r["nocmem_bpb"] - r["bpb"]) / r["bpb"] for r in ct.values() if "nocmem_bpb" in r]
        lines.append(f"| {size} ({SIZES[size].dim}x{SIZES[size].depth}) | {tokenizer} | {steps} | "
                     f"{_spread([r['bpb'] for r in ct.values()])} | " + " | ".join(cells)
                     + f" | {f'+{statistics.median(knocked):.1f}%' if knocked else '-'} |")
    return "\n".join(lines)


def tables(records: list[dict[str, Any]]) -> str:
    """Markdown: the gap against scale, then per size and tokenizer the main, distance and mass tables."""
    groups = _groups(records)
    parts = ["### The CT's gap against scale (negative: the CT is better)\n\n" + _scale_table(groups)]
    for (size, tokenizer, steps), by_variant in groups.items():
        title = f"{size} (dim {SIZES[size].dim}, {SIZES[size].depth} layers), {tokenizer}, {steps} steps"
        parts.append(f"### {title}\n\n" + _main_table(by_variant))
        for heading, table in (("bits per token by distance from the document's start (tokens)",
                                _bucket_table(by_variant)), ("attention mass per layer", _mass_table(by_variant))):
            if table:
                parts.append(f"#### {title}: {heading}\n\n{table}")
    return "\n\n".join(parts) + "\n"


def merged_records(out: str | Path) -> list[dict[str, Any]]:
    """results.jsonl (training) joined with measures.jsonl (the measured model) per run."""
    out = Path(out)
    measured = {tuple(r[k] for k in ("size", "tokenizer", "variant", "seed", "steps")): r
                for r in read_records(out / "measures.jsonl")}
    return [{**record, **measured.get(tuple(record[k] for k in ("size", "tokenizer", "variant", "seed", "steps")), {})}
            for record in read_records(out / "results.jsonl")]


def write_tables(out: str | Path) -> str:
    """The tables of `out`'s records, written to `out/tables.md` and returned."""
    text = tables(merged_records(out))
    (Path(out) / "tables.md").write_text(text)
    return text
