"""The training loop: `fit` runs a `Trainer` over the data with validation, metrics,
checkpoints and resume (the host side; the compiled steps live in `ct_jax.training`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ct_jax._checks import check_int
from ct_jax.checkpointing import Checkpoints, DamagedCheckpointError, MetricsLog
from ct_jax.config import ModelConfig
from ct_jax.io import folder_lock
from ct_jax.model import CompressiveTransformer
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
) -> FitResult:
    """Trains on `splits['train']`, validating on `splits['validation']`, writing into `out_dir`.

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
    """
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_kwargs(model_config)
    if resume_from is not None:
        check_int("resume_from", resume_from)
    out_dir = Path(out_dir)
    lead = jax.process_index() == 0
    say = log if lead else (lambda message: None)
    with folder_lock(out_dir) if lead else contextlib.nullcontext():
        checkpoints = Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
        try:
            steps = checkpoints.all_steps()
            if steps and not resume:
                raise ValueError(f"{checkpoints.directory} already holds checkpoints (up to step {steps[-1]}); "
                                 "resume, or use another out_dir")
            if resume_from is not None and resume_from not in steps:
                raise ValueError(f"resume_from={resume_from}: no checkpoint of that step in {checkpoints.directory} "
                                 f"(steps there: {steps})")
            run = _Run(model_config, config, splits, out_dir, checkpoints, compiler_options, lead, say)
            start = run.resume(resume_from) if steps else 0
            run.loop(start, progress and lead)
            checkpoints.wait()
            host_state = run.trainer.host(run.state)
            model = run.trainer.load_params(host_state.params)
            if lead:
                from ct_jax.convert import save_pretrained

                run.history.write()
                run.history.plot(out_dir / "loss.png")
                save_pretrained(model, out_dir / "model")
            return FitResult(model, host_state, run.history, out_dir)
        finally:
            checkpoints.close()  # after pending saves complete


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


class _Run:
    """The state of one `fit`: trainer, placed state, data sampler, metrics and checkpoints."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, splits: dict[str, np.ndarray], out_dir: Path,
                 checkpoints: Checkpoints, compiler_options: dict[str, Any] | None, lead: bool,
                 say: Callable[[str], Any]):
        from ct_jax.data import WindowSampler, fingerprint

        self.model_config, self.config, self.checkpoints = model_config, config, checkpoints
        self.lead, self.say = lead, say
        self.trainer = Trainer(create_model(model_config, config), config, compiler_options=compiler_options)
        parallel = self.trainer.parallel
        self.validation = splits["validation"]
        n_windows = (len(self.validation) - 1) // (self.trainer.window - 1)
        if n_windows < config.batch_size:
            raise ValueError(
                f"the validation split ({len(self.validation)} bytes) holds {n_windows} windows of "
                f"{self.trainer.window} bytes, fewer than one batch (batch_size={config.batch_size})"
            )
        self.sampler = WindowSampler(splits["train"], self.trainer.window, config.batch_size, config.seed,
                                     process_index=parallel.process_index, process_count=parallel.process_count)
        self.data_fingerprint = fingerprint(splits)
        self.history = MetricsLog(out_dir / "metrics.csv")
        self.history.truncate(-1)
        self.state = self.trainer.place(self.trainer.init_state())
        self.guard = _Guard(config.divergence_factor, [])
        self.unverified: tuple[int, TrainState, dict[str, Any]] | None = None  # a save awaiting its check

    def resume(self, resume_from: int | None) -> int:
        """Adopts the newest checkpoint that verifies (at most `resume_from`): state, data position and
        metrics; newer steps are moved aside. Returns its step."""
        checkpoints, template = self.checkpoints, self.trainer.host(self.state)
        steps = [step for step in reversed(checkpoints.all_steps()) if resume_from is None or step <= resume_from]
        failures = {}
        for step in steps:
            try:
                record = checkpoints.read_record(step)
                self._check_record(record)
                host_state, record = checkpoints.restore(template, step)
                break
            except DamagedCheckpointError as error:
                if resume_from is not None:
                    raise DamagedCheckpointError(f"resume_from={resume_from}: checkpoint {error}") from error
                failures[step] = str(error)
                self.say(f"warning: skipping a damaged checkpoint in {checkpoints.directory}: {error}")
        else:
            raise DamagedCheckpointError(
                f"no checkpoint in {checkpoints.directory} can be restored: " + "; ".join(failures.values())
                + ". Move the checkpoints folder away to start afresh, or use another out_dir"
            )
        if self.lead:
            for newer in (s for s in checkpoints.all_steps() if s > step):
                reason = "damaged" if newer in failures else f"after-resume-from-{step}"
                self.say(f"moved checkpoint step {newer} to {checkpoints.set_aside(newer, reason)}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ct_jax.train_loop.resume")
            checkpoints.reload()
        self.state = self.trainer.place(host_state)
        self.sampler.load_state_dict(record["sampler"])
        self.history = MetricsLog(self.history.path)
        if self.history.skipped:
            self.say(f"warning: {self.history.path} has unreadable lines {self.history.skipped[:10]}; left out of "
                     "the metrics (training is not affected)")
        self.history.truncate(step)
        self.guard = _Guard(self.config.divergence_factor, self.history.column("loss")[1])
        self.say(f"resumed from step {step} of {self.config.steps} ({checkpoints.directory})")
        return step

    def _check_record(self, record: dict[str, Any]) -> None:
        """Refuses a checkpoint of another model; says what changed in the settings and the data."""
        # Normalised, so records written before a keyword existed (its default) still match.
        stored = record.get("model_config")
        if stored is None or ModelConfig.from_kwargs(stored).to_kwargs() != self.model_config.to_kwargs():
            raise ValueError(f"the checkpoint in {self.checkpoints.directory} is of another model: "
                             f"{record.get('model_config')}, expected {self.model_config.to_kwargs()} "
                             "(use another out_dir)")
        before = record.get("train_config", {})
        changed = {key: (value, before.get(key)) for key, value in self.config.to_json().items()
                   if before.get(key) != value}
        if changed:
            self.say(f"resuming with changed training settings (now, before): {changed}")
        if record.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            self.say(f"warning: resuming on other data than the checkpoint was trained on (data fingerprint "
                     f"{self.data_fingerprint}, checkpoint's {record['data_fingerprint']})")

    def evaluate(self) -> float:
        from ct_jax.data import eval_batches

        config = self.config
        batches = eval_batches(self.validation, self.trainer.window, config.batch_size, config.eval_batches,
                               drop_remainder=True)
        return self.trainer.evaluate(self.state, batches)

    def save(self, step: int, verified: bool) -> None:
        """Checkpoints `step` now if a loss at its parameters was checked (`verified`), else once one is."""
        record = dict(step=step, sampler=self.sampler.state_dict(), model_config=self.model_config.to_kwargs(),
                      train_config=self.config.to_json(), data_fingerprint=self.data_fingerprint)
        self.unverified = (step, self.trainer.host(self.state), record)
        if verified:
            self.write_verified()

    def write_verified(self) -> None:
        """Writes the checkpoint awaiting its check: a loss at its parameters was sane."""
        if self.unverified is None:
            return
        step, host_state, record = self.unverified
        self.unverified = None
        if self.lead:  # first: the CSV always covers the newest checkpoint (a resume truncates it)
            self.history.write()
        self.checkpoints.save(step, host_state, record)

    def stop(self, reason: str, error: type[TrainingDivergedError]) -> None:
        """Raises `error`: `reason`, the checkpoint left unwritten, and the newest safe one."""
        dropped = f"; checkpoint step {self.unverified[0]} was not written" if self.unverified else ""
        self.checkpoints.wait()
        latest = self.checkpoints.latest_step()
        safe = (f"the newest checkpoint, step {latest}, is safe to resume from (rerun, e.g. with a lower learning "
                f"rate; or choose an older one with resume_from / --resume-from)" if latest is not None else
                "no checkpoint was written, so none is safe to resume from: start afresh")
        raise error(f"{reason}; the run stopped{dropped}; {safe}")

    def loop(self, start: int, progress: bool) -> None:
        """Steps `start + 1 .. config.steps`, validating and checkpointing on schedule."""
        config, trainer = self.config, self.trainer
        if start == 0:
            self.history.add(0, val_bpb=self.evaluate())
        tokens_per_step = config.batch_size * config.n_segments * self.model_config.seq_len
        pending: tuple[int, dict[str, jax.Array]] | None = None  # read one step late: no sync per step
        clock = time.perf_counter()
        from tqdm.auto import tqdm

        with tqdm(total=config.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True) as bar:

            def record(pending) -> float:
                step, device_metrics = pending
                metrics = trainer.metrics(device_metrics)
                problem = self.guard.check(f"at step {step}", metrics["loss"], metrics["grad_norm"])
                if problem is not None:
                    finite = math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
                    self.stop(problem, TrainingDivergedError if finite else NonFiniteLossError)
                self.write_verified()  # this loss was computed with the waiting checkpoint's parameters
                now = time.perf_counter()
                metrics["tokens_per_s"] = tokens_per_step / max(now - clock, 1e-9)
                self.history.add(step, **metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", bpb=f"{metrics['bpb']:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
                return now

            for step in range(start + 1, config.steps + 1):
                self.state, device_metrics = trainer.train_step(self.state, next(self.sampler))
                if pending is not None:
                    clock = record(pending)
                pending = (step, device_metrics)
                evaluate_now = step == config.steps or (config.eval_every and step % config.eval_every == 0)
                save_now = step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
                if evaluate_now or save_now:
                    record(pending)
                    pending = None
                    if evaluate_now:
                        val_bpb = self.evaluate()
                        problem = self.guard.check(f"(validation after step {step})", val_bpb * LN2)
                        if save_now and problem is not None:  # it is the checkpoint's check
                            self.stop(problem, TrainingDivergedError if math.isfinite(val_bpb)
                                      else NonFiniteLossError)
                        self.history.add(step, val_bpb=val_bpb)
                        if progress:
                            bar.write(f"step {step}: validation {val_bpb:.4f} bits/byte")
                    if save_now:
                        self.save(step, verified=bool(evaluate_now))
                    clock = time.perf_counter()
            if pending is not None:
                record(pending)
