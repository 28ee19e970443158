"""The training loop: `fit` runs a `Trainer` over the data with validation, metrics,
checkpoints and resume (the host side; the compiled steps live in `ct_jax.training`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ct_jax.checkpointing import Checkpoints, MetricsLog
from ct_jax.config import ModelConfig
from ct_jax.model import CompressiveTransformer
from ct_jax.training import NonFiniteLossError, Trainer, TrainConfig, TrainState, create_model


@dataclasses.dataclass
class FitResult:
    """What `fit` leaves: the model with the final parameters, the host state and the metrics."""

    model: CompressiveTransformer
    state: TrainState
    history: MetricsLog
    out_dir: Path


def _resume_point(checkpoints: Checkpoints, model_config: ModelConfig, config: TrainConfig, resume: bool,
                  say: Callable[[str], Any]) -> tuple[int, dict[str, Any] | None]:
    """(first step, checkpoint record or None), refusing a checkpoint of another model."""
    start = checkpoints.latest_step()
    if start is None:
        return 0, None
    if not resume:
        raise ValueError(f"{checkpoints.directory} already holds checkpoints (up to step {start}); resume, "
                         "or use another out_dir")
    record = checkpoints.read_record(start)
    if record["model_config"] != model_config.to_kwargs():
        raise ValueError(f"the checkpoint in {checkpoints.directory} is of another model: {record['model_config']}, "
                         f"expected {model_config.to_kwargs()} (use another out_dir)")
    before = record["train_config"]
    changed = {key: (value, before.get(key)) for key, value in config.to_json().items() if before.get(key) != value}
    if changed:
        say(f"resuming with changed training settings (now, before): {changed}")
    return start, record


def fit(
    model_config: ModelConfig | dict[str, Any],
    config: TrainConfig,
    splits: dict[str, np.ndarray],
    out_dir: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    compiler_options: dict[str, Any] | None = None,
    documents: dict[str, np.ndarray] | None = None,
) -> FitResult:
    """Trains on `splits['train']`, validating on `splits['validation']`, writing into `out_dir`.

    `config.data_order` streams: `batch_size` streams through the training documents
    (`documents`: split name -> document start offsets, as `ct_jax.streams.document_starts`
    gives; absent: one document per split) with the memory carried across steps, and
    validation with `ct_jax.evaluation.evaluate_stream` (periodically over `eval_segments`
    segments per stream, or the whole split; at the end the whole split, and `splits['test']`
    if there is one, as `test_bpb`). Windows: random windows from empty memory, validated on
    `eval_batches` sequential windows.

    Files: `checkpoints/` (orbax, every `checkpoint_every` steps and at the end, the last
    `keep_checkpoints` kept), `metrics.csv` (rewritten atomically at every checkpoint),
    `loss.png` and `model/` (`model.safetensors` + `config.json`, readable by ct_torch_ref)
    at the end. With `resume`, a run continues from the newest checkpoint in `out_dir`,
    reproducing the uninterrupted run exactly (same data, RNG and state); without it, an
    `out_dir` holding checkpoints is refused. A non-finite loss raises NonFiniteLossError
    naming the step, without saving it. In a multi-process run every process calls this;
    process 0 writes the CSV, plot and export.
    """
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_kwargs(model_config)
    out_dir = Path(out_dir)
    lead = jax.process_index() == 0
    say = log if lead else (lambda message: None)
    checkpoints = Checkpoints(out_dir / "checkpoints", config.keep_checkpoints)
    try:
        start, record = _resume_point(checkpoints, model_config, config, resume, say)
        run = _Run(model_config, config, splits, out_dir, checkpoints, compiler_options, lead, documents or {})
        if record is not None:
            run.resume(start, record)
            say(f"resumed from step {start} of {config.steps} ({checkpoints.directory})")
        run.loop(start, progress and lead)
        if "test" in splits and run.trainer.streaming and start < config.steps:
            test_bpb = run.evaluate("test", progress and lead)
            run.history.add(config.steps, test_bpb=test_bpb)
            say(f"test: {test_bpb:.4f} bits/byte (whole split, streamed)")
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


class _Run:
    """The state of one `fit`: trainer, placed state, data sampler, metrics and checkpoints."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, splits: dict[str, np.ndarray], out_dir: Path,
                 checkpoints: Checkpoints, compiler_options: dict[str, Any] | None, lead: bool,
                 documents: dict[str, np.ndarray]):
        from ct_jax.streams import check_starts

        self.model_config, self.config, self.checkpoints, self.lead = model_config, config, checkpoints, lead
        self.trainer = Trainer(create_model(model_config, config), config, compiler_options=compiler_options)
        self.splits, self.validation = splits, splits["validation"]
        self.documents = {name: check_starts(split, documents.get(name), name) for name, split in splits.items()}
        self.sampler = self._stream_sampler() if self.trainer.streaming else self._window_sampler()
        self.history = MetricsLog(out_dir / "metrics.csv")
        self.history.truncate(-1)
        self.state = self.trainer.place(self.trainer.init_state())

    def _stream_sampler(self):
        from ct_jax.streams import StreamSampler

        config, parallel = self.config, self.trainer.parallel
        for name, split in self.splits.items():
            if name != "train" and len(split) // config.batch_size < 2:
                raise ValueError(f"the {name} split ({len(split)} bytes) is too short for batch_size="
                                 f"{config.batch_size} streams of 2 bytes or more")
        return StreamSampler(self.splits["train"], self.documents["train"], self.model_config.seq_len,
                             config.n_segments, config.batch_size, config.seed,
                             process_index=parallel.process_index, process_count=parallel.process_count)

    def _window_sampler(self):
        from ct_jax.data import WindowSampler

        config, parallel = self.config, self.trainer.parallel
        n_windows = (len(self.validation) - 1) // (self.trainer.window - 1)
        if n_windows < config.batch_size:
            raise ValueError(
                f"the validation split ({len(self.validation)} bytes) holds {n_windows} windows of "
                f"{self.trainer.window} bytes, fewer than one batch (batch_size={config.batch_size})"
            )
        return WindowSampler(self.splits["train"], self.trainer.window, config.batch_size, config.seed,
                             process_index=parallel.process_index, process_count=parallel.process_count)

    def resume(self, step: int, record: dict[str, Any]) -> None:
        """Adopts checkpoint `step`: state, data position and the metrics up to it."""
        host_state, _ = self.checkpoints.restore(self.trainer.host(self.state), step)
        self.state = self.trainer.place(host_state)
        self.sampler.load_state_dict(record["sampler"])
        self.history = MetricsLog(self.history.path)
        self.history.truncate(step)

    def evaluate(self, split: str = "validation", progress: bool = False, whole: bool = False) -> float:
        """Bits per byte of a split: streamed (memory carried; `eval_segments` per stream unless
        `whole`), or on `eval_batches` sequential windows from empty memory."""
        from ct_jax.data import eval_batches
        from ct_jax.evaluation import evaluate_stream

        config = self.config
        if self.trainer.streaming:
            model = self.trainer.load_params(self.trainer.host(self.state).params)
            return evaluate_stream(model, self.splits[split], config.batch_size, document_starts=self.documents[split],
                                   max_segments=None if whole else config.eval_segments or None, progress=progress,
                                   name=split)
        batches = eval_batches(self.validation, self.trainer.window, config.batch_size, config.eval_batches,
                               drop_remainder=True)
        return self.trainer.evaluate(self.state, batches)

    def save(self, step: int) -> None:
        record = dict(step=step, sampler=self.sampler.state_dict(), model_config=self.model_config.to_kwargs(),
                      train_config=self.config.to_json())
        if self.lead:  # first: the CSV always covers the newest checkpoint (a resume truncates it)
            self.history.write()
        self.checkpoints.save(step, self.trainer.host(self.state), record)

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
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); "
                        f"stopped without saving it; the last checkpoint is step {self.checkpoints.latest_step()}"
                    )
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
                        val_bpb = self.evaluate(whole=step == config.steps, progress=progress)
                        self.history.add(step, val_bpb=val_bpb)
                        if progress:
                            bar.write(f"step {step}: validation {val_bpb:.4f} bits/byte")
                    if save_now:
                        self.save(step)
                    clock = time.perf_counter()
            if pending is not None:
                record(pending)
