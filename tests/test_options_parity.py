"""The paper options (docs/paper-options.md): ct_jax against ct_torch_ref, value for value.

Every non-default option value on its own and random combinations: logits, memories (usage
included), aux loss over 4 full segments and a short one with padding masks; gradients with
and without memory gradients (and remat); weights both ways through the converter."""

from __future__ import annotations

import functools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import autoregressive, convert
from ct_jax.config_from_weights import config_from_weights
from ct_jax.generation import decode
from ct_jax.parity import make_inputs
from tests.configs import OPTION_VALUES, OPTIONS_BASE, forward, loaded_model, random_config, random_options, randomize_
from tests.tolerances import GENERATION_LOGITS_ATOL, GRAD_ATOL, GRAD_RTOL, JAX_VS_TORCH_ATOL, assert_close

N_SEGMENTS = 5


def model_pair(
    config: dict, seed: int = 1
) -> tuple[ct_torch_ref.CompressiveTransformer, ct_jax.CompressiveTransformer]:
    """ct_torch_ref with random weights (every parameter non-zero) and the same weights in JAX."""
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=seed)
    return torch_model, loaded_model(config, torch_model.state_dict())


def compare_run(torch_model, jax_model, config: dict, *, mask_kind: str, seed: int, label: str) -> None:
    """Runs both over N_SEGMENTS segments (the last short) threading memory; checks every output."""
    segments, masks = make_inputs(config, batch=3, n_segments=N_SEGMENTS, seed=seed, mask_kind=mask_kind)
    torch_memory, jax_memory = None, ct_jax.Memory.empty(jax_model, 3)
    for index, (tokens, mask) in enumerate(zip(segments, masks)):
        with torch.no_grad():
            logits, torch_memory, aux = torch_model(tokens, memories=torch_memory, mask=mask)
        jax_logits, jax_memory, jax_aux = forward(jax_model, jnp.asarray(tokens.numpy()), jax_memory,
                                                  jnp.asarray(mask.numpy()))
        where = f"{label} segment {index}"
        got = convert.memory_to_torch(jax_memory)
        assert_close(f"logits, {where}", jax_logits, logits, JAX_VS_TORCH_ATOL)
        assert_close(f"mem, {where}", got.mem, torch_memory.mem, JAX_VS_TORCH_ATOL)
        assert_close(f"compressed_mem, {where}", got.compressed_mem, torch_memory.compressed_mem, JAX_VS_TORCH_ATOL)
        assert_close(f"aux_loss, {where}", jax_aux, aux.reshape(()), JAX_VS_TORCH_ATOL)
        assert type(got).__name__ == type(torch_memory).__name__, f"memory kind, {where}"
        if config.get("compression") == "most_used":
            assert_close(f"mem_usage, {where}", got.mem_usage, torch_memory.mem_usage, JAX_VS_TORCH_ATOL)


@pytest.mark.parametrize("option,value", OPTION_VALUES, ids=[f"{n}={v}" for n, v in OPTION_VALUES])
def test_each_option_value_matches_reference(option, value):
    """Training mode (aux loss on), right padding: rows padded from the end of the sequence."""
    config = dict(OPTIONS_BASE, **{option: value})
    torch_model, jax_model = model_pair(config)
    torch_model.train()
    jax_model.train()
    compare_run(torch_model, jax_model, config, mask_kind="right", seed=3, label=f"{option}={value}")


# Random configurations (tests.configs) that compress within 4 full segments, with random
# options covering dilated conv, most-used and mean pooling, both targets, both paddings,
# the autoencoder and sinusoidal positions between them.
RANDOM_CASES = [(3, "train", "left"), (8, "train", "right"), (9, "train", "left"), (49, "eval", "right")]


@pytest.mark.parametrize("seed,mode,mask_kind", RANDOM_CASES)
def test_random_configurations_with_random_options_match_reference(seed, mode, mask_kind):
    """The property sweep of test_parity.py with random option combinations on top."""
    config = dict(random_config(seed), **random_options(seed))
    torch_model, jax_model = model_pair(config, seed=seed)
    torch_model.train(mode == "train")
    getattr(jax_model, mode)()
    compare_run(torch_model, jax_model, config, mask_kind=mask_kind, seed=seed, label=f"random {seed} {config} {mode}")


def _torch_grads(torch_model, tokens: torch.Tensor, memory_gradients: bool) -> tuple[float, dict]:
    torch_model.zero_grad()
    wrapper = ct_torch_ref.AutoregressiveWrapper(torch_model, memory_gradients=memory_gradients)
    total = sum(r.loss + r.aux_loss for r in wrapper(tokens, return_loss=True))
    total.backward()
    return float(total.detach()), {k: p.grad for k, p in torch_model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "options,memory_gradients,remat",
    [
        (dict(compression="dilated_conv", aux_loss="autoencoder", relative_positions="sinusoidal"), True, True),
        (dict(compression="most_used", reconstruction_target="evicted", eviction_padding="exact"), True, False),
        (dict(compression="mean_pool", relative_positions="sinusoidal", reconstruction_target="evicted"), False, False),
        (dict(relative_positions="sinusoidal", clamp_len=4, reconstruction_target="evicted"), True, False),
    ],
)
def test_gradients_match_reference(options, memory_gradients, remat):
    """Gradients of the summed segment losses (4 segments), with and without memory gradients."""
    config = dict(OPTIONS_BASE, **options)
    torch_model, jax_model = model_pair(config, seed=4)
    torch_model.train()
    jax_model.train()
    tokens = torch.randint(0, config["num_tokens"], (2, 4 * config["seq_len"] + 1),
                           generator=torch.Generator().manual_seed(0))
    total, torch_grads = _torch_grads(torch_model, tokens, memory_gradients)
    objective, _, _, grads = nnx.jit(functools.partial(
        autoregressive.sequence_grads, memory_gradients=memory_gradients, remat=remat
    ))(jax_model, jnp.asarray(tokens.numpy()))
    assert_close("objective", objective, total, JAX_VS_TORCH_ATOL)
    graded = nnx.eval_shape(lambda: ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0)))  # no init to compile
    nnx.update(graded, grads)
    for key, grad in convert.to_numpy(graded).items():
        expected = torch_grads.get(key)
        expected = np.zeros_like(grad) if expected is None else expected.numpy()
        assert_close(f"grad {key}", grad, expected, GRAD_ATOL, GRAD_RTOL)
    # Memory gradients change the compressor's gradient (it now learns from later LM losses).
    _, other = _torch_grads(torch_model, tokens, not memory_gradients)
    key = "attn_layers.0.fn.fn.compress_mem_fn.conv.weight"
    if key in torch_grads:
        assert not torch.allclose(torch_grads[key], other[key])


@pytest.mark.parametrize(
    "options",
    [
        dict(relative_positions="sinusoidal", compression="most_used", eviction_padding="exact"),
        dict(compression="dilated_conv", reconstruction_target="evicted", aux_loss="autoencoder"),
        dict(relative_positions="sinusoidal", clamp_len=4),
    ],
)
def test_greedy_generation_matches_reference(options):
    """The cached decoder (2 memory layers rolled by enhanced recurrence) over 5 windows."""
    config = dict(OPTIONS_BASE, **options)
    torch_model, jax_model = model_pair(config, seed=2)
    torch_model.eval()
    jax_model.eval()
    prime = np.random.default_rng(0).integers(0, config["num_tokens"], (2, 4))
    length = 5 * config["seq_len"]
    draws = []
    hook = torch_model.register_forward_hook(lambda module, args, out: draws.append(out[0][:, -1].clone()))
    try:
        expected = ct_torch_ref.AutoregressiveWrapper(torch_model).generate(torch.from_numpy(prime), length,
                                                                            temperature=0)
    finally:
        hook.remove()
    expected_logits = torch.stack(draws[-length:], dim=1).numpy()
    top2 = np.sort(expected_logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 2 * GENERATION_LOGITS_ATOL, "near-tie: pick another seed"
    got = decode(jax_model, prime, length, jax.random.key(0), temperature=0, return_logits=True)
    assert_close(f"{options}: logits of every draw", got.logits, expected_logits, GENERATION_LOGITS_ATOL)
    np.testing.assert_array_equal(np.asarray(got.tokens), expected.numpy(), err_msg=str(options))


def test_new_parameters_convert_both_ways_and_sinusoidal_loads_into_larger_memory(tmp_path):
    config = dict(OPTIONS_BASE, compression="dilated_conv", aux_loss="autoencoder", relative_positions="sinusoidal")
    jax_model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(3))
    state = convert.to_torch(jax_model)
    assert {"attn_layers.0.fn.fn.to_pos.weight", "attn_layers.0.fn.fn.pos_bias_u",
            "attn_layers.0.fn.fn.compress_mem_fn.dilated.0.weight",
            "attn_layers.0.fn.fn.decompress_mem_fn.conv.weight"} <= set(state)
    assert "pos_emb" not in state
    torch_model = ct_torch_ref.CompressiveTransformer(**config)
    torch_model.load_state_dict(state, strict=True)
    back = convert.from_torch(torch_model.state_dict(), ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(9)))
    for key, value in convert.to_numpy(back).items():
        np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)
    larger = dict(config, mem_len=12, cmem_len=9)
    convert.from_torch(state, ct_jax.CompressiveTransformer(**larger, rngs=nnx.Rngs(0)))  # strict: no error
    # Checkpoint directories carry the options in config.json, both ways.
    convert.save_pretrained(jax_model, tmp_path / "jax")
    assert ct_torch_ref.load_pretrained(tmp_path / "jax").config == torch_model.config
    ct_torch_ref.save_pretrained(torch_model, tmp_path / "torch")
    assert convert.load_pretrained(tmp_path / "torch").config == jax_model.config


# --- clamp_len: Transformer-XL's clamp of the sinusoidal distances ---------------------------

# Compression from the second segment on (ratio 2, memory = window): the fourth segment's
# queries see 4 compressed + 4 memory + 4 window slots, distances 0..11 (trained_reach).
CLAMPED = dict(num_tokens=24, dim=8, seq_len=4, depth=2, heads=2, mem_len=4, cmem_len=4, cmem_ratio=2,
               relative_positions="sinusoidal")


@pytest.mark.parametrize("clamp_len", [1, 5, 9])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_clamped_positions_match_reference(clamp_len, mode):
    """Logits, memories and aux loss over 5 segments (compressed memory read from the third on)."""
    config = dict(CLAMPED, clamp_len=clamp_len)
    torch_model, jax_model = model_pair(config, seed=5)
    torch_model.train(mode == "train")
    getattr(jax_model, mode)()
    compare_run(torch_model, jax_model, config, mask_kind="left", seed=6, label=f"clamp_len={clamp_len} {mode}")


def _jax_logits(config: dict, segments: list, jax_state: nnx.State) -> list[np.ndarray]:
    """Eval-mode logits of a JAX model of `config` holding `jax_state`, memory threaded over `segments`."""
    model = nnx.eval_shape(lambda: ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0)))  # no init to compile
    nnx.update(model, jax_state)
    model.eval()
    memory, out = ct_jax.Memory.empty(model, segments[0].shape[0]), []
    for tokens in segments:
        logits, memory, _ = forward(model, jnp.asarray(tokens.numpy()), memory)
        out.append(np.asarray(logits))
    return out


def _torch_logits(config: dict, segments: list, state: dict) -> list[np.ndarray]:
    """The same for the reference."""
    model = ct_torch_ref.CompressiveTransformer(**config).eval()
    model.load_state_dict(state)
    memory, out = None, []
    with torch.no_grad():
        for tokens in segments:
            logits, memory, _ = model(tokens, memories=memory)
            out.append(logits.numpy())
    return out


def test_clamp_at_or_beyond_the_largest_distance_is_no_clamp_exactly():
    """clamp_len >= trained_reach changes no bit in either framework; one step less changes the logits,
    only once memory holds keys that far (the first segment's distances are at most seq_len - 1)."""
    torch_model, jax_model = model_pair(CLAMPED, seed=7)
    reach = jax_model.config.trained_reach
    assert reach == CLAMPED["seq_len"] + CLAMPED["mem_len"] + CLAMPED["cmem_len"] - 1
    segments, _ = make_inputs(CLAMPED, batch=2, n_segments=N_SEGMENTS, seed=8)
    state, jax_state = torch_model.state_dict(), nnx.state(jax_model, nnx.Param)
    for logits in (_jax_logits, _torch_logits):
        weights = jax_state if logits is _jax_logits else state
        unclamped = logits(CLAMPED, segments, weights)
        for clamp_len in (reach, reach + 50):
            for index, (got, expected) in enumerate(zip(logits(dict(CLAMPED, clamp_len=clamp_len), segments, weights),
                                                        unclamped)):
                np.testing.assert_array_equal(got, expected, err_msg=f"{logits.__name__} clamp_len={clamp_len} "
                                              f"segment {index}")
        below = logits(dict(CLAMPED, clamp_len=reach - 1), segments, weights)
        np.testing.assert_array_equal(below[0], unclamped[0], err_msg=f"{logits.__name__}: first segment")
        assert not np.allclose(below[3], unclamped[3]), f"{logits.__name__}: clamp_len={reach - 1} changed nothing"


def test_clamped_rows_with_different_memory_match_the_reference_row_by_row():
    """Per-row memory: row 1 is reset before the third segment; each row equals the reference run on it alone."""
    config = dict(CLAMPED, clamp_len=6)
    torch_model, jax_model = model_pair(config, seed=9)
    torch_model.eval()
    jax_model.eval()
    reset_at = 2
    segments, _ = make_inputs(config, batch=2, n_segments=N_SEGMENTS, seed=10)
    memory, torch_memories = ct_jax.Memory.empty(jax_model, 2), [None, None]
    for index, tokens in enumerate(segments):
        if index == reset_at:
            memory = memory.reset(jnp.array([False, True]))
            torch_memories[1] = None
        logits, memory, _ = forward(jax_model, jnp.asarray(tokens.numpy()), memory, None)
        assert index <= reset_at or len(set(np.asarray(memory.total_valid).tolist())) > 1, "counts should differ"
        for row in (0, 1):
            with torch.no_grad():
                expected, torch_memories[row], _ = torch_model(tokens[row : row + 1], memories=torch_memories[row])
            assert_close(f"row {row} logits, segment {index}", logits[row : row + 1], expected, JAX_VS_TORCH_ATOL)


@pytest.mark.parametrize("seed", [5, 12, 31])
def test_random_configurations_with_clamp_len_match_reference(seed):
    """The property sweep: random configurations and options, sinusoidal positions clamped at a random
    distance within the reach, training mode."""
    config = dict(random_config(seed), **dict(random_options(seed), relative_positions="sinusoidal"))
    reach = ct_jax.ModelConfig(**config).trained_reach
    config["clamp_len"] = random.Random(seed).randint(1, reach)
    torch_model, jax_model = model_pair(config, seed=seed)
    torch_model.train()
    jax_model.train()
    compare_run(torch_model, jax_model, config, mask_kind="right", seed=seed, label=f"random {seed} {config}")


def test_clamp_len_converts_both_ways_in_config_json(tmp_path):
    """clamp_len travels in config.json (written only when set) and is accepted by config_from_weights."""
    config = dict(CLAMPED, clamp_len=6)
    jax_model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(3))
    convert.save_pretrained(jax_model, tmp_path / "jax")
    assert json.loads((tmp_path / "jax" / convert.CONFIG_FILE).read_text())["clamp_len"] == 6
    torch_model = ct_torch_ref.load_pretrained(tmp_path / "jax")
    assert torch_model.config["clamp_len"] == 6
    ct_torch_ref.save_pretrained(torch_model, tmp_path / "torch")
    assert convert.load_pretrained(tmp_path / "torch").config == jax_model.config
    state = convert.read_state_dict(tmp_path / "torch" / convert.WEIGHTS_FILE)
    assert config_from_weights(state, dict(seq_len=4, mem_len=4, cmem_len=4, clamp_len=6)) == jax_model.config
    unset = ct_jax.CompressiveTransformer(**CLAMPED, rngs=nnx.Rngs(3))
    convert.save_pretrained(unset, tmp_path / "unset")
    assert "clamp_len" not in json.loads((tmp_path / "unset" / convert.CONFIG_FILE).read_text())
    assert "clamp_len" not in ct_torch_ref.CompressiveTransformer(**CLAMPED).config
