"""Runs a `Plan`: the main recall runs, the text runs, then the ablations, `jobs` at a time in
worker processes; each result is appended to a JSON-lines file as it comes (a run already
there is skipped, so an interrupted benchmark resumes), then the tables are written."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ct_jax.data import read_corpus
from ct_jax.long_range.harness import train_recall
from ct_jax.long_range.plot import plot_recall
from ct_jax.long_range.pool import run_all
from ct_jax.long_range.report import recall_table, reconstruction_table, spread_table, text_table
from ct_jax.long_range.suite import Plan, ablations, main_variants
from ct_jax.long_range.text import train_text
from ct_jax.long_range.variants import Variant
from ct_jax.training import FAST_CPU_COMPILE


def _done(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _setting(plan: Plan, kind: str) -> dict[str, Any] | None:
    """What a record must share with `plan` to count as one of its runs, besides variant, seed
    and steps: the recall task and which layers have memory (text runs: nothing more)."""
    if kind != "recall":
        return None
    layers = None if plan.memory_layers is None else list(plan.memory_layers)
    return dict(task=dataclasses.asdict(plan.task) | {"distances": list(plan.task.distances)}, memory_layers=layers)


def _key(kind: str, ratio: int | None, name: str, seed: int, steps: int, setting: dict[str, Any] | None) -> tuple:
    return kind, ratio, name, seed, steps, json.dumps(setting, sort_keys=True)


def _record_key(record: dict[str, Any]) -> tuple:
    setting = None if record["kind"] != "recall" else dict(task=record.get("task"),
                                                           memory_layers=record.get("memory_layers"))
    return _key(record["kind"], record["ratio"], record["variant"], record["seed"], record["steps"], setting)


def _ours(plan: Plan, record: dict[str, Any]) -> bool:
    """Whether a recall record ran on `plan`'s task and memory layers."""
    return _setting(plan, "recall") == dict(task=record.get("task"), memory_layers=record.get("memory_layers"))


def run_job(plan: Plan, kind: str, ratio: int | None, variant: Variant, seed: int,
            corpus: str | None) -> dict[str, Any]:
    """One run of the plan, as the JSON record stored in results.jsonl."""
    options = FAST_CPU_COMPILE if plan.fast_compile else None
    if kind == "recall":
        result = train_recall(plan.task, variant, seed, plan.steps, memory_layers=plan.memory_layers,
                              compiler_options=options)
    else:
        splits, documents = read_corpus(corpus, max_bytes=plan.text_max_bytes)
        result = train_text(splits, documents, variant, seed, plan.text_steps, eval_streams=plan.text_eval_streams,
                            eval_max_segments=plan.text_eval_segments, compiler_options=options)
    return {"kind": kind, "ratio": ratio, **dataclasses.asdict(result), **(_setting(plan, kind) or {})}


def _jobs(plan: Plan, recall: bool, text: bool) -> list[tuple[str, int | None, Variant, int]]:
    jobs = [("recall", r, v, s) for r, v, s in plan.recall_runs()] if recall else []
    if text:
        jobs += [("text", None, v, s) for s in plan.text_seeds for v in plan.text_variants()]
    if recall:
        jobs += [("recall", r, v, s) for r, v, s in plan.recall_runs(ablation=True)]
    return jobs


def run_plan(plan: Plan, out_dir: str | Path, *, recall: bool = True, text: bool = True, corpus: str | None = None,
             jobs: int = 1, log: Callable[[str], Any] = print) -> str:
    """Trains what `plan` lists (skipping runs already recorded in `out_dir/results.jsonl`), `jobs`
    runs at a time, and returns the Markdown tables (also written to `out_dir/tables.md`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    records = _done(results_path)
    done = {_record_key(r) for r in records}
    todo = [job for job in _jobs(plan, recall, text)
            if _key(job[0], job[1], job[2].name, job[3], plan.steps if job[0] == "recall" else plan.text_steps,
                    _setting(plan, job[0]))
            not in done]

    def record(result: dict[str, Any]) -> None:
        with results_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        records.append(result)
        score = result["loss_by_distance"] if result["kind"] == "recall" else f"{result['bpb']:.3f} bpb"
        log(f"{result['kind']} ratio {result['ratio']} | {result['variant']} | seed {result['seed']}: {score} "
            f"({result['seconds']:.0f} s)")

    for result in run_all(run_job, [(plan, *job, corpus) for job in todo], jobs):
        record(result)
    tables = _tables(plan, records)
    (out / "tables.md").write_text(tables)
    panels = {ratio: _recall_rows(plan, records, ratio) for ratio in plan.ratios}
    if any(panels.values()):
        plot_recall({r: rows for r, rows in panels.items() if rows}, plan.task.distances, plan.task.chance,
                    out / "recall.png")
    return tables


def _tables(plan: Plan, records: list[dict[str, Any]]) -> str:
    parts = []
    for ratio in plan.ratios:
        rows = _recall_rows(plan, records, ratio)
        if rows:
            parts.append(f"### Recall, ratio {ratio}\n\n" + recall_table(rows, plan.task.distances, plan.task.chance))
            knocked = [dict(r, loss_by_distance=r["knockout_by_distance"]) for r in rows if r["slot_spread"]]
            parts.append(f"### Recall with another row's compressed slots at the query, ratio {ratio}\n\n"
                         + recall_table(knocked, plan.task.distances, plan.task.chance))
            spread = spread_table(rows)
            if spread:
                parts.append(f"### Compressed-slot spread, ratio {ratio}\n\n" + spread)
            kept = reconstruction_table(rows)
            if kept:
                parts.append(f"### What the compressed slots keep, ratio {ratio}\n\n" + kept)
    ratio = plan.ratios[-1]
    names = {v.name for v in ablations(ratio)}
    ablated = [_int_keys(r) for r in records if r["kind"] == "recall" and r["steps"] == plan.steps and _ours(plan, r)
               and r["ratio"] == ratio and r["variant"] in names]
    if ablated:
        parts.append(f"### Ablations, ratio {ratio}\n\n" + recall_table(ablated, plan.task.distances, plan.task.chance))
        knocked = [dict(r, loss_by_distance=r["knockout_by_distance"]) for r in ablated]
        parts.append(f"### Ablations with another row's compressed slots at the query, ratio {ratio}\n\n"
                     + recall_table(knocked, plan.task.distances, plan.task.chance))
        kept = reconstruction_table(ablated)
        if kept:
            parts.append(f"### What the compressed slots keep, ablations, ratio {ratio}\n\n" + kept)
    texts = [r for r in records if r["kind"] == "text" and r["steps"] == plan.text_steps]
    if texts:
        parts.append("### Natural text (streamed validation)\n\n" + text_table(texts, plan.text_variants()[1].name))
    return "\n\n".join(parts) + "\n"


def _recall_rows(plan: Plan, records: list[dict[str, Any]], ratio: int) -> list[dict[str, Any]]:
    """The main comparison's recall records at `ratio` (a Transformer-XL shared by two ratios ran
    once, under the first: it is shown under both)."""
    main = main_variants(ratio)
    names, shared = {v.name for v in main}, {v.name for v in main if v.cmem_len == 0}
    return [_int_keys(r) for r in records if r["kind"] == "recall" and r["steps"] == plan.steps and _ours(plan, r)
            and r["variant"] in names and (r["ratio"] == ratio or r["variant"] in shared)]


def _int_keys(record: dict[str, Any]) -> dict[str, Any]:
    """JSON turns the distance keys into strings; back to ints."""
    fix = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    return dict(record, loss_by_distance=fix(record["loss_by_distance"]),
                knockout_by_distance=fix(record["knockout_by_distance"]),
                span_by_distance=fix(record["span_by_distance"]))
