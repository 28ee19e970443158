"""Bits per byte (and per token, perplexity) of a checkpoint over whole splits, as the paper reports them:
the memory carried.

    python scripts/evaluate.py --checkpoint runs/train/model
    python scripts/evaluate.py --checkpoint runs/train --data enwik8.gz --split test --batch-size 16

Each split is cut into --batch-size contiguous streams run segment by segment from their
first byte, the memory carried and reset at document boundaries (the files of a folder
corpus), so every byte is predicted once (`ct_jax.evaluation.evaluate_stream`). --checkpoint
is a folder with model.safetensors + config.json (written by ct_jax or ct_torch_ref), or a
training run's --out folder: its model/, or while it has none (interrupted, still running)
its newest verified checkpoint, the step named on stderr. The text is tokenized with the
tokenizer stored with the model (scripts/train.py --tokenizer; none stored: bytes); bits per
byte spread the split's NLL over its UTF-8 bytes, so models with different tokenizers compare
(`ct_jax.tokenized.split_measures`; word perplexity for a word-level model).

Also printed: the bits per token by a token's distance from its document's start (in the
window, in plain-memory reach, in compressed reach, beyond: the paper's per-position view)
and each layer's mean attention mass on compressed memory, memory and the segment.
--mem-len / --cmem-len evaluate with other memory lengths than training (models whose
parameters allow it: sinusoidal relative positions); --knockout compressed|memory empties
that memory before every segment (what the model loses without it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from ct_jax import cli, data, evaluation, tokenized
from ct_jax._checks import check_int
from ct_jax.loading import load_model, load_run_tokenizer, with_memory_lengths
from ct_jax.memory import KNOCKOUTS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="folder with model.safetensors + config.json, or a training run's --out folder "
                        "(its model/, else its newest verified checkpoint)")
    parser.add_argument("--data", default=None, help="corpus as for scripts/train.py (default: this Python's "
                        "standard-library sources)")
    parser.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes of a text corpus")
    parser.add_argument("--split", action="append", default=None,
                        help="split to evaluate (repeatable; default: every split but train)")
    parser.add_argument("--batch-size", type=int, default=16, help="parallel streams (default 16)")
    parser.add_argument("--segments-per-call", type=int, default=32, help="segments per compiled call (default 32)")
    parser.add_argument("--max-segments", type=int, default=None,
                        help="evaluate only the first N segments of every stream (default: the whole split)")
    parser.add_argument("--mem-len", type=int, default=None, help="memory slots at evaluation (default: as trained)")
    parser.add_argument("--cmem-len", type=int, default=None,
                        help="compressed memory slots at evaluation (default: as trained)")
    parser.add_argument("--knockout", choices=KNOCKOUTS, default=None,
                        help="empty the compressed memory (or all memory) before every segment")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Checks the numbers before anything is read."""
    check_int("--batch-size", args.batch_size)
    check_int("--segments-per-call", args.segments_per_call)
    for name in ("max_segments", "max_bytes"):
        if getattr(args, name) is not None:
            check_int(cli.flag(name), getattr(args, name))
    for name in ("mem_len", "cmem_len"):
        if getattr(args, name) is not None:
            check_int(cli.flag(name), getattr(args, name), 0)


def check_splits(splits: dict[str, np.ndarray], names: list[str], batch_size: int) -> None:
    """Refuses, before any evaluation, a split too short for `batch_size` streams of 2 bytes (an input and its
    target) or more."""
    unknown = sorted(set(names) - set(splits))
    if unknown:
        raise ValueError(f"--split {unknown} not in the corpus; it has {sorted(splits)}")
    for name in names:
        if len(splits[name]) // batch_size < 2:
            raise ValueError(f"the {name} split ({len(splits[name])} bytes) is too short for --batch-size "
                             f"{batch_size} streams of 2 bytes or more; give a smaller --batch-size or more data")


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-evaluate` / scripts/evaluate.py: every check (arguments, checkpoint, data) before the first segment."""
    args = parse_args(argv)
    check_args(args)
    model, source, step = load_model(args.checkpoint)
    if step is not None:
        print(f"loaded {source}", file=sys.stderr)
    model = with_memory_lengths(model, mem_len=args.mem_len, cmem_len=args.cmem_len)
    tokenizer = load_run_tokenizer(args.checkpoint, model)
    splits, documents, counts = tokenized.tokenize_corpus(data.read_corpus(args.data, max_bytes=args.max_bytes),
                                                          tokenizer)
    names = args.split or [name for name in splits if name != "train"]
    check_splits(splits, names, args.batch_size)
    for name in names:
        started = time.perf_counter()
        result = evaluation.stream_eval(model, splits[name], args.batch_size, document_starts=documents.get(name),
                                        segments_per_call=args.segments_per_call, max_segments=args.max_segments,
                                        progress=args.progress, name=name, knockout=args.knockout,
                                        attention_mass=True)
        scope = "whole split" if args.max_segments is None else f"first {args.max_segments} segments per stream"
        tokens = "" if tokenizer.kind == "bytes" else f"{counts[name].n_tokens:,} {tokenizer.spec} tokens, "
        memory = "memory carried" if args.knockout is None else f"{args.knockout} emptied before every segment"
        print(f"{name}: {tokenized.describe(tokenized.split_measures(result.bits_per_token, counts[name]))} "
              f"({tokens}{counts[name].n_bytes:,} bytes, {args.batch_size} streams, {scope}, {memory}; "
              f"{time.perf_counter() - started:.0f}s)")
        print("  " + describe_buckets(result))
        print("  " + describe_mass(result))
    return 0


def describe_buckets(result: evaluation.StreamEval) -> str:
    """The bits per token by distance from the document's start, one bucket after another."""
    edges = result.bucket_edges
    names = evaluation.BUCKET_NAMES if len(edges) + 1 == len(evaluation.BUCKET_NAMES) else [""] * (len(edges) + 1)
    spans = [f"< {edges[0]}", *(f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])), f">= {edges[-1]}"]
    parts = [f"{label} [{span}] " + (f"{bits:.4f} ({n:,})" if n else "-")
             for label, span, bits, n in zip(names, spans, result.bucket_bits, result.bucket_count)]
    return "bits/token by distance from the document start (tokens): " + ", ".join(parts)


def describe_mass(result: evaluation.StreamEval) -> str:
    """Each layer's mean attention mass on compressed memory / memory / segment."""
    layers = ", ".join(f"layer {layer} {cmem:.3f}/{mem:.3f}/{segment:.3f}"
                       for layer, (cmem, mem, segment) in enumerate(result.attention_mass, start=1))
    return f"attention mass compressed memory/memory/segment: {layers}"
