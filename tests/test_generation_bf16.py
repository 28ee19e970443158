"""bfloat16 decoding (`generate(..., dtype=jnp.bfloat16)`) against float32 decoding of the same weights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax.generation import decode, generate, with_dtype
from ct_jax.parity import BF16_DECODE_LOGITS_ATOL, BF16_DECODE_SCALE_RTOL
from tests.configs import CONFIGS, loaded_model, randomize_

NAMES = ("heads1_subset_mem2x", "wide_emb_heads8", "mogrify_odd_seq")
WINDOWS = 10


@functools.cache
def _model(name: str) -> ct_jax.CompressiveTransformer:
    """A float32 model of `name` with tests.configs.randomize_ weights, in eval mode."""
    model = loaded_model(CONFIGS[name], randomize_(ct_torch_ref.CompressiveTransformer(**CONFIGS[name])).state_dict())
    model.eval()
    return model


def _prime(name: str) -> np.ndarray:
    config = CONFIGS[name]
    return np.random.default_rng(1).integers(0, config["num_tokens"], (2, 2 * config["seq_len"] + 3))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_decoding_tracks_float32(name):
    """Greedy: every draw's logits within the stated bound until the samples part, and the first
    window of tokens the same."""
    model, seq_len = _model(name), CONFIGS[name]["seq_len"]
    length = WINDOWS * seq_len
    runs = {str(dtype): decode(model, _prime(name), length, jax.random.key(0), temperature=0.0, return_logits=True,
                               dtype=dtype) for dtype in (None, jnp.bfloat16)}
    f32, bf16 = runs["None"], runs[str(jnp.bfloat16)]
    assert f32.logits.dtype == jnp.float32 and bf16.logits.dtype == jnp.float32
    same = np.all(np.asarray(f32.tokens) == np.asarray(bf16.tokens), axis=0)
    parted = length if same.all() else int(np.argmin(same))
    assert parted >= seq_len, f"{name}: bf16 and float32 samples part at token {parted} < seq_len {seq_len}"
    reference = np.asarray(f32.logits[:, : parted + 1])
    diff = float(np.max(np.abs(np.asarray(bf16.logits[:, : parted + 1]) - reference)))
    bound = max(BF16_DECODE_LOGITS_ATOL, BF16_DECODE_SCALE_RTOL * float(np.max(np.abs(reference))))
    assert diff <= bound, f"{name}: bf16 logits differ by {diff:.3f} > {bound:.3f} over {parted + 1} draws"
    assert diff > 0, "bf16 decoding should round differently from float32 (was the cast applied?)"


def test_float32_stays_the_default_and_exact():
    """dtype=None and dtype=float32 decode the model itself, with identical results (the first test's
    float32 loop: the same shapes and options)."""
    model = _model(NAMES[0])
    assert with_dtype(model, jnp.float32) is model
    args = (_prime(NAMES[0]), WINDOWS * CONFIGS[NAMES[0]]["seq_len"], jax.random.key(2))
    default, float32 = (decode(model, *args, temperature=0.0, return_logits=True, dtype=dtype)
                        for dtype in (None, jnp.float32))
    for got, expected in zip(float32, default):
        np.testing.assert_array_equal(got, expected)


def test_with_dtype_casts_every_weight_and_keeps_the_model():
    model = _model(NAMES[0])
    cast = with_dtype(model, jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(cast, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, f"weights in {dtypes}"
    assert cast.dtype == jnp.bfloat16 and cast.config == model.config
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize("dtype, error", [(jnp.int32, ValueError), ("nope", TypeError)])
def test_invalid_dtype_names_the_argument(dtype, error):
    with pytest.raises(error, match="dtype must be a floating dtype"):
        generate(_model(NAMES[0]), [1, 2], 2, jax.random.key(0), dtype=dtype)
