"""Losses and gradients over segments: ct_jax.autoregressive against ct_torch_ref's AutoregressiveWrapper.

Torch accumulates one `(loss + aux_loss).backward()` per yielded segment; JAX differentiates
`sum(lm + aux)` of one scanned call. Both start from the same random weights (pos_emb too),
in training mode with dropout 0. One jitted gradient per configuration, shared by its tests.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert
from ct_jax.autoregressive import StreamBatch, grads, sequence_grads
from ct_jax.parity import make_inputs
from ct_jax.training import FAST_CPU_COMPILE
from tests.configs import CONFIGS, random_config, randomize_
from tests.tolerances import GRAD_ATOL, GRAD_RTOL, JAX_VS_TORCH_ATOL, assert_close

BATCH = 4
N_SEGMENTS = 3


def window_grads(model, tokens, mask=None, *, micro_batches=1, **options):
    """`grads` of windows from empty memory: (objective, lm_losses, aux_losses, grads)."""
    batch = StreamBatch.from_windows(tokens, model.config.seq_len, mask)
    return grads(model, batch, micro_batches=micro_batches, **options)[:4]

# (config, mask kind, short last segment, ignore_index): every mask kind, memory_layers
# subsets ([2, 3] and [1, 3] of 3), the Mogrifier, uneven evictions, emb_dim < dim, no
# enhanced recurrence. ignore_index 0 on "defaults": the random tokens that are 0 are
# ignored targets (and test_ignored_targets_do_not_count reuses its compiled gradient).
CASES = [
    ("heads1_subset_mem2x", "right", False, -100),
    ("mogrify_odd_seq", None, False, -100),
    ("small_emb_no_recurrence", "left", False, -100),
    ("defaults", "padded_row", True, 0),
]


def _tokens_and_mask(config, mask_kind, short_last, seed=3):
    """(b, total + 1) int64 tokens and a (b, total) mask or None; segments as tests/configs.py's."""
    # N_SEGMENTS full segments, then make_inputs' short one (dropped for a full last segment).
    segments, masks = make_inputs(config, batch=BATCH, n_segments=N_SEGMENTS + 1, seed=seed, mask_kind=mask_kind)
    if not short_last:
        segments, masks = segments[:-1], masks[:-1]
    last = torch.randint(0, config["num_tokens"], (BATCH, 1), generator=torch.Generator().manual_seed(seed))
    tokens = torch.cat([*segments, last], dim=1)
    mask = None if mask_kind is None else torch.cat(masks, dim=1)
    return tokens, mask


def _torch_losses_and_grads(wrapper, tokens, mask, **kwargs):
    """Per-segment (lm, aux) as the wrapper yields them, and the accumulated gradients."""
    wrapper.zero_grad(set_to_none=True)
    lm, aux = [], []
    for loss, aux_loss, _ in wrapper(tokens, return_loss=True, mask=mask, **kwargs):
        (loss + aux_loss).backward()
        lm.append(loss.detach().item())
        aux.append(float(aux_loss.detach()))
    grads = {
        name: (param.grad if param.grad is not None else torch.zeros_like(param)).numpy().copy()
        for name, param in wrapper.net.named_parameters()
    }
    return np.asarray(lm), np.asarray(aux), grads


def _as_torch_keys(grads: nnx.State, model: ct_jax.CompressiveTransformer) -> dict[str, np.ndarray]:
    """JAX gradients renamed and transposed to upstream's state_dict layout."""
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return convert.to_numpy(holder)


def _abstract_model(config) -> ct_jax.CompressiveTransformer:
    """A model of shapes only (no random init: each init op would compile), to load weights into."""
    return nnx.eval_shape(lambda: ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0)))


@functools.cache
def _setup(name: str, ignore_index: int = -100):
    """Torch wrapper with random weights, the same model in JAX, and one jitted gradient."""
    config = CONFIGS[name]
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=5).train()
    wrapper = ct_torch_ref.AutoregressiveWrapper(torch_model, ignore_index=ignore_index, pad_value=0)
    model = _abstract_model(config)
    convert.from_torch(torch_model.state_dict(), model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @functools.partial(jax.jit, compiler_options=FAST_CPU_COMPILE)
    def grad_fn(params, tokens, mask):
        net = nnx.merge(graphdef, params, rest)
        return window_grads(net, tokens, mask, ignore_index=ignore_index)

    return wrapper, model, params, grad_fn


def _compare_grads(label, jax_grads, model, torch_grads):
    got = _as_torch_keys(jax_grads, model)
    assert set(got) == set(torch_grads), f"{label}: parameter names differ: {set(got) ^ set(torch_grads)}"
    for key in sorted(torch_grads):
        assert_close(f"{label}: d(sum lm + aux)/d {key}", got[key], torch_grads[key], GRAD_ATOL, GRAD_RTOL)


@pytest.mark.parametrize("name, mask_kind, short_last, ignore_index", CASES)
def test_segment_losses_and_gradients_match_reference(name, mask_kind, short_last, ignore_index):
    wrapper, model, params, grad_fn = _setup(name, ignore_index)
    tokens, mask = _tokens_and_mask(CONFIGS[name], mask_kind, short_last)
    torch_lm, torch_aux, torch_grads = _torch_losses_and_grads(wrapper, tokens, mask)

    jax_mask = None if mask is None else jnp.asarray(mask.numpy())
    total, lm, aux, grads = grad_fn(params, jnp.asarray(tokens.numpy()), jax_mask)
    label = f"{name}/{mask_kind}/{'short last' if short_last else 'full'}"
    assert lm.shape == torch_lm.shape, f"{label}: {lm.shape[0]} segments, the reference yields {torch_lm.shape[0]}"
    assert_close(f"{label}: lm loss per segment", lm, torch_lm, JAX_VS_TORCH_ATOL)
    assert_close(f"{label}: aux loss per segment", aux, torch_aux, JAX_VS_TORCH_ATOL)
    assert np.any(torch_aux > 0), f"{label}: no segment compressed anything, the aux path is untested"
    assert_close(f"{label}: objective", total, np.sum(torch_lm + torch_aux), JAX_VS_TORCH_ATOL * len(torch_lm))
    _compare_grads(label, grads, model, torch_grads)


def test_ignored_targets_do_not_count():
    """Rows of different lengths, padded with ignore_index = pad_value = 0 (and masked)."""
    name, pad = "defaults", 0
    config = CONFIGS[name]
    wrapper, model, params, grad_fn = _setup(name, pad)
    seq_len = config["seq_len"]
    generator = torch.Generator().manual_seed(11)
    # As long as the "defaults" case (3 full segments and a short one), to share its compile;
    # row 2 ends inside segment 0, so all its later targets are ignored.
    lengths = [N_SEGMENTS * seq_len + seq_len // 2 + 1, 2 * seq_len + 2, seq_len - 1, 2 * seq_len]
    rows = [torch.randint(1, config["num_tokens"], (n,), generator=generator) for n in lengths]
    tokens = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)
    mask = torch.arange(tokens.shape[1] - 1)[None, :] < torch.tensor(lengths)[:, None] - 1
    assert not (tokens[2, seq_len:] != pad).any(), "row 2 must have no counted target after segment 0"
    torch_lm, torch_aux, torch_grads = _torch_losses_and_grads(wrapper, tokens, mask)

    _, lm, aux, grads = grad_fn(params, jnp.asarray(tokens.numpy()), jnp.asarray(mask.numpy()))
    assert_close("lm loss per segment, padded rows", lm, torch_lm, JAX_VS_TORCH_ATOL)
    assert_close("aux loss per segment, padded rows", aux, torch_aux, JAX_VS_TORCH_ATOL)
    _compare_grads("padded rows", grads, model, torch_grads)




def _equation_count(jaxpr) -> int:
    """Equations in a jaxpr, sub-jaxprs (scan bodies, custom derivatives) included."""
    count = 0
    for equation in jaxpr.eqns:
        count += 1
        for param in equation.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _equation_count(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _equation_count(sub)
    return count


def test_program_size_does_not_grow_with_segments():
    """The gradient program for 8 segments (and a short one) is as large as for 2: one scan body."""
    config = dict(CONFIGS["defaults"], depth=1)  # the structure, not the size, is under test
    graphdef, params, rest = nnx.split(_abstract_model(config), nnx.Param, ...)

    def gradient(params, tokens):
        return window_grads(nnx.merge(graphdef, params, rest), tokens)[3]

    sizes = {}
    for n in (2, 8):
        tokens = jnp.zeros((2, n * config["seq_len"] + 2 + 1), jnp.int32)
        traced = jax.jit(gradient).trace(params, tokens)
        hlo = traced.lower().as_text()
        sizes[n] = (_equation_count(traced.jaxpr.jaxpr), sum(1 for line in hlo.splitlines() if " = " in line))
    assert sizes[2] == sizes[8], f"(jaxpr equations, HLO ops) for 2 segments {sizes[2]} != for 8 segments {sizes[8]}"


def test_micro_batches_give_the_full_batch_gradient_and_the_reference_max_batch_size():
    """grads over 2 micro-batches = full batch = reference's max_batch_size sum / 2."""
    name = "residual_uneven_evictions"
    wrapper, model, params, _ = _setup(name)
    tokens, _ = _tokens_and_mask(CONFIGS[name], None, short_last=True, seed=8)
    full_lm, full_aux, full_grads = _torch_losses_and_grads(wrapper, tokens, None)
    _, _, chunked_grads = _torch_losses_and_grads(wrapper, tokens, None, max_batch_size=BATCH // 2)

    @functools.partial(jax.jit, compiler_options=FAST_CPU_COMPILE)
    def run(tokens):
        return window_grads(model, tokens, micro_batches=2)

    loss, lm, aux, grads = run(jnp.asarray(tokens.numpy()))
    assert_close("objective over 2 micro-batches", loss, np.sum(full_lm + full_aux), 1e-5 * len(full_lm))
    _compare_grads("2 micro-batches vs full batch", grads, model, full_grads)
    _compare_grads("2 micro-batches vs reference max_batch_size / 2", grads, model,
                   {key: value / 2 for key, value in chunked_grads.items()})
    # Per-segment losses are micro-batch means; without masks their mean is the full batch's lm.
    assert_close("lm per segment, mean of micro-batches", lm, full_lm, JAX_VS_TORCH_ATOL)


def test_micro_batches_must_divide_the_batch():
    model = _abstract_model(CONFIGS["defaults"])
    tokens = jnp.zeros((3, 9), jnp.int32)
    with pytest.raises(ValueError, match=r"batch size \(3\) must be divisible by micro_batches \(2\)"):
        window_grads(model, tokens, micro_batches=2)
    with pytest.raises(ValueError, match="micro_batches must be a positive int, got 0"):
        window_grads(model, tokens, micro_batches=0)


def test_remat_gives_the_same_gradient():
    """`remat` (weight-matmul outputs kept, the rest recomputed) changes memory, not the numbers."""
    name = "residual_uneven_evictions"
    _, model, _, _ = _setup(name)
    tokens, mask = _tokens_and_mask(CONFIGS[name], "right", short_last=True, seed=9)
    tokens, mask = jnp.asarray(tokens.numpy()), jnp.asarray(mask.numpy())
    results = [jax.jit(functools.partial(sequence_grads, remat=remat), compiler_options=FAST_CPU_COMPILE)(
        model, tokens, mask) for remat in (False, True)]
    for label, plain, rematted in zip(("objective", "lm", "aux"), results[0][:3], results[1][:3]):
        assert_close(f"remat: {label}", rematted, plain, 1e-6)
    for (path, plain), rematted in zip(jax.tree.leaves_with_path(results[0][3]), jax.tree.leaves(results[1][3])):
        assert_close(f"remat: grad {jax.tree_util.keystr(path)}", rematted, plain, 1e-6)


@pytest.mark.parametrize("seed", [3, 7, 13])
def test_gradients_match_reference_on_random_configs(seed):
    """Property-style: random valid configs (tests.configs.random_config), a row padded from
    its middle, 4 full segments and a short one, per-segment losses and every gradient."""
    config = random_config(seed)
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=seed).train()
    model = _abstract_model(config)
    convert.from_torch(torch_model.state_dict(), model)
    model.train()
    rng = np.random.default_rng(seed)
    length = 4 * config["seq_len"] + int(rng.integers(1, config["seq_len"] + 1)) + 1
    tokens = torch.from_numpy(rng.integers(0, config["num_tokens"], (3, length)))
    mask = torch.ones(3, length - 1, dtype=torch.bool)
    mask[1, length // 2:] = False
    torch_lm, torch_aux, torch_grads = _torch_losses_and_grads(
        ct_torch_ref.AutoregressiveWrapper(torch_model), tokens, mask)
    assert np.any(torch_aux > 0), f"seed {seed}: nothing compressed, the aux path is untested"
    run = jax.jit(window_grads, compiler_options=FAST_CPU_COMPILE)
    _, lm, aux, grads = run(model, jnp.asarray(tokens.numpy()), jnp.asarray(mask.numpy()))
    label = f"random config {seed}"
    assert_close(f"{label}: lm loss per segment", lm, torch_lm, JAX_VS_TORCH_ATOL)
    assert_close(f"{label}: aux loss per segment", aux, torch_aux, JAX_VS_TORCH_ATOL)
    _compare_grads(label, grads, model, torch_grads)


@pytest.mark.parametrize("bad", [300, -1])
def test_eager_losses_and_grads_refuse_token_ids_outside_num_tokens(bad):
    model = ct_jax.CompressiveTransformer(num_tokens=256, dim=16, seq_len=4, depth=1, heads=2, mem_len=4, cmem_len=2,
                                          cmem_ratio=2, rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 9), jnp.int32).at[1, 5].set(bad)
    batch = StreamBatch.from_windows(tokens, 4)
    message = r"token ids must lie in \[0, num_tokens=256\), got inputs with values in "
    for call in (functools.partial(ct_jax.autoregressive.segment_losses, model, tokens),
                 functools.partial(ct_jax.autoregressive.losses, model, batch),
                 functools.partial(grads, model, batch)):
        with pytest.raises(ValueError, match=message):
            call()
    last = jnp.zeros((2, 9), jnp.int32).at[0, -1].set(bad)  # only a target
    with pytest.raises(ValueError, match=r"got targets with values in "):
        ct_jax.autoregressive.segment_losses(model, last)
    jax.jit(functools.partial(ct_jax.autoregressive.segment_losses, model))(tokens)  # traced: not checked here
