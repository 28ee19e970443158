"""Forward parity: ct_jax against the upstream package and ct_torch_ref, every segment and position."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert
from ct_jax.parity import MASK_KINDS, make_inputs, run_both
from tests.configs import CONFIGS, float64, forward, loaded_model, random_config, randomize_
from tests.tolerances import JAX_VS_TORCH_ATOL, JAX_VS_TORCH_F64_ATOL, assert_close

upstream = pytest.importorskip("compressive_transformer_pytorch")

N_SEGMENTS = 5


@functools.cache
def _models(name: str) -> tuple[torch.nn.Module, ct_jax.CompressiveTransformer]:
    """Upstream model with random weights (pos_emb too) and the same weights in JAX."""
    torch_model = randomize_(upstream.CompressiveTransformer(**CONFIGS[name]), seed=1)
    return torch_model, loaded_model(CONFIGS[name], torch_model.state_dict())


def compare_segments(torch_model, jax_model, segments, masks, *, call, label="", none_mask_as_ones=True):
    """Runs both models over the segments, threading memory, and checks every output."""
    def jax_call(tokens, memories, mask):
        # mask=None runs as an all-True mask in JAX: the same function, half the compilations
        # (the None path itself is compared in test_eager_matches_upstream).
        if mask is None and none_mask_as_ones:
            mask = jnp.ones(tokens.shape, bool)
        return call(tokens, memories, mask)

    empty = ct_jax.Memory.empty(jax_model, segments[0].shape[0])
    for index, outputs in enumerate(run_both(torch_model, jax_call, segments, masks, memories=empty)):
        where = f"{label} segment {index}"
        for name in ("logits", "mem", "compressed_mem", "aux_loss"):
            assert_close(f"{name}, {where}", *outputs[name], JAX_VS_TORCH_ATOL)
        jax_aux = outputs["aux_loss"][0]
        assert jax_aux.shape == (), f"aux_loss must be a scalar, got shape {jax_aux.shape}"


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_upstream(name, mask_kind, mode):
    torch_model, jax_model = _models(name)
    torch_model.train(mode == "train")
    getattr(jax_model, mode)()
    segments, masks = make_inputs(CONFIGS[name], batch=3, n_segments=N_SEGMENTS, seed=7, mask_kind=mask_kind)
    compare_segments(torch_model, jax_model, segments, masks, call=lambda *args: forward(jax_model, *args),
                     label=f"{name}/{mask_kind}/{mode}")


@pytest.mark.parametrize("name", ["residual_uneven_evictions"])
def test_eager_matches_upstream(name):
    """Eager (un-jitted) calls give the reference's values too, starting from `memories=None`."""
    torch_model, jax_model = _models(name)
    torch_model.train()
    jax_model.train()
    segments, masks = make_inputs(CONFIGS[name], batch=2, n_segments=N_SEGMENTS, seed=3, mask_kind=None)
    calls = []

    def eager(tokens, memories, mask):
        calls.append(tokens.shape)
        return jax_model(tokens, None if len(calls) == 1 else memories, mask)

    compare_segments(torch_model, jax_model, segments, masks, call=eager, label=f"{name}/eager",
                     none_mask_as_ones=False)


@pytest.mark.parametrize("name", ["defaults", "top_layer_only_mogrify", "wide_emb_heads8"])
def test_weights_made_in_jax_match_ct_torch_ref(name):
    """Parity in the other direction: JAX-initialised weights exported to ct_torch_ref."""
    config = CONFIGS[name]
    jax_model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(5))
    jax_model.pos_emb.set_value(0.5 * jax.random.normal(jax.random.key(1), jax_model.pos_emb.shape))
    torch_model = ct_torch_ref.CompressiveTransformer(**config)
    torch_model.load_state_dict(convert.to_torch(jax_model), strict=True)
    torch_model.train()
    jax_model.train()
    # batch 3 as test_forward_matches_upstream: its compiled forwards serve this test
    segments, masks = make_inputs(config, batch=3, n_segments=N_SEGMENTS, seed=11, mask_kind="left")
    compare_segments(torch_model, jax_model, segments, masks, call=lambda *args: forward(jax_model, *args),
                     label=f"{name}/from-jax")


@pytest.mark.parametrize("name", ["mogrify_odd_seq", "residual_uneven_evictions", "top_layer_only_mogrify"])
def test_float64_semantics_are_exact(name):
    """In float64 both frameworks agree to ~1e-12: any gap in float32 is rounding, not semantics."""
    with float64():
        config = CONFIGS[name]
        torch_model = randomize_(upstream.CompressiveTransformer(**config), seed=2).double().train()
        jax_model = loaded_model(config, torch_model.state_dict(), dtype=jnp.float64, param_dtype=jnp.float64)
        segments, masks = make_inputs(config, batch=2, n_segments=N_SEGMENTS, seed=5, mask_kind="right")
        memory = None
        jax_memory = None
        for tokens, mask in zip(segments, masks):
            with torch.no_grad():
                logits, memory, aux = torch_model(tokens, memories=memory, mask=mask)
            jax_logits, jax_memory, jax_aux = forward(jax_model, jnp.asarray(tokens.numpy()), jax_memory,
                                                      jnp.asarray(mask.numpy()))
            assert_close(f"{name} float64 logits", jax_logits, logits, JAX_VS_TORCH_F64_ATOL)
            assert_close(f"{name} float64 aux", jax_aux, aux.reshape(()), JAX_VS_TORCH_F64_ATOL)


def test_memory_round_trip_switches_framework_mid_run():
    """A run can move between frameworks between two segments and continue with the same logits."""
    name = "heads1_subset_mem2x"
    torch_model, jax_model = _models(name)
    torch_model.eval()
    jax_model.eval()
    segments, _ = make_inputs(CONFIGS[name], batch=2, n_segments=N_SEGMENTS, seed=4)
    jax_memory = None
    for tokens in segments[:3]:
        _, jax_memory, _ = forward(jax_model, jnp.asarray(tokens.numpy()), jax_memory, None)
    torch_memory = convert.memory_to_torch(jax_memory)
    with torch.no_grad():
        logits, torch_memory, _ = torch_model(segments[3], memories=torch_memory)
    back = convert.memory_from_torch(torch_memory, jax_model)
    jax_logits, _, _ = forward(jax_model, jnp.asarray(segments[4].numpy()), back, None)
    with torch.no_grad():
        expected, _, _ = torch_model(segments[4], memories=torch_memory)
    assert_close("logits after torch -> jax memory hand-over", jax_logits, expected, JAX_VS_TORCH_ATOL)


@pytest.mark.parametrize("seed", range(8))
def test_random_configurations_match_reference(seed):
    """Property sweep over the whole valid space (tests.configs.random_config): ct_jax equals
    ct_torch_ref, which equals upstream wherever upstream runs (upstream's Conv1d crashes on
    evictions shorter than cmem_ratio; ct_torch_ref compresses nothing there, as ct_jax does)."""
    config = random_config(seed)
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=seed)
    jax_model = loaded_model(config, torch_model.state_dict())
    for mode in ("train", "eval"):
        torch_model.train(mode == "train")
        getattr(jax_model, mode)()
        segments, masks = make_inputs(config, batch=3, n_segments=6, seed=seed, mask_kind="right")
        compare_segments(torch_model, jax_model, segments, masks, call=lambda *args: forward(jax_model, *args),
                         label=f"random config {seed} {config}/{mode}")
