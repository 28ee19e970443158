"""Long-range benchmark: does the compressed memory carry information past the plain memory?

Trains small models (2 layers, dim 64) on synthetic recall rows (a fact at a chosen distance
before its query) and on natural text, and writes results.jsonl and tables.md to --out.
docs/long-range.md explains the task, the variants and the measured results.

    python scripts/long_range.py --quick            # < 1 minute: one CT and its baselines, few steps
    python scripts/long_range.py --jobs 2           # full mode (51 min on one core; --jobs 2: one run per core)
    python scripts/long_range.py --only recall --seeds 0 1 2 --steps 800
    python scripts/long_range.py --corpus enwik8:/data/enwik8.gz --only text
    python scripts/long_range.py --all-layers --only recall --out runs/long_range_all_layers

Rerunning with the same --out skips the runs already recorded there.
"""

from __future__ import annotations

import argparse
import dataclasses

from ct_jax import cli
from ct_jax.long_range.run import run_plan
from ct_jax.long_range.suite import FULL, QUICK


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="the CI smoke mode: tiny budgets, one seed")
    parser.add_argument("--out", default="runs/long_range", help="results.jsonl and tables.md go here")
    parser.add_argument("--only", choices=("recall", "text"), help="run one part only")
    parser.add_argument("--ratios", type=int, nargs="+", help="compression ratios (default: the mode's)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the main comparison and the text runs")
    parser.add_argument("--ablation-seeds", type=int, nargs="*", help="seeds of the ablations (none: skip them)")
    parser.add_argument("--variants", nargs="+",
                        help="only the variants (main and ablations) of these names (default: all)")
    parser.add_argument("--steps", type=int, help="training steps per recall run")
    parser.add_argument("--distances", type=int, nargs="+",
                        help="fact-to-query distances of the recall task, tokens (default: the mode's)")
    parser.add_argument("--segments", type=int, help="segments per recall row (the query sits in the last)")
    parser.add_argument("--keys", type=int, help="key symbols of the recall vocabulary (default 16)")
    parser.add_argument("--filler", type=int, help="filler symbols of the recall vocabulary (default 16)")
    parser.add_argument("--fact-len", type=int, help="keys per fact (default 8)")
    parser.add_argument("--text-steps", type=int, help="training steps per text run")
    parser.add_argument("--all-layers", action="store_true",
                        help="recall models with memory in every layer (default: the top layer only, so that no "
                             "lower layer relays older context and each model reaches exactly what its memories cover)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--corpus", help="text corpus spec as scripts/train.py --data (default: stdlib sources)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Runs the plan the flags describe, prints the tables and returns them."""
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    changes = dict(ratios=args.ratios, seeds=args.seeds, ablation_seeds=args.ablation_seeds, steps=args.steps,
                   text_steps=args.text_steps, names=args.variants)
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in changes.items() if v is not None}
    task = dict(distances=args.distances, n_segments=args.segments, n_keys=args.keys, n_filler=args.filler,
                fact_len=args.fact_len)
    task = {k: tuple(v) if isinstance(v, list) else v for k, v in task.items() if v is not None}
    if task:
        try:
            changes["task"] = dataclasses.replace(plan.task, **task)
        except ValueError as error:
            raise SystemExit(f"long_range.py: error: {error}") from None
    if args.all_layers:
        changes["memory_layers"] = None
    if args.seeds is not None:
        changes["text_seeds"] = tuple(args.seeds)
    plan = dataclasses.replace(plan, **changes)
    tables = run_plan(plan, args.out, recall=args.only != "text", text=args.only != "recall", corpus=args.corpus,
                      jobs=args.jobs)
    print(tables)
    return tables


@cli.command
def console_main(argv: list[str] | None = None) -> int:
    """`ct-long-range` and scripts/long_range.py: `main` with exit status 0, or an error as one line (`cli.command`)."""
    main(argv)
    return 0
