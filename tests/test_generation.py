"""ct_jax.generation: compiled cached sampling against ct_torch_ref's generate and a full recompute."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert, generation
from ct_jax.autoregressive import generate
from ct_jax.commands import generate as generate_command
from ct_jax.generation import decode
from tests.configs import CONFIGS, TRANSFORMER_XL, loaded_model, random_config, randomize_
from tests.tolerances import GENERATION_LOGITS_ATOL, JAX_VS_TORCH_ATOL, assert_close

# Three configurations: 2 memory layers of 3 (enhanced recurrence: 2 roll variants), one
# head, memory 2x seq_len; 3 variants, 8 heads, emb_dim > dim; no enhanced recurrence (1
# variant), a memory-layer subset, emb_dim < dim. Each with a weight seed whose greedy run
# has no near-tie (see MIN_TOP2_GAP). The first also serves the other tests.
PARITY_CONFIGS = {"heads1_subset_mem2x": 1, "wide_emb_heads8": 2, "small_emb_no_recurrence": 1, "transformer_xl": 1}
MODELS = {**CONFIGS, "transformer_xl": TRANSFORMER_XL}  # CONFIGS and a Transformer-XL with a full-size memory
MAIN = "heads1_subset_mem2x"
# Greedy decoding of tests.configs.randomize_ weights falls into repeating one token; weight
# matrices scaled by 3 give varied text (5-20 distinct tokens per row), which tests more.
WEIGHT_GAIN = 3.0
WINDOWS = 10  # generated seq_len windows: memory and compressed memory fill several times
BATCH = 2
# With every logit within the tolerance, the argmax agrees wherever the reference's top two
# logits are more than twice as far apart; closer is a near-tie, a bad seed.
MIN_TOP2_GAP = 2 * GENERATION_LOGITS_ATOL


def _random_weights(torch_model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """tests.configs.randomize_, then weight matrices times WEIGHT_GAIN."""
    randomize_(torch_model, seed=seed)
    with torch.no_grad():
        for key, param in torch_model.named_parameters():
            if param.ndim >= 2 and key != "pos_emb":
                param.mul_(WEIGHT_GAIN)
    return torch_model


@functools.cache
def _models(name: str) -> tuple[torch.nn.Module, ct_jax.CompressiveTransformer]:
    """ct_torch_ref model with random weights (pos_emb too, see WEIGHT_GAIN), eval mode, and its JAX copy."""
    torch_model = _random_weights(ct_torch_ref.CompressiveTransformer(**MODELS[name]), PARITY_CONFIGS[name]).eval()
    jax_model = loaded_model(MODELS[name], torch_model.state_dict())
    jax_model.eval()  # the mode is part of the graph: one mode, one compilation per test session
    return torch_model, jax_model


def _prime(name: str, kind: str, batch: int = BATCH) -> np.ndarray:
    seq_len = MODELS[name]["seq_len"]
    length = {"shorter": seq_len - 1, "equal": seq_len, "longer": 2 * seq_len + 3}[kind]
    return np.random.default_rng(length).integers(0, MODELS[name]["num_tokens"], (batch, length))


def _length(name: str) -> int:
    return WINDOWS * MODELS[name]["seq_len"]


def reference_generate(torch_model, prime, length, mask=None, eos_token=None):
    """ct_torch_ref's greedy generate: (tokens, logits of each draw (b, n, v), cmem lengths per call)."""
    calls = []
    hook = torch_model.register_forward_hook(
        lambda module, args, out: calls.append((out[0][:, -1].clone(), out[1].compressed_mem.shape[2]))
    )
    kwargs = {} if mask is None else {"mask": torch.from_numpy(np.asarray(mask))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only spin (10x slower on a busy machine)
    try:
        tokens = ct_torch_ref.AutoregressiveWrapper(torch_model).generate(
            torch.tensor(np.asarray(prime), dtype=torch.long), length, temperature=0, eos_token=eos_token, **kwargs)
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    n = tokens.shape[-1]
    logits = torch.stack([logit for logit, _ in calls[len(calls) - n:]], dim=1)
    return tokens.numpy(), logits.numpy(), [cmem for _, cmem in calls]


def assert_greedy_parity(label, got, expected_tokens, expected_logits, atol=GENERATION_LOGITS_ATOL):
    """Tokens identical and every step's logits within tolerance; near-ties are a bad seed."""
    top2 = np.sort(expected_logits, axis=-1)[..., -2:]
    gap = float((top2[..., 1] - top2[..., 0]).min())
    assert gap > MIN_TOP2_GAP, f"{label}: reference top-2 logit gap {gap:.2e} is a near-tie; pick another seed"
    assert_close(f"{label}: logits of every draw", got.logits, expected_logits, atol)
    tokens = np.asarray(got.tokens)
    differ = np.argwhere(tokens != expected_tokens)
    assert differ.size == 0, f"{label}: {len(differ)} tokens differ, first at (row, step) {tuple(differ[0])}"


@pytest.mark.parametrize("prime_kind", ["shorter", "equal", "longer"])
@pytest.mark.parametrize("name", PARITY_CONFIGS)
def test_greedy_matches_ct_torch_ref(name, prime_kind):
    torch_model, jax_model = _models(name)
    config = jax_model.config
    prime, length = _prime(name, prime_kind), _length(name)
    expected, expected_logits, cmem_lengths = reference_generate(torch_model, prime, length)
    got = decode(jax_model, prime, length, jax.random.key(0), temperature=0, return_logits=True)
    assert got.tokens.shape == (BATCH, length)
    assert_greedy_parity(f"{name}/{prime_kind} prime", got, expected, expected_logits)
    full_cmem_calls = sum(n == config.cmem_len for n in cmem_lengths)
    assert full_cmem_calls >= 3 * config.seq_len, f"compressed memory full in only {full_cmem_calls} calls"


@pytest.mark.parametrize("padding", ["left", "right"])
def test_greedy_matches_ct_torch_ref_with_padded_prime(padding):
    """A padded prime token attends to its whole window (not causal): the first call must
    see the same window as the reference's, and full windows store those states in memory."""
    name = MAIN
    torch_model, jax_model = _models(name)
    for kind in ("shorter", "longer"):
        prime, length = _prime(name, kind), _length(name)
        positions = np.arange(prime.shape[1])
        kept = np.array([prime.shape[1], 2])  # row 1 keeps 2 real tokens
        mask = positions < kept[:, None] if padding == "right" else positions >= (prime.shape[1] - kept)[:, None]
        expected, expected_logits, _ = reference_generate(torch_model, prime, length, mask)
        got = decode(jax_model, prime, length, jax.random.key(0), temperature=0, mask=mask, return_logits=True)
        assert_greedy_parity(f"{name}/{kind} prime, {padding}-padded", got, expected, expected_logits)


def test_logits_equal_a_full_recompute():
    """The cached logits equal the model's forward on each whole window (the reference's way,
    in JAX): enhanced recurrence with 2 memory layers and a right-padded prime."""
    name = MAIN
    _, model = _models(name)
    seq_len = model.config.seq_len
    prime = _prime(name, "longer")
    mask = np.ones(prime.shape, bool)
    mask[1, -3:] = False
    length = _length(name)  # the parity tests' compilation
    got = decode(model, prime, length, jax.random.key(0), temperature=0, mask=mask, return_logits=True)

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args)[:2])
    n_full = (prime.shape[1] - 1) // seq_len
    memory = ct_jax.Memory.empty(model, BATCH)
    for start in range(0, n_full * seq_len, seq_len):
        _, memory = forward(state, prime[:, start:start + seq_len], memory, mask[:, start:start + seq_len])
    window, window_mask = prime[:, n_full * seq_len:], mask[:, n_full * seq_len:]
    tokens = np.asarray(got.tokens)
    for step in range(length):
        logits, memory = forward(state, window, memory, window_mask)
        assert_close(f"logits of draw {step} (window of {window.shape[1]})", got.logits[:, step], logits[:, -1],
                     JAX_VS_TORCH_ATOL)
        restart = window.shape[1] == seq_len
        window = tokens[:, step:step + 1] if restart else np.concatenate([window, tokens[:, step:step + 1]], 1)
        window_mask = np.ones(window.shape, bool) if restart else np.pad(window_mask, ((0, 0), (0, 1)),
                                                                         constant_values=True)


def test_short_calls_roll_the_memory_so_the_cache_keeps_every_roll():
    """Why the cache holds every memory roll: ct_torch_ref's call on a short window returns its
    memory rolled by one memory layer (enhanced recurrence), and the next call's logits move
    by far more than the tolerance with it, so the parity tests above would catch a cache
    kept under one memory assignment."""
    torch_model, jax_model = _models(MAIN)
    seq_len = jax_model.config.seq_len
    assert generation._n_variants(jax_model.config) == len(jax_model.config.memory_layers) == 2
    tokens = torch.tensor(_prime(MAIN, "longer"), dtype=torch.long)
    with torch.no_grad():
        memory = None
        for start in (0, seq_len):
            _, memory, _ = torch_model(tokens[:, start:start + seq_len], memories=memory)
        window = tokens[:, 2 * seq_len:]
        _, rolled, _ = torch_model(window[:, :1], memories=memory)
        assert torch.equal(rolled.mem, torch.roll(memory.mem, -1, 0)), "a short call returns the rolled memory"
        as_reference = torch_model(window[:, :2], memories=rolled)[0][:, -1]
        unrolled = torch_model(window[:, :2], memories=memory)[0][:, -1]
    diff = float((as_reference - unrolled).abs().max())
    assert diff > 100 * GENERATION_LOGITS_ATOL, f"the roll moved the logits by only {diff:.2e}"


def test_one_compiled_loop_reused_across_primes_and_settings():
    name = MAIN
    _, model = _models(name)
    length = _length(name)
    prime = _prime(name, "longer")
    jaxpr = jax.make_jaxpr(lambda p, key: generate(model, p, length, key, temperature=0.0))(prime, jax.random.key(0))
    eqns = jaxpr.jaxpr.eqns
    inner = [e for e in eqns if e.primitive.name in ("pjit", "jit") and e.params["name"] == "_decode"]
    assert len(inner) == 1, f"expected one compiled sampling call, got {[e.primitive.name for e in eqns]}"
    assert not any(e.primitive.name == "while" for e in eqns)
    loops = [e for e in inner[0].params["jaxpr"].jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1, f"expected one lax.while_loop over the tokens, got {len(loops)}"

    settings = (("shorter", 0.0), ("equal", 0.7), ("longer", 1.3))
    decode(model, _prime(name, settings[0][0]), length, jax.random.key(3), settings[0][1], return_logits=True)
    before = generation._decode_jit_cpu._cache_size()  # after the first compile: the test holds alone too
    for kind, temperature in settings[1:]:
        decode(model, _prime(name, kind), length, jax.random.key(3), temperature, return_logits=True)
    assert generation._decode_jit_cpu._cache_size() == before, "prime lengths and temperatures must not recompile"


def test_sampling_draws_from_the_filtered_logits():
    name = MAIN
    _, model = _models(name)
    prime, length = _prime(name, "longer"), _length(name)
    first = decode(model, prime, length, jax.random.key(7), temperature=1.0, return_logits=True)
    again = decode(model, prime, length, jax.random.key(7), temperature=1.0, return_logits=True)
    other = decode(model, prime, length, jax.random.key(8), temperature=1.0, return_logits=True)
    np.testing.assert_array_equal(first.tokens, again.tokens, err_msg="same key, different samples")
    assert (np.asarray(first.tokens) != np.asarray(other.tokens)).any(), "another key gave the same sample"
    logits, tokens = np.asarray(first.logits), np.asarray(first.tokens)
    k = max(1, int((1 - 0.9) * model.config.num_tokens))  # top_k with filter_thres 0.9
    kth = np.sort(logits, axis=-1)[..., -k]
    drawn = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    assert (drawn >= kth).all(), "a token outside the top k was drawn"
    assert (tokens != np.argmax(logits, -1)).any(), "temperature 1 drew only argmax tokens"
    greedy = decode(model, prime, length, jax.random.key(7), temperature=0.0, return_logits=True)
    np.testing.assert_array_equal(greedy.tokens, np.argmax(np.asarray(greedy.logits), -1))


def test_eos_pads_rows_and_stops_when_every_row_has_ended():
    """Each row ends at its first eos (then eos padding); the loop stops once all have."""
    name = MAIN
    torch_model, model = _models(name)
    prime, length = _prime(name, "longer"), _length(name)
    free = np.asarray(decode(model, prime, length, jax.random.key(0), temperature=0, return_logits=True).tokens)
    # The token that every row emits soonest, at different steps in the two rows if possible.
    firsts = {t: [int(np.argmax(row == t)) for row in free] for t in np.intersect1d(free[0], free[1])}
    assert firsts, "the rows share no token; pick another seed"
    eos = int(min(firsts, key=lambda t: (firsts[t][0] == firsts[t][1], max(firsts[t]))))
    got = decode(model, prime, length, jax.random.key(0), temperature=0, eos_token=eos, return_logits=True)
    tokens, lengths = np.asarray(got.tokens), np.asarray(got.lengths)
    np.testing.assert_array_equal(lengths, np.array(firsts[eos]) + 1)
    # The reference stops only when every row draws eos at once; up to its eos each row agrees.
    expected, _, _ = reference_generate(torch_model, prime, length, eos_token=eos)
    for row in range(BATCH):
        np.testing.assert_array_equal(tokens[row, :lengths[row]], expected[row, :lengths[row]])
        assert (tokens[row, lengths[row]:] == eos).all(), f"row {row} is not padded with eos after its end"
    stop = lengths.max()
    assert stop < length
    assert not np.asarray(got.logits)[:, stop:].any(), "the loop ran on after every row had ended"


def test_one_dimensional_prime_gives_one_dimensional_results():
    """Shapes only (no compilation); values of a 1-D prime: test_script_streams_the_greedy_sample."""
    _, model = _models(MAIN)
    prime, key, length = np.arange(5), jax.random.key(0), 7
    assert jax.eval_shape(lambda p: generate(model, p, length, key), prime).shape == (length,)
    tokens, lengths = jax.eval_shape(lambda p: generate(model, p, length, key, eos_token=1), prime)
    assert (tokens.shape, lengths.shape) == ((length,), ())
    batched = jax.eval_shape(lambda p: decode(model, p, length, key, return_logits=True), prime[None])
    assert (batched.tokens.shape, batched.lengths.shape) == ((1, length), (1,))
    assert batched.logits.shape == (1, length, model.config.num_tokens)


@pytest.mark.parametrize("vocab", [4, 40])
def test_filters_match_ct_torch_ref_and_keep_a_token(vocab):
    logits = np.random.default_rng(vocab).normal(size=(3, vocab)).astype(np.float32) * 3
    for thres in (0.0, 0.5, 0.9, 1.0):
        for name in ("top_k", "top_p"):
            got = np.asarray(generation.FILTERS[name](jnp.asarray(logits), thres))
            expected = getattr(ct_torch_ref, name)(torch.from_numpy(logits), thres=thres).numpy()
            np.testing.assert_array_equal(got, expected, err_msg=f"{name} thres={thres} vocab={vocab}")
            assert np.isfinite(got).sum(axis=-1).min() >= 1, f"{name} kept no token"
    kept = np.isfinite(np.asarray(jax.jit(generation.top_k)(jnp.asarray(logits)))).sum(-1)
    # "the top 10%" as upstream computes it: int((1 - 0.9) * 40) is 3, not 4
    assert (kept == max(1, int((1 - 0.9) * vocab))).all(), f"top_k kept {kept} of {vocab}"


def test_invalid_arguments_name_the_argument():
    _, model = _models(MAIN)
    prime, key = np.zeros((2, 3), np.int32), jax.random.key(0)
    cases = [
        (dict(prime=np.zeros((2, 0), np.int32)), "prime"),
        (dict(prime=np.zeros((2, 3), np.float32)), "prime"),
        (dict(prime=np.full((2, 3), 999)), "prime token ids"),
        (dict(length=-1), "length"),
        (dict(temperature=-0.5), "temperature"),
        (dict(filter_logits_fn="top_z"), "filter_logits_fn"),
        (dict(filter_thres=1.5), "filter_thres"),
        (dict(eos_token=10_000), "eos_token"),
        (dict(mask=np.ones((2, 4), bool)), "mask"),
    ]
    for overrides, name in cases:
        kwargs = dict(prime=prime, length=4, rng=key) | overrides
        with pytest.raises(ValueError, match=name):
            generate(model, **kwargs)
    assert generate(model, prime, 0, key).shape == (2, 0)


def test_script_streams_the_greedy_sample(tmp_path, capsysbinary):
    """The generate command (scripts/generate.py's `main`, in this process) on a byte-level checkpoint saved
    by ct_jax, against ct_torch_ref's greedy generate on the same directory (so both frameworks read it)."""
    config = dict(num_tokens=256, dim=16, seq_len=8, depth=1, heads=2, mem_len=8, cmem_ratio=4)
    torch_model = _random_weights(ct_torch_ref.CompressiveTransformer(**config), seed=3)
    jax_model = loaded_model(config, torch_model.state_dict())
    convert.save_pretrained(jax_model, tmp_path / "ckpt")
    prime, length = "Compressive memory", 40
    expected, expected_logits, _ = reference_generate(
        ct_torch_ref.load_pretrained(tmp_path / "ckpt"), np.frombuffer(prime.encode(), np.uint8), length)
    top2 = np.sort(expected_logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > MIN_TOP2_GAP, "near-tie in the reference; pick another seed"
    status = generate_command.main(["--checkpoint", str(tmp_path / "ckpt"), "--prime", prime, "--length",
                                    str(length), "--temperature", "0", "--top-k", "5"])
    result = capsysbinary.readouterr()
    assert status == 0, result.err.decode()
    assert result.out == bytes(expected.astype(np.uint8).tolist()) + b"\n", (result.out, expected)
    assert f"{length} tokens" in result.err.decode()


@pytest.mark.parametrize("seed", [3, 9])
def test_greedy_generation_matches_reference_on_random_configs(seed):
    """Property-style: random valid configs (tests.configs.random_config; seed 3 rolls three
    memory layers by enhanced recurrence, seed 9 has its only memory layer above layer 1),
    unit-scale random weights, a prime of random length, three windows and more."""
    config = random_config(seed)
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=seed).eval()
    jax_model = loaded_model(config, torch_model.state_dict())
    jax_model.eval()
    rng = np.random.default_rng(seed)
    prime = rng.integers(0, config["num_tokens"], (2, int(rng.integers(1, 3 * config["seq_len"] + 2))))
    length = 3 * config["seq_len"] + int(rng.integers(1, 5))
    expected, expected_logits, _ = reference_generate(torch_model, prime, length)
    got = decode(jax_model, prime, length, jax.random.key(0), temperature=0, return_logits=True)
    assert_greedy_parity(f"random config {seed}", got, expected, expected_logits)
