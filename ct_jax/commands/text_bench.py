"""Text benchmark: does the compressed memory pay off on text? The Compressive Transformer against
Transformer-XL with the same attended slots and with the same span, at several sizes, in bytes and
in subword tokens, several seeds, trained the paper's way (streams, memory carried).

Trains the runs (ct_jax.text_bench.plan), measures each trained model on the whole validation split
(bits per byte, loss by distance from the document start, compressed memory emptied, attention
masses, a 4x longer compressed memory at evaluation) and writes results.jsonl, measures.jsonl and
tables.md to --out. docs/text-benchmark.md holds the measured results.

    python scripts/text_bench.py --sizes XS S --seeds 0 1 2 --steps 1000 --jobs 2
    python scripts/text_bench.py --tokenizers spm-train:1024 --sizes S --seeds 0 1 2
    python scripts/text_bench.py --sizes M --variants "CT mem 64 + cmem 64 x4" "TXL mem 128 (same slots)"
    python scripts/text_bench.py --quick          # a smoke run: one tiny run of each variant

Rerunning with the same --out skips the runs already recorded there.
"""

from __future__ import annotations

import argparse

from ct_jax import cli
from ct_jax.text_bench.plan import SIZES, runs, variants


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--out", default="runs/text_bench", help="records, run folders and tables.md go here")
    parser.add_argument("--sizes", nargs="+", default=["S"], choices=sorted(SIZES), help="model sizes (plan.SIZES)")
    parser.add_argument("--tokenizers", nargs="+", default=["bytes"], help="--tokenizer values (ct_jax.tokenizers)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=None, choices=[v.name for v in variants()], metavar="NAME",
                        help="compared models to train (default: all)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--data", default=None, help="corpus as scripts/train.py --data (default: stdlib sources)")
    parser.add_argument("--max-bytes", type=int, default=None, help="corpus bytes read (default: the main job's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process and cores")
    parser.add_argument("--quick", action="store_true", help="smoke mode: size XS, one seed, 20 steps, 1 MB")
    return parser.parse_args(argv)


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-text-bench` / scripts/text_bench.py: trains and measures what the flags name, prints the tables."""
    from ct_jax.presets import MAIN_JOB_CORPUS_BYTES
    from ct_jax.text_bench.report import write_tables
    from ct_jax.text_bench.run import measure_all, run_benchmark

    args = parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.steps, args.max_bytes = ["XS"], [0], 20, args.max_bytes or 1 << 20
    max_bytes = args.max_bytes or MAIN_JOB_CORPUS_BYTES
    planned = runs(args.sizes, args.tokenizers, args.seeds, args.steps, args.variants)
    run_benchmark(planned, args.out, data=args.data, max_bytes=max_bytes, jobs=args.jobs)
    measure_all(planned, args.out, data=args.data, max_bytes=max_bytes, jobs=args.jobs)
    print(write_tables(args.out))
    return 0
