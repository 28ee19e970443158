"""Trains the text benchmark's runs with the library's own training loop (`train_loop.fit`, streamed,
memory carried, whole-split validation at the end), then measures each trained model (`measure`).

Each run's record is appended to `results.jsonl` as it finishes; a run already recorded is skipped,
so an interrupted benchmark resumes. Run folders (weights, metrics, logs) stay under `out/runs`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ct_jax.data import Corpus, read_corpus
from ct_jax.long_range.pool import run_all
from ct_jax.presets import MAIN_JOB_CORPUS_BYTES
from ct_jax.text_bench.plan import SIZES, Run, train_fields, variant_named
from ct_jax.tokenized import tokenize_corpus
from ct_jax.tokenizers import Tokenizer, load_tokenizer, tokenizer_from_spec


def corpus_tokenizer(spec: str, corpus: Corpus, out: Path) -> Tokenizer:
    """The benchmark's tokenizer for `spec`, learnt once from the training split and kept in
    `out/tokenizers` (every run of a tokenizer reads the same ids)."""
    folder = out / "tokenizers" / spec.replace(":", "-")
    if (folder / "tokenizer.json").exists():
        return load_tokenizer(folder)
    split, starts = corpus.splits["train"], corpus.starts["train"]
    bounds = [*starts.tolist(), len(split)]
    documents = (bytes(split[a:b]).decode("utf-8", "replace") for a, b in zip(bounds[:-1], bounds[1:]))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_from_spec(spec, train_text=documents, run_dir=folder)
    tokenizer.save(folder)
    return tokenizer


def train(run: Run, data: str | None, max_bytes: int, out: Path) -> dict[str, Any]:
    """One run trained into `out/runs/FOLDER` (resumed if it was interrupted): its record."""
    from ct_jax.train_loop import fit
    from ct_jax.training import TrainConfig

    started = time.perf_counter()
    corpus = read_corpus(data, max_bytes=max_bytes)
    tokenizer = corpus_tokenizer(run.tokenizer, corpus, out)
    tokens = tokenize_corpus(corpus, tokenizer)
    variant = variant_named(run.variant)
    model = dict(num_tokens=tokenizer.vocab_size, **SIZES[run.size].model_kwargs(), **variant.model_kwargs())
    config = TrainConfig(**{**train_fields(run.steps, run.seed), **variant.train})
    result = fit(model, config, tokens.splits, out / "runs" / run.folder, progress=False, log=lambda message: None,
                 documents=tokens.starts, counts=tokens.counts, tokenizer=tokenizer)
    final = result.history.rows[max(result.history.rows)]
    return {**dataclasses.asdict(run), "tokens": run.steps * config.batch_size * config.n_segments * model["seq_len"],
            "bpb": final["val_bpb"], "bits_per_token": final.get("val_bits_per_token", final["val_bpb"]),
            "seconds": time.perf_counter() - started}


def measure_run(run: Run, data: str | None, max_bytes: int, out: Path) -> dict[str, Any]:
    """The measures (`measure.measure`) of a trained run's model on the validation split: its record."""
    from ct_jax.convert import load_pretrained
    from ct_jax.text_bench.measure import measure

    folder = out / "runs" / run.folder
    corpus = read_corpus(data, max_bytes=max_bytes)
    tokens = tokenize_corpus(corpus, load_tokenizer(folder))
    model = load_pretrained(folder / "model")
    return {**dataclasses.asdict(run), **measure(model, tokens.splits["validation"], tokens.starts["validation"],
                                                  tokens.counts["validation"])}


def measure_all(runs: list[Run], out: str | Path, *, data: str | None = None, max_bytes: int = MAIN_JOB_CORPUS_BYTES,
                jobs: int = 1, log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Measures the trained `runs` not yet in `out/measures.jsonl`, `jobs` at a time; returns every record."""
    out = Path(out)
    path = out / "measures.jsonl"
    records = read_records(path)
    done = {_key(record) for record in records}
    todo = [run for run in runs if _key(dataclasses.asdict(run)) not in done
            and (out / "runs" / run.folder / "model").is_dir()]
    for record in run_all(measure_run, [(run, data, max_bytes, out) for run in todo], jobs):
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        log(f"measured {record['size']} {record['tokenizer']} | {record['variant']} | seed {record['seed']}: "
            f"{record['bpb']:.4f} bits/byte, compressed memory emptied {record.get('nocmem_bpb', float('nan')):.4f}, "
            f"all memory emptied {record['nomem_bpb']:.4f}")
    return records


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path` (none if it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _key(record: dict[str, Any]) -> tuple:
    return tuple(record[field.name] for field in dataclasses.fields(Run))


def run_benchmark(runs: list[Run], out: str | Path, *, data: str | None = None,
                  max_bytes: int = MAIN_JOB_CORPUS_BYTES, jobs: int = 1,
                  log: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Trains `runs` not yet in `out/results.jsonl`, `jobs` at a time; returns every record."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    records = read_records(results)
    done = {_key(record) for record in records}
    todo = [run for run in runs if _key(dataclasses.asdict(run)) not in done]
    for tokenizer in dict.fromkeys(run.tokenizer for run in todo):  # learnt once, before the workers start
        corpus_tokenizer(tokenizer, read_corpus(data, max_bytes=max_bytes), out)
    for record in run_all(train, [(run, data, max_bytes, out) for run in todo], jobs):
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        log(f"{record['size']} {record['tokenizer']} | {record['variant']} | seed {record['seed']}: "
            f"{record['bpb']:.4f} bits/byte ({record['seconds']:.0f} s)")
    return records
