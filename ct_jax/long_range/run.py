"""Runs a `Plan`: every recall run and the text runs, results appended to a JSON-lines file
(a run already in it is skipped, so an interrupted benchmark resumes), then the tables."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ct_jax.data import load_corpus
from ct_jax.long_range.harness import train_recall
from ct_jax.long_range.report import recall_table, text_table
from ct_jax.long_range.suite import Plan
from ct_jax.long_range.text import train_text
from ct_jax.training import FAST_CPU_COMPILE


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_plan(plan: Plan, out_dir: str | Path, *, recall: bool = True, text: bool = True, corpus: str | None = None,
             log: Callable[[str], Any] = print) -> str:
    """Trains what `plan` lists (skipping runs already recorded in `out_dir/results.jsonl`) and
    returns the Markdown tables (also written to `out_dir/tables.md`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    records = _done(results_path)
    options = FAST_CPU_COMPILE if plan.fast_compile else None
    done = {(r["kind"], r.get("ratio"), r["variant"], r["seed"], r["steps"]) for r in records}
    if recall:
        for ratio, variant, seed in plan.recall_runs():
            if ("recall", ratio, variant.name, seed, plan.steps) in done:
                continue
            result = train_recall(plan.task, variant, seed, plan.steps, compiler_options=options)
            record = dict(kind="recall", ratio=ratio, **dataclasses.asdict(result))
            _append(results_path, record)
            records.append(record)
            log(f"recall ratio {ratio} | {variant.name} | seed {seed}: {result.loss_by_distance} "
                f"({result.seconds:.0f} s)")
    if text:
        splits = load_corpus(corpus, max_bytes=plan.text_max_bytes)
        for variant in plan.text_variants():
            for seed in plan.text_seeds:
                if ("text", None, variant.name, seed, plan.text_steps) in done:
                    continue
                result = train_text(splits, variant, seed, plan.text_steps, eval_bytes=plan.text_eval_bytes,
                                    compiler_options=options)
                record = dict(kind="text", ratio=None, **dataclasses.asdict(result))
                _append(results_path, record)
                records.append(record)
                log(f"text | {variant.name} | seed {seed}: {result.bpb:.3f} bpb ({result.seconds:.0f} s)")
    tables = _tables(plan, records)
    (out / "tables.md").write_text(tables)
    return tables


def _tables(plan: Plan, records: list[dict[str, Any]]) -> str:
    parts = []
    for ratio in plan.ratios:
        rows = [_int_keys(r) for r in records if r["kind"] == "recall" and r["ratio"] == ratio and r["steps"] == plan.steps]
        if rows:
            parts.append(f"### Recall, ratio {ratio}\n\n" + recall_table(rows, plan.task.distances, plan.task.chance))
            knocked = [dict(r, loss_by_distance=r["knockout_by_distance"]) for r in rows]
            parts.append(f"### Recall with the compressed slots zeroed at the query, ratio {ratio}\n\n"
                         + recall_table(knocked, plan.task.distances, plan.task.chance))
    texts = [r for r in records if r["kind"] == "text" and r["steps"] == plan.text_steps]
    if texts:
        parts.append("### Natural text (streamed validation)\n\n" + text_table(texts, plan.text_variants()[1].name))
    return "\n\n".join(parts) + "\n"


def _int_keys(record: dict[str, Any]) -> dict[str, Any]:
    """JSON turns the distance keys into strings; back to ints."""
    fix = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    return dict(record, loss_by_distance=fix(record["loss_by_distance"]),
                knockout_by_distance=fix(record["knockout_by_distance"]),
                span_by_distance=fix(record["span_by_distance"]))
