"""The training footprint: parameter counts equal the model's, activations near a compiled step's
temporaries, and configurations that cannot fit refused with the estimate and what to shrink."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ct_jax
from ct_jax import presets
from ct_jax.autoregressive import sequence_grads
from ct_jax.footprint import MODEL_KEYWORDS, DoesNotFitError, available_memory, check_fits, count_parameters, estimate

SMALL = dict(num_tokens=256, dim=32, depth=2, seq_len=16, heads=4)
PARAMETER_CONFIGS = [
    {},
    dict(mem_len=24, cmem_len=10, cmem_ratio=3),
    dict(relative_positions="sinusoidal", gru_gated_residual=False, emb_dim=16, ff_glu=True),
    dict(mogrify_gru=True, compression="dilated_conv", cmem_ratio=4, aux_loss="autoencoder"),
    dict(compression="mean_pool", num_tokens=1000, depth=3),
    dict(compression="most_used", cmem_ratio=2),
]


def _model_parameters(model: nnx.Module) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("config", PARAMETER_CONFIGS, ids=str)
def test_parameter_count_is_the_models(config):
    kwargs = {**SMALL, **config}
    model = ct_jax.CompressiveTransformer(**kwargs, rngs=nnx.Rngs(0))
    counted = count_parameters(**kwargs)
    assert counted == _model_parameters(model), f"counted {counted}, the model has {_model_parameters(model)}"


def test_activations_near_the_compiled_step():
    """Within a factor of 2 of XLA's temporaries (memory_analysis on CPU) of one tiny train step's gradients."""
    kwargs = dict(num_tokens=256, dim=32, depth=2, seq_len=64, mem_len=64, cmem_len=16, heads=4)
    batch, n_segments = 4, 2
    model = ct_jax.CompressiveTransformer(**kwargs, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grads(params, tokens):
        return sequence_grads(nnx.merge(graphdef, params, rest), tokens)

    tokens = jnp.zeros((batch, n_segments * kwargs["seq_len"] + 1), jnp.int32)
    analysis = jax.jit(grads).lower(params, tokens).compile().memory_analysis()
    assert analysis is not None and analysis.temp_size_in_bytes > 0, "jax exposes no memory analysis on this backend"
    estimated = estimate(**kwargs, batch_size=batch, n_segments=n_segments).activation_bytes
    ratio = estimated / analysis.temp_size_in_bytes
    assert 0.5 <= ratio <= 2.0, f"estimated {estimated} B of activations, XLA's temporaries are " \
                                f"{analysis.temp_size_in_bytes} B (ratio {ratio:.2f})"


def test_activations_scale_with_the_settings():
    base = estimate(**SMALL, batch_size=8, n_segments=4)
    assert estimate(**SMALL, batch_size=8, n_segments=4, micro_batches=2).activation_bytes * 2 == base.activation_bytes
    through_memory = estimate(**SMALL, batch_size=8, n_segments=4, memory_gradients=True)
    assert through_memory.activation_bytes == 4 * base.activation_bytes, "memory_gradients keeps every segment"
    fewer_memory_layers = estimate(**SMALL, batch_size=8, n_segments=4, memory_layers=[2])
    assert fewer_memory_layers.activation_bytes < base.activation_bytes
    assert base.optimizer_bytes == 2 * base.parameter_bytes
    assert base.gradient_bytes == 2 * base.parameter_bytes, "segments accumulate into a running sum"
    vocabulary = dict(SMALL, num_tokens=267_735)
    full = estimate(**vocabulary, batch_size=8)
    adaptive = estimate(**vocabulary, batch_size=8, adaptive_cutoffs=[20_000, 40_000, 200_000], adaptive_div_val=4)
    assert adaptive.logit_bytes < 0.75 * full.logit_bytes and adaptive.parameters < full.parameters / 2
    with pytest.raises(ValueError, match="adaptive_cutoffs must be increasing"):
        estimate(**vocabulary, batch_size=8, adaptive_cutoffs=[40_000, 20_000])
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be divisible by micro_batches \(3\)"):
        estimate(**SMALL, batch_size=8, micro_batches=3)


def _preset_footprint(name: str):
    model, train = presets.get(name)["model"], presets.get(name)["train"]
    kwargs = ct_jax.ModelConfig.from_kwargs(model).to_kwargs()
    used = {key: value for key, value in kwargs.items() if key in MODEL_KEYWORDS}
    return estimate(**used, batch_size=train["batch_size"], n_segments=2)


def test_full_pg19_is_refused_with_the_estimate_and_what_to_shrink():
    footprint = _preset_footprint("pg19")
    with pytest.raises(DoesNotFitError) as error:
        check_fits(footprint, 80 * 2**30, where="a test GPU")
    message = str(error.value)
    assert "GiB free on a test GPU" in message and f"parameters {footprint.parameters:,}" in message, message
    assert message.index("num_tokens or adaptive_cutoffs") < message.index("dim/depth"), "largest part first"
    for part in ("optimizer state", "activations per step", "batch_size (or raise micro_batches)", "seq_len"):
        assert part in message, f"{part!r} missing from: {message}"


@pytest.mark.parametrize("name", ["pg19", "wikitext103"])
def test_full_presets_do_not_fit_this_machine(name):
    with pytest.raises(DoesNotFitError, match="free on host RAM"):
        check_fits(_preset_footprint(name))


def test_small_configuration_fits():
    check_fits(estimate(**SMALL, batch_size=8))
    available, where = available_memory()
    assert available > 0 and "host RAM" in where  # the tests run on CPU
