"""attention_impl="fused" (jax.nn.dot_product_attention) against the default "xla" path, float32 CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import autoregressive, parity
from ct_jax.generation import decode
from tests.configs import CONFIGS, forward, loaded_model, randomize_

# Memory and compressed memory (uneven evictions, Mogrifier, one head, layer subsets), and
# the paper options whose attention differs: sinusoidal positions (u/v biases, static table),
# most_used compression (reads the probabilities: the xla path at full segments).
CASES = {
    "defaults": CONFIGS["defaults"],
    "heads1_subset_mem2x": CONFIGS["heads1_subset_mem2x"],
    "residual_uneven_evictions": CONFIGS["residual_uneven_evictions"],
    "mogrify_odd_seq": CONFIGS["mogrify_odd_seq"],
    "sinusoidal": dict(CONFIGS["wide_emb_heads8"], relative_positions="sinusoidal"),
    "most_used_evicted": dict(CONFIGS["heads1_subset_mem2x"], compression="most_used",
                              reconstruction_target="evicted"),
}


@functools.cache
def _pair(name: str) -> tuple[ct_jax.CompressiveTransformer, ct_jax.CompressiveTransformer]:
    """(xla model, fused model) of one config with the same random weights."""
    state = randomize_(ct_torch_ref.CompressiveTransformer(**CASES[name])).state_dict()
    return loaded_model(CASES[name], state), loaded_model(CASES[name], state, attention_impl="fused")


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_forward_equals_xla(name, mode):
    """Logits, memories and aux loss of 5 segments (the last short), memory threaded, for each mask kind (no
    mask runs as an all-True one, and memory starts empty: two compilations per model serve every kind)."""
    xla, fused = _pair(name)
    for model in (xla, fused):
        getattr(model, mode)()
    for mask_kind in (None, "right", "padded_row"):
        segments, masks = parity.make_inputs(CASES[name], batch=3, n_segments=5, seed=1, mask_kind=mask_kind)
        memories = {impl: ct_jax.Memory.empty(xla, segments[0].shape[0]) for impl in ("xla", "fused")}
        for index, (tokens, mask) in enumerate(zip(segments, masks)):
            tokens = jnp.asarray(tokens.numpy())
            mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask.numpy())
            out = {}
            for impl, model in (("xla", xla), ("fused", fused)):
                out[impl] = forward(model, tokens, memories[impl], mask)
                memories[impl] = out[impl][1]
            (logits_x, mem_x, aux_x), (logits_f, mem_f, aux_f) = out["xla"], out["fused"]
            for what, a, b in (("logits", logits_x, logits_f), ("mem", mem_x.mem, mem_f.mem),
                               ("compressed_mem", mem_x.compressed_mem, mem_f.compressed_mem),
                               ("aux_loss", aux_x, aux_f)):
                diff = _max_diff(a, b)
                assert diff <= parity.FLOAT32_ATOL, f"{name} {mode} {mask_kind} segment {index}: {what} differs " \
                                                    f"by {diff:.2e}"
            assert np.array_equal(mem_x.mem_valid, mem_f.mem_valid)


def test_fused_forward_equals_xla_with_per_row_counts():
    """Rows holding different amounts of memory (one row reset mid-sequence) read different position rows."""
    xla, fused = _pair("heads1_subset_mem2x")
    segments, masks = parity.make_inputs(CASES["heads1_subset_mem2x"], batch=3, n_segments=5, seed=2,
                                         mask_kind="left")
    xla.eval()
    fused.eval()
    memories = {"xla": None, "fused": None}
    for index, (tokens, mask) in enumerate(zip(segments, masks)):
        if index == 2:
            memories = {impl: memory.reset(jnp.array([False, True, False])) for impl, memory in memories.items()}
        logits = {}
        for impl, model in (("xla", xla), ("fused", fused)):
            logits[impl], memories[impl], _ = forward(model, jnp.asarray(tokens.numpy()), memories[impl],
                                                       jnp.asarray(mask.numpy()))
        assert index < 2 or len(set(np.asarray(memories["xla"].total_valid).tolist())) > 1, "counts should differ"
        diff = _max_diff(logits["xla"], logits["fused"])
        assert diff <= parity.FLOAT32_ATOL, f"segment {index}: logits differ by {diff:.2e}"
        diff = _max_diff(memories["xla"].compressed_mem, memories["fused"].compressed_mem)
        assert diff <= parity.FLOAT32_ATOL, f"segment {index}: compressed memory differs by {diff:.2e}"


@pytest.mark.parametrize("name", ["defaults", "sinusoidal"])
def test_fused_gradients_equal_xla(name):
    """Gradients of the summed segment losses (training mode, aux loss included)."""
    xla, fused = _pair(name)
    seq_len = CASES[name]["seq_len"]
    tokens = jax.random.randint(jax.random.key(3), (2, 4 * seq_len + 1), 0, CASES[name]["num_tokens"])
    grads = {}
    for impl, model in (("xla", xla), ("fused", fused)):
        model.train()
        grads[impl] = nnx.jit(autoregressive.sequence_grads)(model, tokens)[3]
    flat_x, flat_f = jax.tree.leaves(grads["xla"]), jax.tree.leaves(grads["fused"])
    for (path, gx), gf in zip(jax.tree_util.tree_leaves_with_path(grads["xla"]), flat_f):
        np.testing.assert_allclose(gf, gx, rtol=parity.GRAD_RTOL, atol=parity.GRAD_ATOL,
                                   err_msg=f"{name}: gradient of {jax.tree_util.keystr(path)}")
    assert len(flat_x) == len(flat_f)


@pytest.mark.parametrize("name", ["heads1_subset_mem2x", "sinusoidal"])
def test_fused_generation_equals_xla(name):
    """Greedy decoding (cached one-token calls, memory and window keys in separate blocks): the same
    tokens and the logits of every draw within the float32 tolerance, over several windows."""
    xla, fused = _pair(name)
    config = CASES[name]
    prime = np.random.default_rng(0).integers(0, config["num_tokens"], (2, config["seq_len"] + 1))
    mask = np.ones(prime.shape, bool)
    mask[1, :2] = False  # a padded prime start
    length = 6 * config["seq_len"]
    xla.eval()
    fused.eval()
    out = {impl: decode(model, prime, length, jax.random.key(0), temperature=0.0, mask=mask,
                        return_logits=True) for impl, model in (("xla", xla), ("fused", fused))}
    diff = _max_diff(out["xla"].logits, out["fused"].logits)
    assert diff <= parity.FLOAT32_ATOL, f"{name}: logits of the draws differ by {diff:.2e}"
    np.testing.assert_array_equal(out["fused"].tokens, out["xla"].tokens)


def test_fused_path_is_taken_where_it_can_be(monkeypatch):
    """jax.nn.dot_product_attention runs in every layer of the fused model (and never in the
    xla one); attention dropout in training falls back to the xla path."""
    calls = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = CASES["defaults"]
    tokens = jnp.zeros((1, config["seq_len"]), jnp.int32)
    for impl, expected in (("xla", 0), ("fused", config["depth"])):
        calls.clear()
        model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0), attention_impl=impl)
        model.eval()
        model(tokens)
        assert len(calls) == expected, f"{impl}: {len(calls)} fused calls, expected {expected}"
    dropout = ct_jax.CompressiveTransformer(**config, attn_dropout=0.1, rngs=nnx.Rngs(0), attention_impl="fused")
    attention = dropout.attn_layers[0].fn
    assert not attention.fuses(), "attention dropout in training must take the xla path"
    dropout.eval()
    assert attention.fuses(), "without dropout (eval) the fused path runs"
    assert not attention.fuses(with_probs=True), "probabilities come from the xla path only"


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize("value, error", [("cudnn", ValueError), (None, TypeError)])
def test_invalid_attention_impl_names_the_argument(value, error):
    with pytest.raises(error, match=r"attention_impl must be one of 'xla', 'fused'.*" + repr(value)):
        ct_jax.CompressiveTransformer(**CASES["defaults"], rngs=nnx.Rngs(0), attention_impl=value)


def test_the_choice_is_not_a_model_config_keyword():
    """config.json / ct_torch_ref see upstream's keywords only."""
    model = ct_jax.CompressiveTransformer(**CASES["defaults"], rngs=nnx.Rngs(0), attention_impl="fused")
    assert "attention_impl" not in model.config.to_kwargs()
