"""ct_jax.training: configuration, optimizer, the compiled train/eval steps (one device)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ct_jax import training
from ct_jax.autoregressive import StreamBatch, grads
from ct_jax.training import FAST_CPU_COMPILE, Schedule, TrainConfig, Trainer
from tests.configs import TRAIN_CONFIG, TRAIN_MODEL, make_trainer, train_batch
from tests.tolerances import ACCUMULATED_GRAD_RTOL


@pytest.fixture(scope="module")
def trainer() -> Trainer:
    return make_trainer()


def test_defaults_are_upstreams_example_optimizer():
    config = TrainConfig()
    assert (config.learning_rate, config.grad_clip_norm, config.schedule) == (1e-4, 0.5, Schedule.CONSTANT)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 10.0)}  # global norm 20, clipped to 0.5
    optimizer = training.make_optimizer(config)
    updates, state = optimizer.update(grads, optimizer.init(params), params)
    adam_state = state[1][0]
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * 0.25, rtol=1e-6, err_msg="Adam saw unclipped gradients")
    np.testing.assert_allclose(updates["w"], -1e-4, rtol=1e-4, err_msg="first Adam step is -lr * sign(g)")


def test_schedules_warm_up_then_hold_or_decay():
    constant = training.learning_rate_schedule(TrainConfig(learning_rate=1e-3, warmup_steps=10, steps=100))
    assert [float(constant(s)) for s in (0, 5, 10, 99)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    cosine = training.learning_rate_schedule(
        TrainConfig(learning_rate=1e-3, warmup_steps=10, steps=100, schedule="cosine", final_lr_ratio=0.1))
    assert [float(cosine(s)) for s in (0, 10, 55, 100)] == pytest.approx([0.0, 1e-3, 5.5e-4, 1e-4], rel=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be a positive int, got 0"),
    (dict(micro_batches=3, batch_size=16), r"batch_size \(16\) must be divisible by micro_batches \(3\)"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number >= 0, got nan"),
    (dict(dtype="int8"), "dtype must be one of .*, got 'int8'"),
    (dict(parallel="tpu"), "'tpu' is not a valid Parallel"),
    (dict(schedule="linear"), "'linear' is not a valid Schedule"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_trainer_rejects_a_model_of_another_dtype():
    model = training.create_model(TRAIN_MODEL, TRAIN_CONFIG)
    with pytest.raises(ValueError, match="model computes in float32, but config.dtype is 'bfloat16'"):
        Trainer(model, TrainConfig(dtype="bfloat16"))


def test_train_step_updates_the_state_and_reports_metrics(trainer):
    state = trainer.place(trainer.init_state())
    tokens = train_batch(0)
    val_bpb = trainer.evaluate(state, iter([tokens]))
    before = trainer.host(state)
    new_state, device_metrics = trainer.train_step(state, tokens)
    metrics = trainer.metrics(device_metrics)

    assert set(metrics) == {"loss", "lm", "aux", "bpb", "grad_norm", "learning_rate"}
    assert metrics["bpb"] == pytest.approx(metrics["lm"] / math.log(2), rel=1e-6)
    assert metrics["loss"] == pytest.approx(metrics["lm"] + metrics["aux"], rel=1e-5), \
        "loss must be per token: the objective (summed over segments) over n_segments"
    assert metrics["lm"] == pytest.approx(math.log(TRAIN_MODEL["num_tokens"]), abs=0.5), "a fresh model is near uniform"
    assert metrics["aux"] > 0, "the second segment compresses, so the aux loss is positive"
    assert metrics["grad_norm"] > 0 and metrics["learning_rate"] == pytest.approx(TRAIN_CONFIG.learning_rate)
    # Eval mode (no dropout here, no aux) sees the same LM loss as the train step did.
    assert val_bpb == pytest.approx(metrics["bpb"], abs=1e-5)
    assert jax.tree.leaves(state.params)[0].is_deleted(), "the train step must donate the state's buffers"

    after = trainer.host(new_state)
    assert int(after.step) == 1 and not np.array_equal(after.rng, before.rng)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params))]
    assert all(changed), f"{changed.count(False)} parameter arrays did not change"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(after.params))


def test_loss_falls_on_a_repeated_batch(trainer):
    state = trainer.place(trainer.init_state())
    tokens = train_batch(1)
    losses = []
    for _ in range(25):
        state, device_metrics = trainer.train_step(state, tokens)
        losses.append(trainer.metrics(device_metrics)["lm"])
    assert losses[-1] < losses[0] - 1.0, f"lm loss {losses[0]:.3f} -> {losses[-1]:.3f}: did not overfit one batch"
    assert trainer._train._cache_size() == 1, "the train step recompiled between steps"


def test_a_non_finite_step_leaves_the_state_unchanged(trainer):
    host = trainer.init_state()
    poisoned = host._replace(params=jax.tree.map(lambda x: x, host.params))  # new Variables, same arrays
    embedding = poisoned.params["token_emb"]["embedding"]
    embedding.set_value(np.full_like(embedding.get_value(), np.inf))
    state, device_metrics = trainer.train_step(trainer.place(poisoned), train_batch(2))
    metrics = trainer.metrics(device_metrics)
    assert not math.isfinite(metrics["loss"])
    after = trainer.host(state)
    assert int(after.step) == 0, "a non-finite step must not count"
    for got, expected in zip(jax.tree.leaves(after), jax.tree.leaves(poisoned)):
        np.testing.assert_array_equal(got, expected, err_msg="a non-finite step changed the state")


def test_bfloat16_compute_with_remat_keeps_float32_parameters():
    config = TrainConfig(**{**TRAIN_CONFIG.to_json(), "dtype": "bfloat16", "remat": True})
    bf16 = make_trainer(config)
    assert bf16.model.dtype == jnp.bfloat16
    f32_trainer = make_trainer()
    tokens = train_batch(3)
    _, f32_metrics = f32_trainer.train_step(f32_trainer.place(f32_trainer.init_state()), tokens)
    state = bf16.place(bf16.init_state())
    losses = []
    for _ in range(10):
        state, device_metrics = bf16.train_step(state, tokens)
        losses.append(bf16.metrics(device_metrics))
    host = bf16.host(state)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(host.params)), "parameters must stay float32"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(host.opt_state) if leaf.dtype.kind == "f")
    f32_lm = f32_trainer.metrics(f32_metrics)["lm"]
    # Same weights, bf16 compute: the loss (computed in float32) agrees to bf16 precision.
    assert losses[0]["lm"] == pytest.approx(f32_lm, rel=0.02), f"bf16 lm {losses[0]['lm']} vs float32 {f32_lm}"
    assert all(math.isfinite(m["loss"]) for m in losses)
    assert losses[-1]["lm"] < losses[0]["lm"] - 0.5, "bf16 training should overfit one batch too"



def _max_diff_per_tensor(got, expected) -> list[tuple[str, float, float]]:
    """(path, max |got - expected|, max |expected|) for each leaf of two pytrees of the same structure."""
    rows = []
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rows.append((jax.tree_util.keystr(path), float(np.max(np.abs(a - b))), float(np.max(np.abs(a)))))
    return rows


@pytest.fixture(scope="module")
def full_and_micro_gradients():
    """`grads` of one batch of windows as 1 and as 2 micro-batches (the function the train step calls)."""
    graphdef, state = nnx.split(training.create_model(TRAIN_MODEL, TRAIN_CONFIG))

    def window_grads(state, tokens, micro_batches):
        batch = StreamBatch.from_windows(tokens, TRAIN_MODEL["seq_len"])
        return grads(nnx.merge(graphdef, state), batch, micro_batches=micro_batches)[:4]

    tokens = train_batch(4)
    return [jax.jit(window_grads, static_argnums=2)(state, tokens, m) for m in (1, 2)]


def test_micro_batches_accumulate_the_full_batch_gradient(full_and_micro_gradients):
    """Gradient accumulation over 2 micro-batches: the gradient of the whole batch at once."""
    full, micro = full_and_micro_gradients
    (full_loss, full_lm, full_aux, full_grads), (micro_loss, micro_lm, micro_aux, micro_grads) = full, micro
    for name, got, expected in (("objective", micro_loss, full_loss), ("lm", micro_lm, full_lm),
                                ("aux", micro_aux, full_aux)):
        np.testing.assert_allclose(got, expected, rtol=1e-6, err_msg=f"2 micro-batches: {name} differs")
    # Only the summation order differs, so each tensor agrees to rounding relative to its own scale.
    for path, diff, scale in _max_diff_per_tensor(micro_grads, full_grads):
        assert scale > 0, f"{path}: zero gradient, the comparison would be empty"
        assert diff <= ACCUMULATED_GRAD_RTOL * scale, (
            f"2 micro-batches: gradient of {path} differs by {diff:.3e} (> {ACCUMULATED_GRAD_RTOL:g} x its "
            f"largest |gradient| {scale:.3e})")


def test_micro_batches_give_the_full_batch_update(full_and_micro_gradients):
    """The train step with micro-batches makes the full batch's update (SGD: linear in the gradient)."""
    config = dataclasses.replace(TRAIN_CONFIG, optimizer="sgd", grad_clip_norm=0.0)
    results = []
    for micro_batches in (1, 2):
        each = make_trainer(dataclasses.replace(config, micro_batches=micro_batches))
        state, device_metrics = each.train_step(each.place(each.init_state()), train_batch(4))
        results.append((each.metrics(device_metrics), each.host(state).params))
    (full_metrics, full_params), (micro_metrics, micro_params) = results
    for name in ("loss", "lm", "aux", "grad_norm"):
        assert micro_metrics[name] == pytest.approx(full_metrics[name], rel=1e-5), name
    # params - lr * g: the gradients' difference scaled by lr, plus rounding each side of the stored
    # sum (half a unit in the last place each, and fl(lr * g)'s own rounding: 2 ulps in all).
    full_grads = full_and_micro_gradients[0][3]
    for (path, diff, _), grad, param in zip(_max_diff_per_tensor(micro_params, full_params),
                                            jax.tree.leaves(full_grads), jax.tree.leaves(full_params)):
        allowed = (config.learning_rate * ACCUMULATED_GRAD_RTOL * float(np.max(np.abs(grad)))
                   + 2 * float(np.max(np.spacing(np.abs(np.asarray(param))))))
        assert diff <= allowed, f"2 micro-batches: {path} after one SGD step differs by {diff:.3e} (> {allowed:.3e})"


def test_compiled_steps_are_shared_only_by_models_with_the_same_non_parameter_state(trainer):
    """The cached steps hold the model's non-parameter state as constants: equal state shares them."""
    assert make_trainer()._train is trainer._train, "an equal model must reuse the compiled steps"
    dropout = dict(TRAIN_MODEL, attn_dropout=0.1)  # the dropout layer holds an RNG stream (non-parameter state)
    first = Trainer(training.create_model(dropout, TRAIN_CONFIG), TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE)
    reseeded = dataclasses.replace(TRAIN_CONFIG, seed=1)
    second = Trainer(training.create_model(dropout, reseeded), reseeded, compiler_options=FAST_CPU_COMPILE)
    assert first._train is not second._train, "a model with other non-parameter state got another model's step"
    again = Trainer(training.create_model(dropout, TRAIN_CONFIG), TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE)
    assert again._train is first._train and again._eval is first._eval


def test_a_step_cache_is_explicit_and_bounded(trainer):
    """Trainers share `SHARED_STEPS` unless given their own cache (or None: their own compile)."""
    model = training.create_model(TRAIN_MODEL, TRAIN_CONFIG)
    alone = Trainer(model, TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE, step_cache=None)
    assert alone._train is not trainer._train, "step_cache=None must not share the process's steps"
    cache = training.StepCache(size=1)
    first = Trainer(model, TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE, step_cache=cache)
    assert Trainer(model, TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE, step_cache=cache)._train is first._train
    other = dataclasses.replace(TRAIN_CONFIG, learning_rate=0.5)
    Trainer(model, other, compiler_options=FAST_CPU_COMPILE, step_cache=cache)  # evicts the first (size 1)
    again = Trainer(model, TRAIN_CONFIG, compiler_options=FAST_CPU_COMPILE, step_cache=cache)
    assert again._train is not first._train, "a cache of size 1 must have dropped the older steps"
    assert first._train is not trainer._train, "a private cache must not hand out the shared steps"
