"""The training loop: `fit` runs a `Trainer` over the data with validation, metrics,
checkpoints and resume (the host side; the compiled steps live in `ct_jax.training`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ct_jax._checks import check_int
from ct_jax.checkpointing import Checkpoints, DamagedCheckpointError, MetricsLog
from ct_jax.config import ModelConfig
from ct_jax.convert import save_pretrained
from ct_jax.data import Splits, WindowSampler, eval_batches, fingerprint
from ct_jax.evaluation import StreamEval, stream_eval
from ct_jax.event_log import EventLog
from ct_jax.interrupts import StopSignals, TrainingInterrupted
from ct_jax.io import folder_lock
from ct_jax.model import CompressiveTransformer
from ct_jax.run_checks import check_record, check_token_ids
from ct_jax.streams import StreamSampler, check_starts
from ct_jax.tokenized import SplitCounts, metric_values, split_measures
from ct_jax.tokenizers import Tokenizer
from ct_jax.training import (
    LN2,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainingDivergedError,
    TrainState,
    create_model,
)


@dataclasses.dataclass
class FitResult:
    """What `fit` leaves: the model with the final parameters, the host state and the metrics."""

    model: CompressiveTransformer
    state: TrainState
    history: MetricsLog
    out_dir: Path
    start: int = 0  # the step the run began or resumed at; >= config.steps: nothing was trained or written


def fit(
    model_config: ModelConfig | dict[str, Any],
    config: TrainConfig,
    splits: dict[str, np.ndarray],
    out_dir: str | Path,
    *,
    resume: bool = True,
    resume_from: int | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    compiler_options: dict[str, Any] | None = None,
    documents: dict[str, np.ndarray] | None = None,
    counts: dict[str, SplitCounts] | None = None,
    tokenizer: Tokenizer | None = None,
    tensorboard: bool = True,
    diagnostics: bool = True,
) -> FitResult:
    """Trains on `splits['train']`, validating on `splits['validation']`, writing into `out_dir`.

    `config.data_order` streams: `batch_size` streams through the training documents
    (`documents`: split name -> document start offsets, as `ct_jax.data.read_corpus(...).starts`
    gives; absent: one document per split) with the memory carried across steps, and
    validation with `ct_jax.evaluation.evaluate_stream` (periodically over `eval_segments`
    segments per stream, or the whole split; at the end the whole split, and `splits['test']`
    if there is one, as `test_bpb`). Windows: random windows from empty memory, validated on
    `eval_batches` sequential windows. `counts` (split name -> `SplitCounts`, as
    `ct_jax.tokenized.tokenize_corpus` gives; absent: a split's tokens are its bytes) turn
    bits per token into the logged bits per byte (`val_bpb`), `val_bits_per_token`,
    `val_ppl` and, for a word tokenizer, `val_word_ppl`. `tokenizer` (the one that made the
    splits) is stored in `out_dir` and `model/` (`Tokenizer.save`) for evaluation, generation
    and resume. `tensorboard`: the lead process also writes the metrics as TensorBoard events into
    `out_dir` (`ct_jax.event_log`). `diagnostics` (streams): each validation also measures the
    memory's use (`val_mass_*` per layer: the attention mass on compressed memory, memory and the
    segment; `val_cmem_knockout_bpb`: the bits per byte the compressed memory saves, one more
    evaluation with it emptied).

    Files: `checkpoints/` (orbax, every `checkpoint_every` steps and at the end, the last
    `keep_checkpoints` kept), `metrics.csv` (rewritten atomically at every checkpoint),
    `loss.png` and `model/` (`model.safetensors` + `config.json`, readable by ct_torch_ref)
    at the end. One run at a time holds `out_dir` (a second raises FolderLockedError naming
    the holder). With `resume`, a run continues from the newest checkpoint in `out_dir` that
    verifies (damaged newer ones are moved to `checkpoints-set-aside/` with a warning), or
    from step `resume_from`, reproducing the uninterrupted run exactly (same data, RNG and
    state); without it, an `out_dir` holding checkpoints is refused.

    A checkpoint is written only once a loss computed with its parameters (the next train
    step's, or the validation at that step) is finite and within `config.divergence_factor`
    of the running median loss; otherwise the run stops with NonFiniteLossError /
    TrainingDivergedError naming the step and the newest safe checkpoint. In a multi-process
    run every process calls this; process 0 holds the lock and writes the CSV, plot and export.

    SIGINT / SIGTERM (called from the main thread): the step in flight finishes, is checkpointed
    (verified by a short validation) and `ct_jax.interrupts.TrainingInterrupted` is raised naming
    it; all processes stop at the same step. A run already at `config.steps` or beyond says so
    and returns (`FitResult.start`) without writing anything. Before anything is written, data
    holding token ids outside [0, num_tokens) and a checkpoint that cannot be resumed with these
    settings or this data are refused, naming what changed (`ct_jax.run_checks`).
    """
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_kwargs(model_config)
    if resume_from is not None:
        check_int("resume_from", resume_from)
    check_token_ids(splits, model_config.num_tokens, tokenizer)
    out_dir = Path(out_dir)
    lead = jax.process_index() == 0
    say = log if lead else _silent
    with folder_lock(out_dir) if lead else contextlib.nullcontext():
        checkpoints = Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
        run = None
        try:
            steps = _resumable_steps(checkpoints, resume, resume_from)
            if lead and tokenizer is not None:
                tokenizer.save(out_dir)
            run = _Run(model_config, config, splits, out_dir, checkpoints, compiler_options, lead, say, documents or {},
                       counts or {}, diagnostics)
            start = run.resume(resume_from) if steps else 0
            if start >= config.steps:
                say(f"run is at step {start} >= --steps {config.steps}: nothing to train; pass a larger --steps")
                return FitResult(run.trainer.load_params(run.trainer.host(run.state).params),
                                 run.trainer.host(run.state), run.history, out_dir, start)
            if lead and tensorboard:
                run.events = EventLog(out_dir, start)
            with StopSignals() as stop:
                run.loop(start, progress and lead, stop)
            if "test" in splits and run.trainer.streaming:
                test = run.measured("test", run.evaluate("test", progress and lead))
                run.log(config.steps, **test)
                say(f"test: {test['test_bpb']:.4f} bits/byte (whole split, streamed)")
            checkpoints.wait()
            host_state = run.trainer.host(run.state)
            model = run.trainer.load_params(host_state.params)
            if lead:
                run.history.write()
                run.history.plot(out_dir / "loss.png")
                save_pretrained(model, out_dir / "model")
                if tokenizer is not None:
                    tokenizer.save(out_dir / "model")
            return FitResult(model, host_state, run.history, out_dir, start)
        finally:
            if run is not None and run.events is not None:
                run.events.close()
            checkpoints.close()  # after pending saves complete (or a timeout: an error must not hang here)


def _silent(message: str) -> None:
    """`log` of the processes other than the lead."""


def _resumable_steps(checkpoints: Checkpoints, resume: bool, resume_from: int | None) -> list[int]:
    """The checkpointed steps, after refusing a fresh run over them or a `resume_from` not among them."""
    steps = checkpoints.all_steps()
    if steps and not resume:
        raise ValueError(f"{checkpoints.directory} already holds checkpoints (up to step {steps[-1]}); "
                         "resume, or use another out_dir")
    if resume_from is not None and resume_from not in steps:
        raise ValueError(f"resume_from={resume_from}: no checkpoint of that step in {checkpoints.directory} "
                         f"(steps there: {steps})")
    return steps


class _Guard:
    """The running median of the train loss, and the check of a loss against it."""

    WINDOW, FLOOR = 16, 1.0  # losses in the median; nats below which the level counts as FLOOR

    def __init__(self, factor: float, losses: list[float]):
        self.factor, self.losses = factor, losses[-self.WINDOW :]

    def check(self, what: str, loss: float, grad_norm: float | None = None) -> str | None:
        """None if `loss` (and `grad_norm`) are sane, else the reason; a sane train loss joins the window."""
        values = dict(loss=loss) if grad_norm is None else dict(loss=loss, grad_norm=grad_norm)
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            shown = ", ".join(f"{name}={value}" for name, value in values.items())
            return f"non-finite {' and '.join(bad)} {what} ({shown})"
        if self.factor and self.losses:
            level = max(float(np.median(self.losses)), self.FLOOR)
            if loss > self.factor * level:
                return (f"loss {loss:.4g} {what} is {loss / level:.3g}x the running median {level:.4g} "
                        f"(limit: divergence_factor={self.factor:g}x)")
        if grad_norm is not None:
            self.losses = (self.losses + [loss])[-self.WINDOW :]
        return None


def _make_sampler(trainer: Trainer, model_config: ModelConfig, splits: Splits,
                  documents: dict[str, np.ndarray]) -> StreamSampler | WindowSampler:
    """The training sampler of `trainer`'s data order, after checking every split can be validated on."""
    config, parallel = trainer.config, trainer.parallel
    shard = dict(process_index=parallel.process_index, process_count=parallel.process_count)
    if trainer.streaming:
        for name, split in splits.items():
            if name != "train" and len(split) // config.batch_size < 2:
                raise ValueError(f"the {name} split ({len(split)} bytes) is too short for batch_size="
                                 f"{config.batch_size} streams of 2 bytes or more")
        return StreamSampler(splits["train"], documents["train"], model_config.seq_len, config.n_segments,
                             config.batch_size, config.seed, **shard)
    validation = splits["validation"]
    n_windows = (len(validation) - 1) // (trainer.window - 1)
    if n_windows < config.batch_size:
        raise ValueError(
            f"the validation split ({len(validation)} bytes) holds {n_windows} windows of "
            f"{trainer.window} bytes, fewer than one batch (batch_size={config.batch_size})"
        )
    return WindowSampler(splits["train"], trainer.window, config.batch_size, config.seed, **shard)


def _restore_newest(checkpoints: Checkpoints, template: TrainState, resume_from: int | None,
                    check: Callable[[dict[str, Any]], None], say: Callable[[str], Any],
                    lead: bool) -> tuple[int, TrainState, dict[str, Any]]:
    """(step, host state, record) of the newest checkpoint that verifies (at most `resume_from`, which
    must verify itself); newer steps are moved aside by the lead process."""
    steps = [step for step in reversed(checkpoints.all_steps()) if resume_from is None or step <= resume_from]
    failures = {}
    for step in steps:
        try:
            check(checkpoints.read_record(step))
            host_state, record = checkpoints.restore(template, step)
            break
        except DamagedCheckpointError as error:
            if resume_from is not None:
                raise DamagedCheckpointError(f"resume_from={resume_from}: checkpoint {error}") from error
            failures[step] = str(error)
            say(f"warning: skipping a damaged checkpoint in {checkpoints.directory}: {error}")
    else:
        raise DamagedCheckpointError(
            f"no checkpoint in {checkpoints.directory} can be restored: " + "; ".join(failures.values())
            + ". Resume from an older step (resume_from / --resume-from) if one is listed as readable, or pass "
            "another --out (out_dir) to start afresh"
        )
    if lead:
        for newer in (s for s in checkpoints.all_steps() if s > step):
            reason = "damaged" if newer in failures else f"after-resume-from-{step}"
            say(f"moved checkpoint step {newer} to {checkpoints.set_aside(newer, reason)}")
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ct_jax.train_loop.resume")
        checkpoints.reload()
    return step, host_state, record


class _HeldCheckpoint:
    """A checkpoint held back until a loss computed with its parameters is found sane: then written;
    or the run stops and it is dropped."""

    def __init__(self, checkpoints: Checkpoints, lead: bool):
        self.checkpoints, self.lead = checkpoints, lead
        self.held: tuple[int, TrainState, dict[str, Any]] | None = None

    def hold(self, step: int, host_state: TrainState, record: dict[str, Any]) -> None:
        self.held = (step, host_state, record)

    def write(self, history: MetricsLog) -> None:
        """Writes the held checkpoint (if any): a loss at its parameters was sane."""
        if self.held is None:
            return
        step, host_state, record = self.held
        self.held = None
        if self.lead:  # first: the CSV always covers the newest checkpoint (a resume truncates it)
            history.write()
        self.checkpoints.save(step, host_state, record)

    def stop(self, reason: str, error: type[TrainingDivergedError]) -> NoReturn:
        """Raises `error`: `reason`, the checkpoint left unwritten, and the newest safe one."""
        dropped = f"; checkpoint step {self.held[0]} was not written" if self.held else ""
        self.checkpoints.wait()
        latest = self.checkpoints.latest_step()
        safe = (f"the newest checkpoint, step {latest}, is safe to resume from (rerun, e.g. with a lower learning "
                f"rate; or choose an older one with resume_from / --resume-from)" if latest is not None else
                "no checkpoint was written, so none is safe to resume from: start afresh")
        raise error(f"{reason}; the run stopped{dropped}; {safe}")


def _failure(*values: float) -> type[TrainingDivergedError]:
    """The error of a bad loss: NonFiniteLossError if any value is NaN/Inf, else TrainingDivergedError."""
    return TrainingDivergedError if all(math.isfinite(value) for value in values) else NonFiniteLossError


class _Run:
    """The state of one `fit`: trainer, placed state, data sampler, metrics and checkpoints."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, splits: Splits, out_dir: Path,
                 checkpoints: Checkpoints, compiler_options: dict[str, Any] | None, lead: bool,
                 say: Callable[[str], Any], documents: dict[str, np.ndarray], counts: dict[str, SplitCounts],
                 diagnostics: bool = True):
        self.model_config, self.config, self.checkpoints = model_config, config, checkpoints
        self.diagnostics = diagnostics
        self.events: EventLog | None = None  # TensorBoard events (the lead, if asked), opened once the start is known
        self.lead, self.say = lead, say
        self.trainer = Trainer(create_model(model_config, config), config, compiler_options=compiler_options)
        self.splits = splits
        self.documents = {name: check_starts(split, documents.get(name), name) for name, split in splits.items()}
        self.counts = {name: counts.get(name, SplitCounts(len(split), len(split))) for name, split in splits.items()}
        self.sampler = _make_sampler(self.trainer, model_config, splits, self.documents)
        self.data_fingerprint = fingerprint(splits)
        self.data_sizes = {name: len(split) for name, split in splits.items()}
        self.history = MetricsLog(out_dir / "metrics.csv")
        self.history.truncate(-1)
        self.state = self.trainer.place(self.trainer.init_state())
        self.guard = _Guard(config.divergence_factor, [])
        self.held = _HeldCheckpoint(checkpoints, lead)
        self.clock = time.perf_counter()  # when the last recorded step's time began
        self.saved_step = -1  # the newest step handed to the checkpointer

    def resume(self, resume_from: int | None) -> int:
        """Adopts the newest checkpoint that verifies (at most `resume_from`): state, data position and
        metrics. Returns its step."""
        warnings: list[str] = []  # each step tried is checked: say a change once, and only if training goes on

        def check(record: dict[str, Any]) -> None:
            for warning in check_record(record, self.model_config, self.config, self.data_fingerprint,
                                         self.data_sizes, self.checkpoints.directory):
                if warning not in warnings:
                    warnings.append(warning)

        step, host_state, record = _restore_newest(self.checkpoints, self.trainer.host(self.state), resume_from,
                                                   check, self.say, self.lead)
        if step < self.config.steps:
            for warning in warnings:
                self.say(warning)
        self.state = self.trainer.place(host_state)
        self.sampler.load_state_dict(record["sampler"])
        self.history = MetricsLog(self.history.path)
        if self.history.skipped:
            self.say(f"warning: {self.history.path} has unreadable lines {self.history.skipped[:10]}; left out of "
                     "the metrics (training is not affected)")
        self.history.truncate(step)
        self.guard = _Guard(self.config.divergence_factor, self.history.column("loss")[1])
        self.saved_step = step
        if step < self.config.steps:
            self.say(f"resumed from step {step} of {self.config.steps} ({self.checkpoints.directory})")
        return step

    def evaluate(self, split: str = "validation", progress: bool = False, whole: bool = False,
                 segments: int | None = None) -> float:
        """Bits per byte of a split: streamed (memory carried; `segments`, else `eval_segments`, per stream
        unless `whole`), or on `eval_batches` sequential windows from empty memory."""
        if self.trainer.streaming:
            return self.streamed(split, progress, whole, segments).bits_per_token
        config = self.config
        batches = eval_batches(self.splits["validation"], self.trainer.window, config.batch_size, config.eval_batches,
                               drop_remainder=True)
        return self.trainer.evaluate(self.state, batches)

    def streamed(self, split: str = "validation", progress: bool = False, whole: bool = False,
                 segments: int | None = None, *, knockout: str | None = None, attention_mass: bool = False
                 ) -> StreamEval:
        """`stream_eval` of a split at the current parameters (`evaluate`'s streamed case, with its options)."""
        config = self.config
        model = self.trainer.load_params(self.trainer.host(self.state).params)
        segments = segments or config.eval_segments or None
        return stream_eval(model, self.splits[split], config.batch_size, document_starts=self.documents[split],
                           max_segments=None if whole else segments, progress=progress, name=split,
                           knockout=knockout, attention_mass=attention_mass)

    def memory_diagnostics(self, evaluated: StreamEval, whole: bool, progress: bool) -> dict[str, float]:
        """The validation's memory columns: each layer's attention mass (from `evaluated`) and, with a
        compressed memory, what emptying it costs in bits per byte (one more evaluation)."""
        values = {}
        for layer, (cmem, mem, segment) in enumerate(evaluated.attention_mass, start=1):
            values.update({f"val_mass_cmem_{layer}": float(cmem), f"val_mass_mem_{layer}": float(mem),
                           f"val_mass_segment_{layer}": float(segment)})
        if self.model_config.cmem_len and self.model_config.memory_layers:
            knocked = self.streamed(whole=whole, progress=progress, knockout="compressed")
            values["val_cmem_knockout_bpb"] = (self.measured("validation", knocked.bits_per_token)["val_bpb"]
                                               - self.measured("validation", evaluated.bits_per_token)["val_bpb"])
        return values

    def log(self, step: int, **values: float) -> None:
        """Adds `values` to the metrics (and the TensorBoard events, if written)."""
        self.history.add(step, **values)
        if self.events is not None:
            self.events.add(step, **values)

    def measured(self, split: str, bits_per_token: float) -> dict[str, float]:
        """The log columns of a split's bits per token: `{split}_bpb` (bits per byte), bits per token, perplexity."""
        return metric_values("val" if split == "validation" else split, split_measures(bits_per_token,
                                                                                      self.counts[split]))

    def save(self, step: int, verified: bool) -> None:
        """Checkpoints `step` now if a loss at its parameters was checked (`verified`), else once one is."""
        record = dict(step=step, sampler=self.sampler.state_dict(), model_config=self.model_config.to_kwargs(),
                      train_config=self.config.to_json(), data_fingerprint=self.data_fingerprint,
                      data_sizes=self.data_sizes)
        self.held.hold(step, self.trainer.host(self.state), record)
        self.saved_step = step
        if verified:
            self.held.write(self.history)

    def record(self, step: int, device_metrics: dict[str, jax.Array], bar: tqdm) -> None:
        """Reads a step's metrics (one step late: no sync per step), checks its loss and logs it; a sane loss
        verifies the held checkpoint, computed with the same parameters."""
        metrics = self.trainer.metrics(device_metrics)
        problem = self.guard.check(f"at step {step}", metrics["loss"], metrics["grad_norm"])
        if problem is not None:
            self.held.stop(problem, _failure(metrics["loss"], metrics["grad_norm"]))
        self.held.write(self.history)
        now = time.perf_counter()
        tokens_per_step = self.config.batch_size * self.config.n_segments * self.model_config.seq_len
        metrics["tokens_per_s"] = tokens_per_step / max(now - self.clock, 1e-9)
        self.clock = now
        self.log(step, **metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpb=f"{metrics['bpb']:.3f}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

    def validate(self, step: int, save_now: bool, progress: bool, bar: tqdm) -> None:
        """Validation after `step` (the whole split at the last step); it checks the checkpoint saved now."""
        whole = step == self.config.steps
        diagnose = self.diagnostics and self.trainer.streaming
        if diagnose:
            evaluated = self.streamed(whole=whole, progress=progress, attention_mass=True)
            val_bits = evaluated.bits_per_token
        else:
            val_bits = self.evaluate(whole=whole, progress=progress)  # per token
        problem = self.guard.check(f"(validation after step {step})", val_bits * LN2)
        if save_now and problem is not None:
            self.held.stop(problem, _failure(val_bits))
        measured = self.measured("validation", val_bits)
        self.log(step, **measured, **(self.memory_diagnostics(evaluated, whole, progress) if diagnose else {}))
        if self.events is not None:
            self.events.flush()
        if progress:
            bar.write(f"step {step}: validation {measured['val_bpb']:.4f} bits/byte")

    def loop(self, start: int, progress: bool, stop: StopSignals) -> None:
        """Steps `start + 1 .. config.steps`, validating and checkpointing on schedule; on a signal (`stop`)
        the step in flight finishes, is checkpointed, and TrainingInterrupted is raised."""
        config = self.config
        if start == 0:
            self.log(0, **self.measured("validation", self.evaluate()))
        pending: tuple[int, dict[str, jax.Array]] | None = None  # read one step late: no sync per step
        self.clock = time.perf_counter()
        with tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True) as bar:
            for step in range(start + 1, config.steps + 1):
                self.state, device_metrics = self.trainer.train_step(self.state, next(self.sampler))
                if pending is not None:
                    self.record(*pending, bar)
                pending = (step, device_metrics)
                evaluate_now = step == config.steps or (config.eval_every and step % config.eval_every == 0)
                save_now = step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
                signum = stop.requested() if step < config.steps else 0
                if evaluate_now or save_now or signum:
                    self.record(*pending, bar)
                    pending = None
                    if evaluate_now:
                        self.validate(step, save_now, progress, bar)
                    if save_now:
                        self.save(step, verified=bool(evaluate_now))
                    if signum:
                        self.interrupt(step, signum)
                    self.clock = time.perf_counter()
            if pending is not None:
                self.record(*pending, bar)

    def interrupt(self, step: int, signum: int) -> NoReturn:
        """Checkpoints `step` (verified by a short validation at its parameters, unless already written) and
        raises TrainingInterrupted naming it."""
        if self.saved_step != step:
            self.save(step, verified=False)
        if self.held.held is not None:
            val_bpb = self.evaluate(segments=self.config.n_segments)  # short: a SIGTERM's grace period is short
            problem = self.guard.check(f"(validation after step {step}, on interrupt)", val_bpb * LN2)
            if problem is not None:
                self.held.stop(problem, _failure(val_bpb))
            self.held.write(self.history)
        self.checkpoints.wait()
        raise TrainingInterrupted(signum, step, self.checkpoints.directory / str(step))
