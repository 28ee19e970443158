"""Train a Compressive Transformer on bytes (or subwords, words: --tokenizer), then print a sample.

With no arguments: a small model on the default corpus (this Python's standard-library
sources), on every device JAX sees, for a few minutes on a CPU. Rerunning the same command
continues from the newest checkpoint in --out. Every model and training setting has a flag.

    python scripts/train.py                   # or `ct-train`, once installed
    python scripts/train.py --data enwik8.gz --dim 512 --depth 8 --seq-len 512 --steps 100000
    python scripts/train.py --parallel jit --cpu-devices 8     # data parallel on fake CPU devices
    python scripts/train.py --preset enwik8 --data enwik8.gz --batch-size 8   # the paper's settings, flags override
    python scripts/train.py --tokenizer spm-train:1024        # a SentencePiece vocabulary trained on the train split
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ct_jax import cli, presets, tokenizers
from ct_jax.config import ModelConfig  # no JAX import yet: flags come first
from ct_jax.data import Corpus

if TYPE_CHECKING:
    from ct_jax.training import TrainConfig

DEFAULT_OUT = "runs/train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags: every ModelConfig and TrainConfig field (defaults: the main job or --preset), run and system."""
    # JAX is imported here, not at the top, and nothing starts its backend before `run` sets
    # XLA_FLAGS and the CPU device count.
    from ct_jax.training import DTYPES, Parallel, TrainConfig

    preset_flag = dict(choices=presets.TRAIN_PRESETS, default=None,
                       help="start from the paper's settings for this data set, or from long_range's options on "
                       "the default sizes (ct_jax.presets, docs/long-range.md); any other flag overrides them")
    pre = cli.Parser(add_help=False)
    pre.add_argument("--preset", **preset_flag)
    pre.add_argument(tokenizers.TOKENIZER_FLAG, default=None)
    pre.add_argument("--num-tokens", default=None)
    given = pre.parse_known_args(argv)[0]
    defaults = presets.train_defaults(given.preset)

    parser = cli.parser(__doc__)
    parser.add_argument("--preset", **preset_flag)
    cli.add_dataclass_flags(parser.add_argument_group("model"), ModelConfig, defaults["model"])
    choices = dict(dtype=sorted(DTYPES), parallel=["auto"] + [p.value for p in Parallel])
    cli.add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, dict(defaults["train"],
                            parallel="auto"), choices)
    _add_run_flags(parser.add_argument_group("run"), given.preset)
    _add_system_flags(parser.add_argument_group("system"))
    args = parser.parse_args(argv)
    args.tokenizer_given, args.num_tokens_given = given.tokenizer is not None, given.num_tokens is not None
    return args


def _add_run_flags(run: argparse._ArgumentGroup, preset: str | None) -> None:
    """The run's flags: data, tokenizer, output, resume, sample and logs."""
    run.add_argument("--data", default=None, help="corpus: a text file or folder, enwik8[.gz|.zip], 'enwik8:PATH', "
                     "'text:PATH', or hf:PATH_OR_NAME[:CONFIG] (a Hugging Face dataset saved with save_to_disk or "
                     "in the local cache, a document per row of its text column); default: this Python's "
                     "standard-library sources")
    run.add_argument(tokenizers.TOKENIZER_FLAG, default=presets.default_tokenizer(preset),
                     help=f"{tokenizers.TOKENIZER_FORMS}: the model's tokens (default: bytes, or the preset's; "
                     "ct_jax.tokenizers); spm-train and words learn from the training split; stored in --out for "
                     "evaluate, generate and resume; --num-tokens defaults to its vocabulary")
    run.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes of a text corpus "
                     f"(default: all, or {presets.MAIN_JOB_CORPUS_BYTES:,} of the default corpus)")
    run.add_argument("--validation-every", type=int, default=None, metavar="N",
                     help="folder corpora: every N-th file (sorted) is validation (default 10); a folder of fewer "
                     "files keeps its last file for validation, a single file gives its last 5%% of bytes")
    run.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    run.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                     help="continue from the newest checkpoint in --out (default); --no-resume refuses an --out "
                     "that already holds checkpoints")
    run.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                     help="resume from this checkpoint step instead of the newest (newer ones are moved aside)")
    run.add_argument("--sample-length", type=int, default=300, help="tokens to generate after training (0: none)")
    run.add_argument("--prompt", default=None, help="sample prompt (default: the start of the validation split)")
    run.add_argument("--temperature", type=float, default=0.8)
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    run.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                     help="write the metrics as TensorBoard events into --out too (tensorboard --logdir OUT)")
    run.add_argument("--diagnostics", action=argparse.BooleanOptionalAction, default=True,
                     help="data order streams: at each validation, measure each layer's attention mass on "
                     "compressed memory, memory and the segment, and the bits the compressed memory saves (one "
                     "more evaluation with it emptied); columns val_mass_* and val_cmem_knockout_bpb")


def _add_system_flags(system: argparse._ArgumentGroup) -> None:
    """Devices, the compilation cache and multi-host settings."""
    system.add_argument("--cpu-devices", type=int, default=None, help="split the CPU into this many JAX devices")
    system.add_argument("--compile-cache", default=os.path.join(os.environ.get("XDG_CACHE_HOME") or
                        os.path.expanduser("~/.cache"), "ct_jax", "xla"),
                        help="persistent compilation cache folder ('' disables); reruns and resumes skip compiling")
    system.add_argument("--fast-compile", action="store_true",
                        help="XLA:CPU flags that compile 2-3x faster but step ~3x slower (smoke tests)")
    system.add_argument("--coordinator-address", default=None, help="multi-host: host:port of process 0 "
                        "(or CT_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS)")
    system.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    system.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")


def sample_text(model, prompt: str, length: int, *, seed: int, temperature: float,
                tokenizer: tokenizers.Tokenizer | None = None) -> str:
    """`length` tokens sampled after `prompt` (upstream's top-k filter), decoded by `tokenizer` (default bytes)."""
    import jax

    from ct_jax.autoregressive import generate

    tokenizer = tokenizer or tokenizers.ByteTokenizer()
    model.eval()
    prime = tokenizer.encode(prompt or "\n")
    if not prime.size:  # a prompt that encodes to nothing: start from the end-of-document token (or id 0)
        prime = np.asarray([tokenizer.eos_id or 0], np.int32)
    tokens = generate(model, prime, length, jax.random.PRNGKey(seed), temperature=temperature)
    return tokenizer.decode(np.asarray(tokens))


def check_args(args: argparse.Namespace) -> tuple[ModelConfig, dict]:
    """(model config, TrainConfig kwargs) after checking every argument; nothing is read, written or started."""
    from ct_jax import data, training
    from ct_jax._checks import check_float, check_int

    model_config = ModelConfig.from_kwargs(cli.field_values(args, ModelConfig))
    train_kwargs = cli.field_values(args, training.TrainConfig)
    parallel = train_kwargs["parallel"]
    training.TrainConfig(**dict(train_kwargs, parallel="none" if parallel == "auto" else parallel))
    check_float("--temperature", args.temperature, 0.0)
    check_int("--sample-length", args.sample_length, 0)
    if args.validation_every is not None:
        check_int("--validation-every", args.validation_every, 2)
    for name in ("max_bytes", "cpu_devices", "resume_from"):
        if getattr(args, name) is not None:
            check_int(cli.flag(name), getattr(args, name))
    if args.resume_from is not None and not args.resume:
        raise ValueError("--resume-from needs --resume (it picks the checkpoint to resume from)")
    if not args.out.strip() or Path(args.out).is_file():
        raise ValueError(f"--out must name a folder, got {args.out!r}")
    data.check_spec(args.data)
    tokenizers.check_spec(args.tokenizer)
    return model_config, train_kwargs


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-train` / scripts/train.py: exit status 2 for bad input, 1 for a failed run (`cli.command`), 128 + the
    signal after an interrupt that wrote a checkpoint (SIGINT: 130, SIGTERM: 143)."""
    from ct_jax.interrupts import TrainingInterrupted

    try:
        return run(parse_args(argv))
    except TrainingInterrupted as interrupted:
        print(interrupted, flush=True)
        return interrupted.exit_status


def _silent(*args: object, **kwargs: object) -> None:
    """`print` on the processes that are not the lead: one process speaks."""


def run(args: argparse.Namespace) -> int:
    """The whole run: checks, JAX set-up, data, training, export and the sample."""
    model_config, train_kwargs = check_args(args)
    jax = _start_jax(args)
    from ct_jax import train_loop, training

    if train_kwargs["parallel"] == "auto":
        train_kwargs["parallel"] = "jit" if jax.device_count() > 1 else "none"
    config = training.TrainConfig(**train_kwargs)
    lead = jax.process_index() == 0
    say = print if lead else _silent
    out = Path(args.out)
    model_config, tokenizer, tokens = _tokens(args, model_config, config, out, say)
    say(f"devices: {jax.device_count()} x {jax.devices()[0].platform} in {jax.process_count()} process(es), "
        f"parallel={config.parallel.value}; out: {out}")
    started = time.perf_counter()
    result = train_loop.fit(model_config, config, tokens.splits, out, resume=args.resume,
                            resume_from=args.resume_from, progress=args.progress and lead, log=say,
                            documents=tokens.starts, counts=tokens.counts, tokenizer=tokenizer,
                            tensorboard=args.tensorboard, diagnostics=args.diagnostics)
    if result.start >= config.steps:  # fit said why; nothing was trained or written
        return 0
    _report(result, config, out, time.perf_counter() - started, say)
    if lead and args.sample_length > 0:
        prompt = args.prompt if args.prompt is not None else tokenizer.decode(tokens.splits["validation"][:64])
        text = sample_text(result.model, prompt, args.sample_length, seed=config.seed, temperature=args.temperature,
                           tokenizer=tokenizer)
        unit = "bytes" if tokenizer.kind == "bytes" else "tokens"
        say(f"sample ({args.sample_length} {unit} after the prompt):\n{prompt}{text}")
    return 0


def _start_jax(args: argparse.Namespace) -> Any:
    """JAX with the run's XLA flags, CPU devices, compile cache and processes (`jax.distributed`)."""
    if args.fast_compile:  # as XLA_FLAGS, read when JAX starts its backend: every compile of the run gets them
        from ct_jax.training import xla_flags

        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags()]).strip()
    import jax

    from ct_jax import parallel

    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    return jax


def _tokens(args: argparse.Namespace, model_config: ModelConfig, config: Any, out: Path,
            say: Callable[[str], Any]) -> tuple[ModelConfig, tokenizers.Tokenizer, Any]:
    """(the model config with the tokenizer's vocabulary, the tokenizer, the tokenized corpus): the corpus read,
    a misfit refused (footprint, a split shorter than a window) before and after learning the tokenizer."""
    from ct_jax import data, tokenized

    max_bytes = presets.MAIN_JOB_CORPUS_BYTES if args.data is None and args.max_bytes is None else args.max_bytes
    corpus = data.read_corpus(args.data, max_bytes=max_bytes, validation_every=args.validation_every, log=say)
    say(f"data: {args.data if args.data is not None else 'Python standard library sources'}: "
        + ", ".join(f"{name} {len(split):,} bytes" for name, split in corpus.splits.items()))
    known = tokenizers.known_vocab_size(args.tokenizer)
    if args.num_tokens_given or known is not None:  # refuse a misfit before learning a tokenizer
        check_footprint(model_config if args.num_tokens_given else with_vocabulary(model_config, known), config)
    tokenizer = run_tokenizer(args, out, corpus, say)
    model_config = with_vocabulary(model_config, None if args.num_tokens_given else tokenizer.vocab_size, say)
    check_footprint(model_config, config)
    tokens = tokenized.tokenize_corpus(corpus, tokenizer)
    data.check_window(tokens.splits, config.n_segments * model_config.seq_len + 1)
    return model_config, tokenizer, tokens


def _report(result: Any, config: Any, out: Path, seconds: float, say: Callable[[str], Any]) -> None:
    """The run's validation (and test) bits per byte and what it wrote."""
    from ct_jax.training import DataOrder

    steps, val = result.history.column("val_bpb")
    how = ("whole split, memory streamed" if config.data_order is DataOrder.STREAMS
           else f"{config.eval_batches} batches of windows from empty memory")
    if val:
        say(f"validation bits/byte: {val[0]:.3f} (step {steps[0]}) -> {val[-1]:.3f} (step {steps[-1]}, {how}); "
            f"{seconds:.0f}s")
    _, test = result.history.column("test_bpb")
    if test:
        say(f"test bits/byte: {test[-1]:.3f} ({how})")
    say(f"wrote {out / 'metrics.csv'}, {out / 'loss.png'}, {out / 'model'} (model.safetensors + config.json)")


def run_tokenizer(args: argparse.Namespace, out: Path, corpus: Corpus,
                  say: Callable[[str], Any]) -> tokenizers.Tokenizer:
    """The run's tokenizer: the one stored in `out` when it holds checkpoints (resume), else the one
    --tokenizer names, learnt from the training split where it learns (spm-train, words)."""
    checkpoints = out / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        stored = tokenizers.load_tokenizer(out)
        if args.tokenizer_given and tokenizers.check_spec(args.tokenizer) != stored.kind:
            raise ValueError(f"{tokenizers.TOKENIZER_FLAG} {args.tokenizer!r}, but the run in {out} was trained with "
                             f"{stored.spec!r} ({tokenizers.TOKENIZER_RECORD}); resume without the flag or use "
                             "another --out")
        return stored
    split, starts = corpus.splits["train"], corpus.starts["train"]
    bounds = np.append(starts, len(split))
    documents = (bytes(split[a:b]).decode("utf-8", "replace") for a, b in zip(bounds[:-1], bounds[1:]))
    if args.tokenizer != "bytes":
        say(f"tokenizer: {args.tokenizer} (learning from the training split where it learns)")
    with tempfile.TemporaryDirectory() as scratch:  # `fit` stores the model file in --out, once it holds the folder
        return tokenizers.tokenizer_from_spec(args.tokenizer, train_text=documents, run_dir=scratch)


def with_vocabulary(model_config: ModelConfig, num_tokens: int | None,
                    say: Callable[[str], Any] | None = None) -> ModelConfig:
    """`model_config` with `num_tokens` (None: as it is; the tokenizer's vocabulary where --num-tokens is not
    given), its adaptive cutoffs fitted to it (`presets.fit_cutoffs`, a note to `say` of what changed)."""
    kwargs, note = presets.fit_cutoffs(model_config.to_kwargs(), num_tokens or model_config.num_tokens)
    if note and say is not None:
        say(f"note: {note}")
    return ModelConfig.from_kwargs(kwargs)


def check_footprint(model_config: ModelConfig, config: TrainConfig) -> None:
    """Refuses (`footprint.DoesNotFitError`, with the estimate and what to shrink) a configuration whose training
    step cannot fit on a device, before anything is allocated."""
    import jax
    import jax.numpy as jnp

    from ct_jax import footprint

    kwargs = model_config.to_kwargs()
    per_device = -(-config.batch_size // jax.device_count())
    per_device = -(-per_device // config.micro_batches) * config.micro_batches
    estimate = footprint.estimate(
        **{key: kwargs[key] for key in footprint.MODEL_KEYWORDS if key in kwargs}, batch_size=per_device,
        n_segments=config.n_segments, micro_batches=config.micro_batches, memory_gradients=config.memory_gradients,
        dtype_bytes=jnp.dtype(config.compute_dtype).itemsize,
    )
    footprint.check_fits(estimate)
