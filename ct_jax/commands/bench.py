"""Benchmark ct_jax against the PyTorch reference (and upstream 0.4.0 if installed), side by side.

    python scripts/bench.py                       # CPU: S (every row) and M (train, eval, memory, FLOP/s)
    python scripts/bench.py --config M --all      # every row on M
    python scripts/bench.py --device gpu --config L   # both frameworks, bf16, both attention paths
    python scripts/bench.py --config '{"name": "tiny", "model": {...}, "batch": 2, "segments": 2}'

Prints a Markdown table; writes bench.json and bench.png (JAX/reference ratios) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ct_jax import cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--config", action="append", help="S, M, L, a JSON object or a JSON file; repeatable "
                        "(default: S and M on CPU, L on GPU)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="directory for bench.json and bench.png")
    parser.add_argument("--threads", type=int, default=None, help="cores for both frameworks (default: all available)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--all", action="store_true", help="generation and compile-time rows on every config "
                        "(default: on the first config only, to stay within 10 minutes on 2 cores)")
    parser.add_argument("--compile-segments", default="2,8,32", help="segment counts of the compile-time row")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-upstream", action="store_true", help="skip the upstream package even if installed")
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                        help="also time ct_jax with attention_impl='fused' (default: on GPU only)")
    parser.add_argument("--generation-seq-lens", default="512",
                        help="generation rows at these seq_len too, memory scaled alike (default 512; '' for none)")
    parser.add_argument("--generation-batches", default="8,32",
                        help="generation rows at these batch sizes too, against the reference and the floor of one "
                        "decoding step (default 8,32; '' for none)")
    parser.add_argument("--no-bf16-generation", action="store_true", help="skip the bfloat16 decoding row")
    parser.add_argument("--no-streaming", action="store_true",
                        help="skip the row of the train step with the memory carried across steps vs fixed windows")
    parser.add_argument("--no-decode-profile", action="store_true",
                        help="skip the profile of a decoded token (b=1: ms per loop part under jax.profiler)")
    parser.add_argument("--torch-profile", action="store_true",
                        help="instead of the benchmark: one train step of ct_torch_ref under torch.profiler and one "
                        "of ct_jax under jax.profiler (CPU, first config), printed as time per op category and top ops")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.reps < 1 or args.warmup < 0:
        parser.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    for flag in ("compile_segments", "generation_seq_lens", "generation_batches"):
        setattr(args, flag, _positive_ints(parser, "--" + flag.replace("_", "-"), getattr(args, flag)))
    if args.fused is None:
        args.fused = args.device == "gpu"
    return args


def _positive_ints(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[int, ...]:
    """A comma-separated list of positive ints ('' for none), or a parser error naming `flag`."""
    try:
        values = tuple(int(n) for n in text.split(",") if n)
    except ValueError:
        parser.error(f"{flag} must be comma-separated ints, got {text!r}")
    if any(n < 1 for n in values):
        parser.error(f"{flag} must be positive, got {values}")
    return values


@cli.command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The leaf module first: configure_host must run before JAX and torch are imported.
    from ct_jax.bench import common

    threads = common.configure_host(args.device, args.threads)
    specs = args.config or (["L"] if args.device == "gpu" else ["S", "M"])
    configs = [common.parse_config(spec) for spec in specs]
    if args.torch_profile:
        from ct_jax.bench import profiles

        bench = configs[0]
        found = dict(ct_torch_ref=profiles.torch_train_profile(bench, threads),
                     ct_jax=profiles.jax_train_profile(bench, args.device))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(found, indent=1))
        print(f"{bench.name} train step, {threads} thread(s)\n\n{profiles.markdown(found)}")
        return 0
    from ct_jax.bench import harness
    from ct_jax.bench import report as bench_report

    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f}s] {message}", file=sys.stderr, flush=True)

    options = harness.RunOptions(device=args.device, threads=threads, reps=args.reps, warmup=args.warmup,
                                 compile_segments=args.compile_segments, peak_memory=not args.no_memory,
                                 upstream=not args.no_upstream, fused=args.fused,
                                 generation_seq_lens=args.generation_seq_lens,
                                 generation_batches=args.generation_batches,
                                 bf16_generation=not args.no_bf16_generation, streaming=not args.no_streaming,
                                 decode_profile=not args.no_decode_profile, log=log)
    first_only = [args.all or index == 0 for index in range(len(configs))]
    per_config = [dict(generation=on, compile=on) for on in first_only]
    record = harness.run(configs, options, args.out, per_config=per_config)
    args.out.mkdir(parents=True, exist_ok=True)
    bench_report.write_json(record, args.out / "bench.json")
    bench_report.bar_chart(record, args.out / "bench.png")
    print(bench_report.markdown(record))
    log(f"wrote {args.out / 'bench.json'} and {args.out / 'bench.png'}")
    return 0
