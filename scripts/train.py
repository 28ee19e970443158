"""Train a Compressive Transformer on bytes, then print a sample.

With no arguments: a small model on the default corpus (this Python's standard-library
sources), on every device JAX sees, for a few minutes on a CPU. Rerunning the same command
continues from the newest checkpoint in --out. Every model and training setting has a flag.

    python scripts/train.py
    python scripts/train.py --data enwik8.gz --dim 512 --depth 8 --seq-len 512 --steps 100000
    python scripts/train.py --parallel jit --cpu-devices 8     # data parallel on fake CPU devices
    python scripts/train.py --preset enwik8 --data enwik8.gz --batch-size 8   # the paper's settings, flags override
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import types
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled

from ct_jax import presets  # noqa: E402
from ct_jax.config import ModelConfig  # noqa: E402  (no JAX import yet: flags come first)
from ct_jax.options import OPTIONS  # noqa: E402

# The main job: a small model (0.28M parameters; segments of 64 bytes, memory 64 + 16
# compressed) streamed through the documents, memory carried across steps, 2000 steps of
# 16 x 2 segments (4.1M bytes) with a small model's learning rate (not upstream's 1e-4).
# Sized for under 4 minutes on 2 idle CPU cores, whole-split validation included: measured
# 2.44 bits/byte after 1600 steps (265 s of CPU time, ~170 s on an idle 2-core machine).
MODEL_DEFAULTS = dict(num_tokens=256, dim=64, depth=2, seq_len=64, mem_len=64, cmem_len=16, cmem_ratio=4, heads=4)
TRAIN_DEFAULTS = dict(batch_size=16, n_segments=2, steps=2000, learning_rate=3e-3, schedule="cosine", warmup_steps=50,
                      data_order="streams", eval_every=250, eval_segments=16, eval_batches=4, checkpoint_every=250)
# The default corpus is cut to its first 6 MB of files (whole files: 5.5 MB train, 0.5 MB
# validation): the main job sees 4 MB, and its final validation runs over the whole split.
DEFAULT_CORPUS_BYTES = 6_000_000
DEFAULT_OUT = "runs/train"
HELP = dict(
    memory_layers="layers (1-based) that keep memory; default: all",
    batch_size="global rows per step (split over devices and processes)",
    n_segments="segments of seq_len bytes per row, scanned with the memory as carry",
    micro_batches="gradient accumulation: each step runs the batch in this many chunks",
    optimizer="update rule after clipping (sgd: linear in the gradient)",
    warmup_steps="linear warmup from 0 (both schedules)",
    final_lr_ratio="cosine schedule: the final learning rate as a fraction of --learning-rate",
    grad_clip_norm="global-norm gradient clipping (0: off)",
    dtype="compute dtype; parameters, optimizer state and losses stay float32",
    memory_gradients="backpropagate through the memory carried between a row's segments (the paper's BPTT; "
                     "memory grows with --n-segments, --remat helps)",
    remat="keep only weight-matmul outputs, recompute attention scores and elementwise ops in the backward "
          "(less memory, more compute)",
    parallel="auto: jit over a device mesh when JAX sees several devices, else none",
    eval_every="validate every N steps (and at the start and end)",
    eval_batches="validation batches per evaluation (data order windows)",
    data_order="streams: batch_size streams through the documents, memory carried across steps, validation over "
               "the whole split with memory carried; windows: random windows from empty memory (upstream's example)",
    eval_segments="data order streams: periodic validation over this many segments per stream (0: the whole "
                  "split); the last validation always covers the whole split",
    checkpoint_every="checkpoint every N steps (and at the end)",
    divergence_factor="stop when a train loss exceeds this multiple of its running median (0: only NaN/Inf stop "
    "the run); a checkpoint is written once a loss at its parameters passed this check",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_dataclass_flags(group, cls, defaults: dict, choices: dict) -> None:
    """One flag per field of `cls`; bools get --x / --no-x, tuples a comma-separated list."""
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name, field in fields.items():
        default = defaults.get(name, None if field.default is dataclasses.MISSING else field.default)
        default = getattr(default, "value", default)  # enums by value
        kind = hints[name]
        args = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) else ()
        base = next((arg for arg in args if arg is not type(None)), kind)
        help_text = f"{HELP[name]}; default: {default}" if name in HELP else f"default: {default}"
        if base is bool:
            group.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(base) is tuple or base is tuple:
            group.add_argument(_flag(name), type=lambda text: [int(v) for v in text.split(",") if v], default=default,
                               metavar="I,J,...", help=help_text)
        elif name in choices:
            group.add_argument(_flag(name), choices=choices[name], default=default, help=help_text)
        else:
            convert = base if base in (int, float, str) else str
            group.add_argument(_flag(name), type=convert, default=default, help=help_text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ct_jax.training import DTYPES, DataOrder, Optimizer, Parallel, Schedule, TrainConfig  # imports JAX only

    preset_flag = dict(choices=sorted([*presets.PRESETS, "long_range"]), default=None,
                       help="start from the paper's settings for this data set, or from long_range's options on "
                       "the default sizes (ct_jax.presets, docs/long-range.md); any other flag overrides them")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", **preset_flag)
    preset = pre.parse_known_args(argv)[0].preset
    model_defaults, train_defaults = MODEL_DEFAULTS, dict(TRAIN_DEFAULTS, parallel="auto")
    if preset == "long_range":  # options only: the default sizes stay
        model_defaults = dict(model_defaults, **presets.LONG_RANGE["model"])
        train_defaults = dict(train_defaults, **presets.LONG_RANGE["train"])
    elif preset is not None:
        chosen = presets.get(preset)
        model_defaults, train_defaults = chosen["model"], dict(train_defaults, **chosen["train"])

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", **preset_flag)
    _add_dataclass_flags(parser.add_argument_group("model"), ModelConfig, model_defaults, OPTIONS)
    choices = dict(optimizer=[o.value for o in Optimizer], schedule=[s.value for s in Schedule], dtype=sorted(DTYPES),
                   parallel=["auto"] + [p.value for p in Parallel], data_order=[d.value for d in DataOrder])
    _add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, train_defaults, choices)
    run = parser.add_argument_group("run")
    run.add_argument("--data", default=None, help="corpus: a text file or folder, enwik8[.gz|.zip], 'enwik8:PATH' or "
                     "'text:PATH'; default: this Python's standard-library sources")
    run.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes of a text corpus "
                     f"(default: all, or {DEFAULT_CORPUS_BYTES:,} of the default corpus)")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue from the newest checkpoint in --out (default); --no-resume refuses an --out "
                     "that already holds checkpoints")
    run.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                     help="resume from this checkpoint step instead of the newest (newer ones are moved aside)")
    run.add_argument("--sample-length", type=int, default=300, help="bytes to generate after training (0: none)")
    run.add_argument("--prompt", default=None, help="sample prompt (default: the start of the validation split)")
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    system = parser.add_argument_group("system")
    system.add_argument("--cpu-devices", type=int, default=None, help="split the CPU into this many JAX devices")
    system.add_argument("--compile-cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or
                        os.path.expanduser("~/.cache"), "ct_jax", "xla"),
                        help="persistent compilation cache folder ('' disables); reruns and resumes skip compiling")
    system.add_argument("--fast-compile", action="store_true",
                        help="XLA:CPU flags that compile 2-3x faster but step ~3x slower (smoke tests)")
    system.add_argument("--coordinator-address", default=None, help="multi-host: host:port of process 0 "
                        "(or CT_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS)")
    system.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    system.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    system.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    return parser.parse_args(argv)


def sample_text(model, prompt: str, length: int, *, seed: int, temperature: float) -> str:
    """`length` bytes sampled after `prompt` (upstream's top-k filter), as text."""
    import jax

    from ct_jax import data
    from ct_jax.autoregressive import generate

    model.eval()
    tokens = generate(model, data.encode_text(prompt or "\n"), length, jax.random.PRNGKey(seed),
                      temperature=temperature)
    return data.decode_bytes(tokens)


def check_args(args: argparse.Namespace) -> tuple[ModelConfig, dict]:
    """(model config, TrainConfig kwargs) after checking every argument; nothing is read, written or started."""
    from ct_jax import data, training
    from ct_jax._checks import check_float, check_int

    model_config = ModelConfig.from_kwargs({f.name: getattr(args, f.name) for f in dataclasses.fields(ModelConfig)})
    train_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(training.TrainConfig)}
    parallel = train_kwargs["parallel"]
    training.TrainConfig(**dict(train_kwargs, parallel="none" if parallel == "auto" else parallel))
    check_float("--temperature", args.temperature, 0.0)
    check_int("--sample-length", args.sample_length, 0)
    for name in ("max_bytes", "cpu_devices", "resume_from"):
        if getattr(args, name) is not None:
            check_int(_flag(name), getattr(args, name))
    if args.resume_from is not None and not args.resume:
        raise ValueError("--resume-from needs --resume (it picks the checkpoint to resume from)")
    if not args.out.strip() or Path(args.out).is_file():
        raise ValueError(f"--out must name a folder, got {args.out!r}")
    data.check_spec(args.data)
    return model_config, train_kwargs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ValueError, TypeError, OSError, RuntimeError, FloatingPointError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ValueError, TypeError, FileNotFoundError)) else 1


def run(args: argparse.Namespace) -> int:
    """The whole run: checks, JAX set-up, data, training, export and the sample."""
    model_config, train_kwargs = check_args(args)
    if args.fast_compile:  # as XLA_FLAGS, read when JAX starts its backend: every compile of the run gets them
        from ct_jax.training import xla_flags

        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags()]).strip()
    import jax

    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    from ct_jax import data, parallel, streams, train_loop, training

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    if train_kwargs["parallel"] == "auto":
        train_kwargs["parallel"] = "jit" if jax.device_count() > 1 else "none"
    config = training.TrainConfig(**train_kwargs)
    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)

    out = Path(args.out)
    window = config.n_segments * model_config.seq_len + 1
    max_bytes = DEFAULT_CORPUS_BYTES if args.data is None and args.max_bytes is None else args.max_bytes
    splits = data.load_corpus(args.data, window=window, max_bytes=max_bytes)
    say(f"data: {args.data if args.data is not None else 'Python standard library sources'}: "
        + ", ".join(f"{name} {len(split):,} bytes" for name, split in splits.items()))
    say(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es), "
        f"parallel={config.parallel.value}; out: {out}")
    started = time.perf_counter()
    documents = streams.document_starts(args.data, max_bytes=max_bytes)
    result = train_loop.fit(model_config, config, splits, out, resume=args.resume, resume_from=args.resume_from,
                            progress=args.progress and lead, log=say, documents=documents)
    steps, val = result.history.column("val_bpb")
    how = ("whole split, memory streamed" if config.data_order is training.DataOrder.STREAMS
           else f"{config.eval_batches} batches of windows from empty memory")
    if val:
        say(f"validation bits/byte: {val[0]:.3f} (step {steps[0]}) -> {val[-1]:.3f} (step {steps[-1]}, {how}); "
            f"{time.perf_counter() - started:.0f}s")
    _, test = result.history.column("test_bpb")
    if test:
        say(f"test bits/byte: {test[-1]:.3f} ({how})")
    say(f"wrote {out / 'metrics.csv'}, {out / 'loss.png'}, {out / 'model'} (model.safetensors + config.json)")
    if lead and args.sample_length > 0:
        prompt = args.prompt if args.prompt is not None else data.decode_bytes(splits["validation"][:64])
        text = sample_text(result.model, prompt, args.sample_length, seed=config.seed, temperature=args.temperature)
        say(f"sample ({args.sample_length} bytes after the prompt):\n{prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
