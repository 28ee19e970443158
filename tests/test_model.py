"""ct_jax model behaviour beyond parity: input errors, memory invariants, finiteness, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify

import ct_jax
from tests.configs import CONFIGS, forward
from tests.tolerances import assert_close, bf16_atol

CONFIG = CONFIGS["heads1_subset_mem2x"]  # 2 memory layers, seq 4, mem 8, cmem 4, ratio 2, 24 tokens


@pytest.fixture(scope="module")
def model():
    return ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0))


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(memory_layers=[]), ValueError, r"memory_layers must name at least one layer"),
        (dict(memory_layers=[1, 1]), ValueError, r"memory_layers must not repeat a layer, got \[1, 1\]"),
        (dict(memory_layers=[0]), ValueError, r"memory_layers entries must be ints in 1..3"),
        (dict(dim=15, heads=2), ValueError, r"dim \(15\) must be divisible by heads"),
        (dict(heads=0), ValueError, r"heads must be a positive int, got 0"),
        (dict(seq_len=-1), ValueError, r"seq_len must be a positive int"),
        (dict(mem_len=3), ValueError, r"mem_len must be at least seq_len \(4\), got 3"),
        (dict(cmem_len=1), ValueError,
         r"cmem_len must be at least mem_len // cmem_ratio \(4\), or 0 for no compressed memory, got 1"),
        (dict(attn_dropout=1.5), ValueError, r"attn_dropout must be a finite number in \[0, 1\]"),
        (dict(bogus=1), TypeError, r"unknown model arguments \['bogus'\]"),
    ],
)
def test_invalid_constructor_arguments_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        ct_jax.CompressiveTransformer(**{**CONFIG, **kwargs}, rngs=nnx.Rngs(0))


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
def test_invalid_inputs_raise_before_anything_runs(model):
    good = jnp.zeros((2, 4), jnp.int32)
    cases = [
        (jnp.array([[1, 2, 24, 3]]), {}, ValueError,
         r"token ids must lie in \[0, num_tokens=24\), got values in \[1, 24\]"),
        (jnp.array([[-1, 2]]), {}, ValueError, r"got values in \[-1, 2\]"),
        (jnp.zeros((2, 4)), {}, TypeError, r"tokens must be integer token ids, got dtype float32"),
        (jnp.zeros((2, 5), jnp.int32), {}, ValueError, r"segment of length 5; expected 1..seq_len=4"),
        (jnp.zeros((4,), jnp.int32), {}, ValueError, r"tokens must have shape \(batch, t\)"),
        (good, dict(mask=jnp.ones((2, 3), bool)), ValueError,
         r"mask must have the tokens' shape \(2, 4\), got \(2, 3\)"),
        (good, dict(mask=jnp.ones((2, 4))), TypeError, r"mask must be boolean"),
        (good, dict(memories=ct_jax.Memory.empty(model, 3)), ValueError,
         r"memories.mem has shape \(2, 3, 8, 16\), expected \(2, 2, 8, 16\)"),
        (good, dict(memories=(1, 2)), TypeError, r"memories must be a ct_jax.Memory"),
    ]
    for tokens, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model(tokens, **kwargs)


def test_checked_mode_reports_bad_tokens_under_jit(model):
    graphdef, state = nnx.split(model)

    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)[0]

    checked = jax.jit(checkify.checkify(logits, errors=checkify.user_checks))
    error, _ = checked(state, jnp.array([[1, 2, 99, 3]]))
    with pytest.raises(checkify.JaxRuntimeError, match=r"token ids must lie in \[0, num_tokens=24\)"):
        error.throw()
    error, _ = checked(state, jnp.array([[1, 2, 3, 3]]))
    assert error.get() is None


def test_memory_fills_then_compresses_with_the_invariant(model):
    """Valid counts grow as the reference's memory does; cmem is non-empty only once mem is full."""
    memories = ct_jax.Memory.empty(model, 2)
    counts = []
    for step in range(6):
        tokens = jax.random.randint(jax.random.key(step), (2, 4), 0, 24)
        _, memories, _ = forward(model, tokens, memories, None)
        assert memories.mem_valid.shape == memories.compressed_mem_valid.shape == (2,), "counts are per row"
        assert len(set(np.asarray(memories.total_valid).tolist())) == 1, "equal rows must hold equal memory"
        counts.append((int(memories.mem_valid[0]), int(memories.compressed_mem_valid[0])))
        mem_slots = np.asarray(memories.mem)
        invalid = mem_slots[:, :, : 8 - counts[-1][0]]
        assert not invalid.any(), "invalid memory slots must stay zero"
    assert counts == [(4, 0), (8, 0), (8, 2), (8, 4), (8, 4), (8, 4)]


@pytest.mark.parametrize("name", ["defaults", "mogrify_odd_seq", "residual_uneven_evictions"])
def test_no_nan_from_valid_but_awkward_input(name):
    """Fully padded rows, all-padding segments, empty memory and long runs stay finite."""
    config = CONFIGS[name]
    net = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(1))
    net.train()
    memories = ct_jax.Memory.empty(net, 3)
    for step in range(12):  # compressed memory full for many segments
        tokens = jax.random.randint(jax.random.key(step), (3, config["seq_len"]), 0, config["num_tokens"])
        mask = jnp.ones_like(tokens, bool).at[1].set(False)  # row 1 fully padded
        if step == 5:
            mask = jnp.zeros_like(mask)  # a whole segment of padding
        logits, memories, aux = forward(net, tokens, memories, mask)
        assert bool(jnp.all(jnp.isfinite(logits))), f"non-finite logits at segment {step}"
        assert bool(jnp.isfinite(aux)), f"non-finite aux loss at segment {step}"
        assert bool(jnp.all(jnp.isfinite(memories.compressed_mem)))


def test_bfloat16_compute_tracks_float32(model):
    """bf16 compute with float32 parameters stays within the stated bf16 bound, and finite."""
    net16 = nnx.eval_shape(lambda: ct_jax.CompressiveTransformer(**CONFIG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    nnx.update(net16, nnx.state(model, nnx.Param))
    memories32 = ct_jax.Memory.empty(model, 2)
    memories16 = ct_jax.Memory.empty(net16, 2, jnp.bfloat16)
    for step in range(5):
        tokens = jax.random.randint(jax.random.key(10 + step), (2, 4), 0, 24)
        logits32, memories32, _ = forward(model, tokens, memories32)
        logits16, memories16, aux16 = forward(net16, tokens, memories16)
        assert logits16.dtype == jnp.float32, "logits are returned in float32 for the loss"
        assert memories16.mem.dtype == jnp.bfloat16
        assert bool(jnp.isfinite(aux16))
        assert_close(f"bf16 logits, segment {step}", logits16, logits32, bf16_atol(logits32))


def test_eval_mode_has_no_aux_loss_and_train_mode_does(model):
    memories = ct_jax.Memory.empty(model, 2)
    aux = {}
    for mode in ("train", "eval"):
        getattr(model, mode)()
        current = memories
        for step in range(3):
            tokens = jax.random.randint(jax.random.key(step), (2, 4), 0, 24)
            _, current, aux[mode] = forward(model, tokens, current, None)
    model.train()
    assert float(aux["train"]) > 0 and float(aux["eval"]) == 0.0


def test_dropout_needs_and_uses_rngs():
    net = ct_jax.CompressiveTransformer(**{**CONFIG, "ff_dropout": 0.5}, rngs=nnx.Rngs(0))
    tokens = jnp.ones((2, 4), jnp.int32)
    first, _, _ = net(tokens, rngs=nnx.Rngs(dropout=1))
    again, _, _ = net(tokens, rngs=nnx.Rngs(dropout=1))
    other, _, _ = net(tokens, rngs=nnx.Rngs(dropout=2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    net.eval()
    np.testing.assert_array_equal(net(tokens)[0], net(tokens)[0])
