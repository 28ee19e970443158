"""Batched generation with prompts of different lengths: each row equals generating it alone.

Rows sit at different places in their windows, hold different amounts of memory and read
different roll variants (enhanced recurrence); the batch lines their windows up
(`ct_jax.generation`). Greedy decoding of every row must give the tokens, lengths and logits
of that row decoded alone: its prompt repeated over a batch of the same size, a plain decode
(which tests/test_generation.py checks against ct_torch_ref). The same shapes round the same,
and one compiled loop per batch size serves every row (the decode loop's compile is these
tests' cost).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ct_jax
import ct_torch_ref
from ct_jax.generation import decode, generate
from tests.configs import CONFIGS, float64, loaded_model, random_config, randomize_
from tests.tolerances import GENERATION_LOGITS_ATOL, JAX_VS_TORCH_F64_ATOL, assert_close

# 2 roll variants, memory 2x seq_len; 3 variants, 8 heads; cmem_len 0; uneven evictions, plain residuals;
# no enhanced recurrence, memory-layer subset; Mogrifier, odd seq_len.
BATCHED_CONFIGS = ["heads1_subset_mem2x", "wide_emb_heads8", "cmem_zero_glu", "residual_uneven_evictions",
                   "small_emb_no_recurrence", "mogrify_odd_seq"]
WEIGHT_GAIN = 3.0  # as tests/test_generation.py: varied greedy text rather than one repeated token
WINDOWS = 5  # generated windows: memory and compressed memory fill and evict
# Compared in float64: in float32 this config's five Mogrifier gates at WEIGHT_GAIN amplify rounding to up to 0.85
# (|logits| up to 224) against float64, in the ragged and the plain loop alike; two programs that round differently
# then part by ~1e-2. In float64 rounding cannot hide a row that computes something else than its prompt alone.
FLOAT64_CONFIGS = {"mogrify_odd_seq"}


def _with_weights(config: dict, dtype: jnp.dtype = jnp.float32) -> ct_jax.CompressiveTransformer:
    """A JAX model of `config` with ct_torch_ref's random weights (pos_emb too) times WEIGHT_GAIN, in eval mode."""
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=1)
    state = {key: value * WEIGHT_GAIN if value.ndim >= 2 and key != "pos_emb" else value
             for key, value in torch_model.state_dict().items()}
    if dtype == jnp.float64:
        state = {key: value.double() for key, value in state.items()}
    model = loaded_model(config, state, dtype=dtype, param_dtype=dtype)
    model.eval()
    return model


@functools.cache
def _model(name: str, dtype: jnp.dtype = jnp.float32) -> ct_jax.CompressiveTransformer:
    return _with_weights(CONFIGS[name], dtype)


def _lengths(seq_len: int) -> list[int]:
    """Prompt lengths around the window edges: 1, inside the first window, one and several full
    windows, and past them (memory, and with enough windows compressed memory, in play)."""
    return sorted({1, max(1, seq_len - 1), seq_len, seq_len + 1, 2 * seq_len + 3, 3 * seq_len})


def _prompts(config: dict, lengths: list[int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config["num_tokens"], n) for n in lengths]


def _padded(prompts: list[np.ndarray], padding: str, fill: int = -1) -> np.ndarray:
    """The prompts as one (b, max length) array padded with `fill` on the `padding` side."""
    width = max(len(p) for p in prompts)
    out = np.full((len(prompts), width), fill, np.int64)
    for row, prompt in enumerate(prompts):
        if padding == "left":
            out[row, width - len(prompt):] = prompt
        else:
            out[row, : len(prompt)] = prompt
    return out


def assert_rows_alone(label: str, model, prompts: list[np.ndarray], got, length: int, masks=None,
                      atol: float = GENERATION_LOGITS_ATOL, **kwargs) -> None:
    """Every row of the batched result `got` (or of each result in a dict of them, keyed by what they are)
    has the tokens, lengths and logits of its prompt decoded alone, as a plain (not ragged) batch of copies
    of itself: the same shapes round the same (a batch's size changes float32 rounding, which some configs
    here amplify to 1e-2 within the logits of a lone row)."""
    results = got if isinstance(got, dict) else {"": got}
    batch = len(prompts)
    for row, prompt in enumerate(prompts):
        mask = None if masks is None else np.repeat(masks[row][None], batch, axis=0)
        alone = decode(model, np.repeat(prompt[None], batch, axis=0), length, jax.random.key(0), temperature=0,
                       return_logits=True, mask=mask, **kwargs)
        drawn = int(alone.lengths[0])  # after its eos a row's logits are the batch's business
        for kind, result in results.items():
            where = f"{label}{kind}, row {row} (prompt of {len(prompt)})"
            assert_close(f"{where}: logits of every draw", result.logits[row, :drawn], alone.logits[0, :drawn], atol)
            tokens, expected = np.asarray(result.tokens[row]), np.asarray(alone.tokens[0])
            differ = np.flatnonzero(tokens != expected)
            assert differ.size == 0, f"{where}: {differ.size} tokens differ from decoding it alone, first at " \
                                     f"{differ[0]}"
            assert int(result.lengths[row]) == drawn, f"{where}: length {result.lengths[row]}, alone {drawn}"


@pytest.mark.parametrize("name", BATCHED_CONFIGS)
def test_each_row_of_a_ragged_batch_equals_decoding_it_alone(name):
    """Right- and left-padded: one compiled ragged loop serves both."""
    config = CONFIGS[name]
    in_float64 = name in FLOAT64_CONFIGS
    with float64(in_float64):
        model = _model(name, jnp.float64 if in_float64 else jnp.float32)
        prompts = _prompts(config, _lengths(config["seq_len"]), seed=len(name))
        length = WINDOWS * config["seq_len"] + 1
        got = {f" {padding}-padded": decode(model, _padded(prompts, padding), length, jax.random.key(0),
                                            temperature=0, return_logits=True,
                                            prompt_lengths=[len(p) for p in prompts], padding=padding)
               for padding in ("right", "left")}
        assert_rows_alone(name, model, prompts, got, length,
                          atol=JAX_VS_TORCH_F64_ATOL if in_float64 else GENERATION_LOGITS_ATOL)


@pytest.mark.parametrize("seed", [3, 5, 9, 12])
def test_ragged_batches_on_random_configs(seed):
    """Random valid configs (seq_len 1, ratios above seq_len, cmem_len 0, ...), random lengths, a list of prompts."""
    config = random_config(seed)
    model = _with_weights(config)
    rng = np.random.default_rng(seed)
    lengths = [1, *rng.integers(1, 4 * config["seq_len"] + 2, 4).tolist()]
    prompts = _prompts(config, lengths, seed)
    length = 4 * config["seq_len"] + int(rng.integers(1, 4))
    got = decode(model, [p.tolist() for p in prompts], length, jax.random.key(0), temperature=0, return_logits=True)
    assert_rows_alone(f"random config {seed}, lengths {lengths}", model, prompts, got, length)


def test_eos_ends_each_row_where_it_would_alone():
    """The shapes of the first test's batch: its compiled loops serve this one (eos_token is traced)."""
    name = "heads1_subset_mem2x"
    config = CONFIGS[name]
    model = _model(name)
    prompts = _prompts(config, _lengths(config["seq_len"]), seed=4)
    length = WINDOWS * config["seq_len"] + 1
    free = decode(model, prompts, length, jax.random.key(0), temperature=0, return_logits=True)  # got's loop
    eos = int(np.asarray(free.tokens)[1, 3])  # ends row 1 at its 4th token at the latest
    got = decode(model, prompts, length, jax.random.key(0), temperature=0, eos_token=eos, return_logits=True)
    assert int(got.lengths[1]) <= 4
    assert_rows_alone(f"{name} with eos {eos}", model, prompts, got, length, eos_token=eos)
    tokens, lengths = np.asarray(got.tokens), np.asarray(got.lengths)
    for row in range(len(prompts)):
        assert (tokens[row, lengths[row]:] == eos).all(), f"row {row} is not padded with eos after its end"


def test_a_prime_mask_applies_to_each_row_as_alone():
    """Masked prime tokens (the last one of a row included) in a ragged batch, as each row with its mask alone.
    The shapes of the first test's batch: its compiled loops serve this one (a mask is an input)."""
    name = "wide_emb_heads8"
    config = CONFIGS[name]
    model = _model(name)
    prompts = _prompts(config, _lengths(config["seq_len"]), seed=7)
    masks = [np.random.default_rng(row).random(len(p)) < 0.6 for row, p in enumerate(prompts)]
    masks[3][-1] = masks[4][-1] = False
    length = WINDOWS * config["seq_len"] + 1
    got = decode(model, _padded(prompts, "right", fill=0), length, jax.random.key(0), temperature=0,
                 mask=_padded(masks, "right", fill=0).astype(bool), prompt_lengths=[len(p) for p in prompts],
                 return_logits=True)
    assert_rows_alone(f"{name} with a prime mask", model, prompts, got, length, masks=masks)


def test_prompt_lists_lengths_and_sides_agree():
    """A list of prompts, lengths with right or left padding: one result; equal lengths are a plain prime."""
    config = CONFIGS["defaults"]
    model = _model("defaults")
    prompts = _prompts(config, [5, 1, 9], seed=2)
    key, length = jax.random.key(3), 9
    listed = generate(model, prompts, length, key, temperature=0.7)
    for padding in ("right", "left"):
        padded = generate(model, _padded(prompts, padding), length, key, temperature=0.7,
                          prompt_lengths=np.array([5, 1, 9]), padding=padding)
        np.testing.assert_array_equal(padded, listed, err_msg=f"{padding}-padded prompts differ from the list")
    same = _prompts(config, [6, 6], seed=3)
    plain = generate(model, np.stack(same), length, key, temperature=0.7)
    np.testing.assert_array_equal(generate(model, same, length, key, temperature=0.7), plain)
    padded = np.concatenate([np.full((2, 3), -1), np.stack(same)], axis=1)
    np.testing.assert_array_equal(generate(model, padded, length, key, temperature=0.7, prompt_lengths=[6, 6],
                                           padding="left"), plain)


def test_invalid_ragged_arguments_name_the_argument():
    model = _model("defaults")
    prime, key = np.zeros((2, 3), np.int32), jax.random.key(0)
    cases = [
        (dict(prompt_lengths=[1, 2, 3]), "prompt_lengths"),
        (dict(prompt_lengths=[0, 2]), "prompt_lengths"),
        (dict(prompt_lengths=[1, 4]), "prompt_lengths"),
        (dict(prompt_lengths=[1.0, 2.0]), "prompt_lengths"),
        (dict(prompt_lengths=[1, 2], padding="middle"), "padding"),
        (dict(prime=[[1, 2], []]), "prime"),
        (dict(prime=[[1, 2], [1]], prompt_lengths=[2, 1]), "prompt_lengths"),
        (dict(prime=np.zeros(3, np.int32), prompt_lengths=[3]), "prompt_lengths"),
    ]
    for overrides, name in cases:
        kwargs = dict(prime=prime, length=4, rng=key) | overrides
        with pytest.raises(ValueError, match=name):
            generate(model, **kwargs)
