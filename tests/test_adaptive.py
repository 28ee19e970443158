"""Adaptive input and softmax: ct_jax.adaptive against ct_torch_ref.adaptive (weights converted both
ways), the converter's exact round trip, and ct_torch_ref's adaptive model and wrapper loss."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import adaptive as jax_adaptive
from ct_jax import convert
from ct_jax.autoregressive import StreamBatch, cross_entropy, grads, losses, sequence_grads, token_nll
from ct_jax.flops import run_flops
from ct_jax.footprint import count_parameters
from ct_jax.generation import decode
from ct_jax.sharding import logical_axes
from ct_torch_ref import adaptive as torch_adaptive
from tests.configs import ADAPTIVE_CONFIGS, forward, loaded_model, randomize_
from tests.tolerances import GENERATION_LOGITS_ATOL, GRAD_ATOL, GRAD_RTOL, JAX_VS_TORCH_ATOL, assert_close

IGNORE = -100
# (num_tokens, dim, cutoffs, div_val): one cutoff; clusters of size 1 at both ends; deep div_val 4
# down to width 1; a width that does not divide evenly.
CASES = [
    (50, 32, [10], 1),
    (50, 32, [10, 30], 2),
    (41, 16, [1, 40], 2),
    (97, 64, [5, 20, 60], 4),
    (64, 24, [8, 16, 32], 2),
]
SOFTMAX_PREFIX, EMBEDDING_PREFIX = "to_logits", "token_emb"  # their ct_jax paths in the model
SOFTMAX_TORCH_PREFIX, EMBEDDING_TORCH_PREFIX = "to_logits.1.", "token_emb."  # their upstream keys


def _case_id(case) -> str:
    num_tokens, dim, cutoffs, div_val = case
    return f"V{num_tokens}-d{dim}-c{'_'.join(map(str, cutoffs))}-div{div_val}"


def _torch_modules(case, seed: int):
    num_tokens, dim, cutoffs, div_val = case
    torch.manual_seed(seed)
    softmax = torch_adaptive.AdaptiveLogSoftmax(dim, num_tokens, cutoffs, div_val).double()
    embedding = torch_adaptive.AdaptiveEmbedding(num_tokens, dim, cutoffs, div_val).double()
    with torch.no_grad():  # torch's head bias starts uniform, the embedding N(0, 1): scale all alike
        for param in [*softmax.parameters(), *embedding.parameters()]:
            param.normal_(0.0, 0.5)
    return softmax.float(), embedding.float()


def _jax_modules(case, seed: int, vocab_chunk: int = jax_adaptive.VOCAB_CHUNK):
    num_tokens, dim, cutoffs, div_val = case
    rngs = nnx.Rngs(seed)
    return (jax_adaptive.AdaptiveLogSoftmax(dim, num_tokens, cutoffs, div_val, vocab_chunk=vocab_chunk, rngs=rngs),
            jax_adaptive.AdaptiveEmbedding(num_tokens, dim, cutoffs, div_val, rngs=rngs))


def _prefixed(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in module.state_dict().items()}


def _unprefixed(state: dict[str, np.ndarray], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): torch.from_numpy(np.array(value)) for key, value in state.items()}


def _converted_pair(case, seed: int = 0, vocab_chunk: int = jax_adaptive.VOCAB_CHUNK):
    """Torch modules with random weights and JAX modules holding the same weights (torch -> JAX)."""
    softmax, embedding = _torch_modules(case, seed)
    jax_softmax, jax_embedding = _jax_modules(case, seed + 100, vocab_chunk)
    convert.module_from_torch(_prefixed(softmax, SOFTMAX_TORCH_PREFIX), jax_softmax, SOFTMAX_PREFIX)
    convert.module_from_torch(_prefixed(embedding, EMBEDDING_TORCH_PREFIX), jax_embedding, EMBEDDING_PREFIX)
    return softmax, embedding, jax_softmax, jax_embedding


def _inputs(case, seed: int):
    """hidden (2, 7, dim) and targets (2, 7) covering every cluster, with ignore_index positions."""
    num_tokens, dim, cutoffs, _ = case
    generator = np.random.default_rng(seed)
    hidden = generator.normal(size=(2, 7, dim)).astype(np.float32)
    starts = [0, *cutoffs]
    targets = generator.integers(0, num_tokens, size=(2, 7))
    for i, start in enumerate(starts):  # one target in each cluster, at its first and last id
        targets.flat[i] = start
    targets.flat[len(starts)] = num_tokens - 1
    targets[1, -2:] = IGNORE
    return hidden, targets


def _grads_by_key(module: nnx.Module, grads: nnx.State, prefix: str) -> dict[str, np.ndarray]:
    """JAX parameter gradients under the modules' upstream keys (transposed like the weights)."""
    holder = nnx.clone(module)
    nnx.update(holder, grads)
    return convert.module_to_numpy(holder, prefix)


@pytest.mark.parametrize("vocab_chunk", [jax_adaptive.VOCAB_CHUNK, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_softmax_log_probs_nll_loss_and_gradients_match_torch(case, vocab_chunk):
    softmax, _, jax_softmax, _ = _converted_pair(case, seed=1, vocab_chunk=vocab_chunk)
    hidden, targets = _inputs(case, seed=2)
    hidden_t = torch.tensor(hidden, requires_grad=True)
    targets_t = torch.tensor(targets)

    log_probs_t = softmax.log_probs(hidden_t)
    log_probs_j, logits_j = nnx.jit(lambda module, x: (module.log_probs(x), module(x)))(jax_softmax, hidden)
    assert_close("log_probs", log_probs_j, log_probs_t, JAX_VS_TORCH_ATOL)
    assert_close("logsumexp of log_probs", jax.nn.logsumexp(logits_j, -1), np.zeros(targets.shape),
                 JAX_VS_TORCH_ATOL)

    nll_t = softmax.nll(hidden_t, targets_t, IGNORE)
    nll_j = nnx.jit(lambda module, x, y: module.nll(x, y, IGNORE))(jax_softmax, hidden, targets)
    assert_close("per-token nll", nll_j, nll_t, JAX_VS_TORCH_ATOL)
    assert float(nll_j[1, -1]) == 0.0 and float(nll_t.detach()[1, -1]) == 0.0, "ignored targets must give 0"
    kept = targets != IGNORE
    # the torch nll is torch's own AdaptiveLogSoftmaxWithLoss.forward: it must equal the full log-probs
    assert_close("torch nll vs its log_probs", nll_t[torch.tensor(kept)],
                 -log_probs_t[torch.tensor(kept)].gather(-1, targets_t[torch.tensor(kept)][:, None])[:, 0],
                 JAX_VS_TORCH_ATOL)
    count = int(kept.sum())
    assert_close("mean loss", nll_j.sum() / count, nll_t.sum() / count, JAX_VS_TORCH_ATOL)
    # a sum of `count` values each within the float32 bound
    assert_close("summed loss", nll_j.sum(), nll_t.sum(), JAX_VS_TORCH_ATOL * count)

    nll_t.sum().backward()

    def summed(module, hidden):
        return module.nll(hidden, jnp.asarray(targets), IGNORE).sum()

    param_grads, hidden_grad = nnx.jit(nnx.grad(summed, argnums=(0, 1)))(jax_softmax, jnp.asarray(hidden))
    assert_close("d loss / d hidden", hidden_grad, hidden_t.grad, GRAD_ATOL, GRAD_RTOL)
    got = _grads_by_key(jax_softmax, param_grads, SOFTMAX_PREFIX)
    expected = {SOFTMAX_TORCH_PREFIX + key: param.grad for key, param in softmax.named_parameters()}
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        assert_close(f"d loss / d {key}", got[key], grad, GRAD_ATOL, GRAD_RTOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_log_probs_gradients_match_torch(case):
    """The full log-probs path (generation, evaluation) trains alike too, under a soft-target
    cross-entropy (random target distributions, mean over positions: the scale of an LM loss)."""
    softmax, _, jax_softmax, _ = _converted_pair(case, seed=3)
    hidden, _ = _inputs(case, seed=4)
    n_positions = int(np.prod(hidden.shape[:-1]))
    soft_targets = np.random.default_rng(5).dirichlet(np.ones(case[0]), size=hidden.shape[:-1])
    weights = (-soft_targets / n_positions).astype(np.float32)
    hidden_t = torch.tensor(hidden, requires_grad=True)
    (softmax.log_probs(hidden_t) * torch.tensor(weights)).sum().backward()

    def weighted(module, hidden):
        return (module.log_probs(hidden) * weights).sum()

    param_grads, hidden_grad = nnx.jit(nnx.grad(weighted, argnums=(0, 1)))(jax_softmax, jnp.asarray(hidden))
    assert_close("d weighted log_probs / d hidden", hidden_grad, hidden_t.grad, GRAD_ATOL, GRAD_RTOL)
    got = _grads_by_key(jax_softmax, param_grads, SOFTMAX_PREFIX)
    for key, param in softmax.named_parameters():
        assert_close(f"d weighted log_probs / d {key}", got[SOFTMAX_TORCH_PREFIX + key], param.grad,
                     GRAD_ATOL, GRAD_RTOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_embedding_and_its_gradients_match_torch(case):
    _, embedding, _, jax_embedding = _converted_pair(case, seed=6)
    num_tokens, dim, _, _ = case
    _, targets = _inputs(case, seed=7)
    tokens = np.where(targets == IGNORE, num_tokens // 2, targets)
    weights = np.random.default_rng(8).normal(size=(*tokens.shape, dim)).astype(np.float32)
    out_t = embedding(torch.tensor(tokens))
    assert_close("embedding", jax_embedding(jnp.asarray(tokens)), out_t, JAX_VS_TORCH_ATOL)
    (out_t * torch.tensor(weights)).sum().backward()

    def weighted(module):
        return (module(jnp.asarray(tokens)) * weights).sum()

    got = _grads_by_key(jax_embedding, nnx.jit(nnx.grad(weighted))(jax_embedding), EMBEDDING_PREFIX)
    expected = {EMBEDDING_TORCH_PREFIX + key: param.grad for key, param in embedding.named_parameters()}
    assert sorted(got) == sorted(expected)
    for key, grad in expected.items():
        assert_close(f"d embedding / d {key}", got[key], grad, GRAD_ATOL, GRAD_RTOL)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_round_trips_are_exact_both_ways(case):
    softmax, embedding = _torch_modules(case, seed=9)
    jax_softmax, jax_embedding = _jax_modules(case, seed=10)
    for torch_module, jax_module, prefix, torch_prefix in (
        (softmax, jax_softmax, SOFTMAX_PREFIX, SOFTMAX_TORCH_PREFIX),
        (embedding, jax_embedding, EMBEDDING_PREFIX, EMBEDDING_TORCH_PREFIX),
    ):
        # JAX -> torch (strict) -> JAX
        made_in_jax = convert.module_to_numpy(jax_module, prefix)
        torch_copy = type(torch_module)(*_constructor_args(torch_module, case))
        torch_copy.load_state_dict(_unprefixed(made_in_jax, torch_prefix), strict=True)
        back = convert.module_to_numpy(
            convert.module_from_torch(_prefixed(torch_copy, torch_prefix), nnx.clone(jax_module), prefix), prefix)
        assert sorted(back) == sorted(made_in_jax)
        for key, value in made_in_jax.items():
            np.testing.assert_array_equal(back[key], value, err_msg=f"{key} changed in JAX -> torch -> JAX")
        # torch -> JAX -> torch
        original = _prefixed(torch_module, torch_prefix)
        there = convert.module_from_torch(original, nnx.clone(jax_module), prefix)
        for key, value in convert.module_to_numpy(there, prefix).items():
            assert torch.equal(torch.from_numpy(np.array(value)), original[key]), f"{key} changed in torch -> JAX"


def _constructor_args(module: torch.nn.Module, case) -> tuple:
    num_tokens, dim, cutoffs, div_val = case
    if isinstance(module, torch_adaptive.AdaptiveLogSoftmax):
        return dim, num_tokens, cutoffs, div_val
    return num_tokens, dim, cutoffs, div_val


def test_module_from_torch_is_strict():
    case = CASES[1]
    softmax, _ = _torch_modules(case, seed=0)
    jax_softmax, _ = _jax_modules(case, seed=0)
    before = convert.module_to_numpy(jax_softmax, SOFTMAX_PREFIX)
    state = _prefixed(softmax, SOFTMAX_TORCH_PREFIX)
    del state["to_logits.1.head.bias"]
    state["to_logits.1.tail.0.1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing keys \['to_logits.1.head.bias'\].*tail.0.1.weight"):
        convert.module_from_torch(state, jax_softmax, SOFTMAX_PREFIX)
    for key, value in convert.module_to_numpy(jax_softmax, SOFTMAX_PREFIX).items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} changed by a failed load")


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, nested jaxprs (remat, custom_vjp) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(var.aval.shape) for var in eqn.outvars if hasattr(var.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    shapes += _shapes(inner)
    return shapes


def test_nll_and_its_gradient_never_build_the_full_log_probs():
    num_tokens, dim, cutoffs, div_val = case = (997, 16, [50, 300], 2)
    chunk = 64
    jax_softmax = _jax_modules(case, seed=0, vocab_chunk=chunk)[0]
    generator = np.random.default_rng(0)
    hidden = jnp.asarray(generator.normal(size=(4, 50, dim)), jnp.float32)
    targets = jnp.asarray(generator.integers(0, num_tokens, size=(4, 50)))
    positions = 4 * 50
    graphdef, state = nnx.split(jax_softmax)

    def loss(state, hidden):
        return nnx.merge(graphdef, state).nll(hidden, targets, IGNORE).sum()

    def log_probs(state, hidden):
        return nnx.merge(graphdef, state).log_probs(hidden)

    def too_big(function) -> list[tuple[int, ...]]:
        """Values larger than one (positions, vocab_chunk) block of logits (every parameter is smaller)."""
        shapes = _shapes(jax.make_jaxpr(function)(state, hidden).jaxpr)
        return [shape for shape in shapes if int(np.prod(shape)) > positions * chunk]

    assert not too_big(jax.grad(loss, argnums=(0, 1))), "nll or its gradient built a logits block over vocab_chunk"
    assert (4, 50, num_tokens) in too_big(log_probs), "the check must see log_probs' full tensor"


# ---- ct_torch_ref model level -------------------------------------------------------------------

MODEL = dict(num_tokens=60, dim=32, seq_len=6, depth=2, heads=4, mem_len=6, cmem_len=3, cmem_ratio=2)


def test_default_model_has_upstream_keys_and_config():
    import compressive_transformer_pytorch as upstream

    ours = ct_torch_ref.CompressiveTransformer(**MODEL, adaptive_cutoffs=None, adaptive_div_val=1)
    theirs = upstream.CompressiveTransformer(**MODEL)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert not {"adaptive_cutoffs", "adaptive_div_val"} & set(ours.config), "defaults must keep config.json's keys"
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("emb_dim", [None, 16])
def test_adaptive_model_wrapper_loss_is_the_mean_nll_of_its_log_probs(emb_dim):
    torch.manual_seed(0)
    model = ct_torch_ref.CompressiveTransformer(**MODEL, emb_dim=emb_dim, adaptive_cutoffs=[10, 25, 40],
                                                adaptive_div_val=2).eval()
    assert isinstance(model.token_emb, torch_adaptive.AdaptiveEmbedding)
    assert isinstance(model.to_logits[1], torch_adaptive.AdaptiveLogSoftmax)
    tokens = torch.randint(0, MODEL["num_tokens"], (3, 3 * MODEL["seq_len"] + 1))
    mask = torch.ones(3, tokens.shape[1], dtype=torch.bool)
    mask[2, 10:] = False  # a padded row: memory keeps flowing, its targets stay counted (as upstream)
    losses = [r.loss for r in ct_torch_ref.AutoregressiveWrapper(model)(tokens, return_loss=True, mask=mask)]

    memories = None
    for segment, loss in enumerate(losses):
        window = slice(segment * MODEL["seq_len"], (segment + 1) * MODEL["seq_len"])
        log_probs, memories, _ = model(tokens[:, window], memories=memories, mask=mask[:, window])
        assert_close("logsumexp of the forward's log-probs", log_probs.logsumexp(-1), torch.zeros(3, 6), 1e-5)
        targets = tokens[:, 1:][:, window]
        expected = -log_probs.gather(-1, targets[..., None]).mean()
        assert_close(f"segment {segment} loss", loss, expected, JAX_VS_TORCH_ATOL)


def test_adaptive_wrapper_loss_skips_ignored_targets_and_trains_every_cluster():
    torch.manual_seed(1)
    model = ct_torch_ref.CompressiveTransformer(**MODEL, adaptive_cutoffs=[10, 25], adaptive_div_val=4)
    sequences = [torch.randint(0, 60, (13,)), torch.randint(0, 60, (5,))]  # the short row's targets padded
    sequences[0][:4] = torch.tensor([3, 12, 30, 59])  # targets in every cluster
    loss = next(iter(ct_torch_ref.AutoregressiveWrapper(model)(sequences, return_loss=True))).loss

    inputs = torch.stack([sequences[0][:6], torch.cat([sequences[1][:4], torch.zeros(2, dtype=torch.long)])])
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    log_probs, _, _ = model(inputs, mask=mask)
    picked = torch.cat([log_probs[0, :6].gather(-1, sequences[0][1:7, None])[:, 0],
                        log_probs[1, :4].gather(-1, sequences[1][1:5, None])[:, 0]])
    assert_close("loss over the kept targets", loss, -picked.mean(), JAX_VS_TORCH_ATOL)
    loss.backward()
    untrained = [key for key, param in model.named_parameters()
                 if ("token_emb." in key or "to_logits." in key) and (param.grad is None or not param.grad.any())]
    assert not untrained, f"no gradient reached {untrained}"


@pytest.mark.parametrize("emb_dim", [None, 16])
def test_model_keys_are_what_the_converter_gives_the_jax_modules(emb_dim):
    """The later ct_jax model holds these modules at `token_emb` and `to_logits` (beside `to_emb_dim`)."""
    cutoffs, div_val = [10, 25, 40], 2
    model = ct_torch_ref.CompressiveTransformer(**MODEL, emb_dim=emb_dim, adaptive_cutoffs=cutoffs,
                                                adaptive_div_val=div_val)
    width = emb_dim or MODEL["dim"]
    rngs = nnx.Rngs(0)
    jax_keys = {
        **convert.module_to_numpy(jax_adaptive.AdaptiveEmbedding(60, width, cutoffs, div_val, rngs=rngs), "token_emb"),
        **convert.module_to_numpy(jax_adaptive.AdaptiveLogSoftmax(width, 60, cutoffs, div_val, rngs=rngs), "to_logits"),
    }
    torch_state = {key: tuple(value.shape) for key, value in model.state_dict().items()
                   if key.startswith(("token_emb.", "to_logits.1."))}
    assert {key: value.shape for key, value in jax_keys.items()} == torch_state


def test_adaptive_config_round_trips_through_save_pretrained(tmp_path):
    model = ct_torch_ref.CompressiveTransformer(**MODEL, adaptive_cutoffs=[10, 25], adaptive_div_val=2)
    assert model.config["adaptive_cutoffs"] == [10, 25] and model.config["adaptive_div_val"] == 2
    loaded = ct_torch_ref.load_pretrained(ct_torch_ref.save_pretrained(model, tmp_path))
    assert loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


BAD = [
    (dict(adaptive_cutoffs=[25, 10]), ValueError, "adaptive_cutoffs must be strictly increasing"),
    (dict(adaptive_cutoffs=[10, 10]), ValueError, "adaptive_cutoffs must be strictly increasing"),
    (dict(adaptive_cutoffs=[0, 10]), ValueError, r"adaptive_cutoffs .* \(0, num_tokens=60\), got \[0, 10\]"),
    (dict(adaptive_cutoffs=[10, 60]), ValueError, r"adaptive_cutoffs .* \(0, num_tokens=60\), got \[10, 60\]"),
    (dict(adaptive_cutoffs=[]), ValueError, "adaptive_cutoffs must hold at least one cutoff"),
    (dict(adaptive_cutoffs=[10.5]), TypeError, "adaptive_cutoffs must be a list of ints"),
    (dict(adaptive_cutoffs=[True]), TypeError, "adaptive_cutoffs must be a list of ints"),
    (dict(adaptive_cutoffs="10"), TypeError, "adaptive_cutoffs must be a list of ints"),
    (dict(adaptive_cutoffs=[10], adaptive_div_val=0), ValueError, "adaptive_div_val must be an int >= 1, got 0"),
    (dict(adaptive_cutoffs=[10], adaptive_div_val=2.0), TypeError, "adaptive_div_val must be an int >= 1"),
    (dict(adaptive_cutoffs=[10, 20, 30], adaptive_div_val=4), ValueError, r"last cluster width 32 // 4\*\*3 = 0"),
    (dict(adaptive_div_val=4), ValueError, "adaptive_div_val=4 needs adaptive_cutoffs"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(case[0]) for case in BAD])
def test_bad_adaptive_arguments_are_refused_naming_them(kwargs, error, message, unchecked_types):
    with pytest.raises(error, match=message):
        ct_torch_ref.CompressiveTransformer(**MODEL, **kwargs)
    if "adaptive_cutoffs" in kwargs:  # the JAX check, the one its model will call, says the same
        with pytest.raises(error, match=message):
            jax_adaptive.check_adaptive(MODEL["num_tokens"], MODEL["dim"], kwargs["adaptive_cutoffs"],
                                        kwargs.get("adaptive_div_val", 1))


# ---- ct_jax model level: against ct_torch_ref's adaptive model ------------------------------------

N_SEGMENTS = 5
# Per row: the segments before which its memory is emptied (row 0 never after the start), so rows
# hold different memory counts from segment 2 on; row 1's segment 1 ends in two padded positions.
RESETS = np.array([[True, False, False, False, False],
                   [True, False, True, False, False],
                   [True, False, False, True, False]])


@functools.cache
def _adaptive_models(name: str) -> tuple[torch.nn.Module, ct_jax.CompressiveTransformer]:
    """ct_torch_ref adaptive model with random weights (train mode: aux loss on) and its JAX copy."""
    config = ADAPTIVE_CONFIGS[name]
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=11).train()
    jax_model = loaded_model(config, torch_model.state_dict())
    jax_model.train()
    return torch_model, jax_model


def _stream_batch(config, seed: int = 0) -> StreamBatch:
    """RESETS' rows over N_SEGMENTS full segments, tokens in every cluster, one padded stretch."""
    seq_len, vocab = config["seq_len"], config["num_tokens"]
    generator = np.random.default_rng(seed)
    tokens = generator.integers(0, vocab, (RESETS.shape[0], N_SEGMENTS * seq_len + 1))
    tokens[0, : len(config["adaptive_cutoffs"]) + 2] = [0, *config["adaptive_cutoffs"], vocab - 1]
    inputs, targets = tokens[:, :-1], tokens[:, 1:].copy()
    mask = np.ones(inputs.shape, bool)
    mask[1, 2 * seq_len - 2 : 2 * seq_len] = False
    targets[~mask] = IGNORE
    return StreamBatch(inputs.astype(np.int32), targets.astype(np.int32), mask, RESETS)


def _torch_rows(torch_model, batch: StreamBatch, seq_len: int):
    """Each row alone through ct_torch_ref (its memory emptied where RESETS says): per segment the
    (b, t, V) log-probs, the summed NLL and count of the batch's targets and the rows' mean aux loss,
    and the gradients of sum over segments (NLL / count + aux), the objective `grads` differentiates."""
    torch_model.zero_grad(set_to_none=True)
    n_rows = batch.inputs.shape[0]
    memories = [None] * n_rows
    log_probs, nll, counts, aux, objective = [], [], [], [], 0.0
    for segment in range(N_SEGMENTS):
        window = slice(segment * seq_len, (segment + 1) * seq_len)
        rows_log_probs, rows_nll, rows_aux = [], [], []
        for row in range(n_rows):
            if batch.resets[row, segment]:
                memories[row] = None
            inputs = torch.from_numpy(batch.inputs[row : row + 1, window]).long()
            targets = torch.from_numpy(batch.targets[row : row + 1, window]).long()
            mask = torch.from_numpy(batch.mask[row : row + 1, window])
            hidden, memories[row], row_aux = torch_model.features(inputs, memories[row], mask)
            project, softmax = torch_model.to_logits
            rows_log_probs.append(softmax.log_probs(project(hidden)).detach())
            rows_nll.append(softmax.nll(project(hidden), targets, IGNORE).sum())
            rows_aux.append(row_aux)
        count = int((batch.targets[:, window] != IGNORE).sum())
        segment_nll, segment_aux = sum(rows_nll), sum(rows_aux) / n_rows
        objective = objective + segment_nll / count + segment_aux
        log_probs.append(torch.cat(rows_log_probs))
        nll.append(float(segment_nll.detach()))
        counts.append(count)
        aux.append(float(segment_aux.detach()))
    objective.backward()
    grads = {key: (param.grad if param.grad is not None else torch.zeros_like(param)).numpy().copy()
             for key, param in torch_model.named_parameters()}  # None: unused (a non-memory layer's compressor)
    return log_probs, np.asarray(nll), np.asarray(counts), np.asarray(aux), float(objective.detach()), grads


def _as_torch_keys(model: ct_jax.CompressiveTransformer, grads: nnx.State) -> dict[str, np.ndarray]:
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return convert.to_numpy(holder)


@pytest.mark.parametrize("name", sorted(ADAPTIVE_CONFIGS))
def test_model_log_probs_losses_and_gradients_match_torch_with_per_row_memory(name):
    torch_model, model = _adaptive_models(name)
    seq_len = ADAPTIVE_CONFIGS[name]["seq_len"]
    batch = _stream_batch(ADAPTIVE_CONFIGS[name])
    log_probs_t, nll_t, counts_t, aux_t, objective_t, grads_t = _torch_rows(torch_model, batch, seq_len)

    memories = ct_jax.Memory.empty(model, batch.inputs.shape[0])
    uneven = 0  # segments whose rows start from different memory counts
    for segment in range(N_SEGMENTS):
        window = slice(segment * seq_len, (segment + 1) * seq_len)
        memories = memories.reset(jnp.asarray(batch.resets[:, segment]))
        uneven += len(set(np.asarray(memories.total_valid).tolist())) > 1
        log_probs, memories, _ = forward(model, jnp.asarray(batch.inputs[:, window]), memories,
                                         jnp.asarray(batch.mask[:, window]))
        assert_close(f"{name}: log-probs of segment {segment}", log_probs, log_probs_t[segment], JAX_VS_TORCH_ATOL)
    assert uneven >= 2, f"rows should hold different memory counts on 2+ segments, got {uneven}"

    result = nnx.jit(functools.partial(losses, ignore_index=IGNORE))(model, jax.tree.map(jnp.asarray, batch))
    np.testing.assert_array_equal(result.counts, counts_t, err_msg="counted targets per segment")
    assert_close(f"{name}: summed NLL per segment", result.nll, nll_t, JAX_VS_TORCH_ATOL * counts_t.max())
    assert_close(f"{name}: LM loss per segment", result.lm_losses, nll_t / counts_t, JAX_VS_TORCH_ATOL)
    assert_close(f"{name}: aux loss per segment", result.aux_losses, aux_t, JAX_VS_TORCH_ATOL)
    assert np.any(aux_t > 0), f"{name}: no segment compressed anything, the aux path is untested"

    gradients = nnx.jit(functools.partial(grads, ignore_index=IGNORE))(model, jax.tree.map(jnp.asarray, batch))
    assert_close(f"{name}: objective", gradients.objective, objective_t, JAX_VS_TORCH_ATOL * N_SEGMENTS)
    got = _as_torch_keys(model, gradients.grads)
    assert sorted(got) == sorted(grads_t)
    for key, grad in grads_t.items():
        assert_close(f"{name}: d objective / d {key}", got[key], grad, GRAD_ATOL, GRAD_RTOL)
    adaptive_keys = [key for key in grads_t if key.startswith(("token_emb.", "to_logits.1."))]
    assert all(np.any(grads_t[key] != 0) for key in adaptive_keys), "every adaptive parameter must be trained"


@pytest.mark.parametrize("name", sorted(ADAPTIVE_CONFIGS))
def test_whole_model_round_trips_exactly_both_ways(name, tmp_path):
    torch_model, _ = _adaptive_models(name)
    config = ADAPTIVE_CONFIGS[name]
    # torch -> JAX -> torch
    model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(5))
    back = convert.to_torch(convert.from_torch(torch_model.state_dict(), model))
    assert sorted(back) == sorted(torch_model.state_dict())
    for key, value in torch_model.state_dict().items():
        assert torch.equal(back[key], value), f"{key} changed in torch -> JAX -> torch"
    # JAX -> torch (strict) -> JAX, and the config through config.json both ways
    made_in_jax = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(6))
    loaded_t = ct_torch_ref.load_pretrained(convert.save_pretrained(made_in_jax, tmp_path / "jax"))
    assert loaded_t.config == ct_torch_ref.CompressiveTransformer(**config).config
    again = convert.load_pretrained(ct_torch_ref.save_pretrained(loaded_t, tmp_path / "torch"))
    assert again.config == made_in_jax.config and again.config.to_kwargs() == loaded_t.config
    expected = convert.to_numpy(made_in_jax)
    for key, value in convert.to_numpy(again).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=f"{key} changed in JAX -> torch -> JAX")


def test_config_keys_only_when_adaptive_and_json_lists_load():
    base = dict(num_tokens=60, dim=32, seq_len=6, depth=2, heads=4)
    default = ct_jax.ModelConfig.from_kwargs(base).to_kwargs()
    assert not {"adaptive_cutoffs", "adaptive_div_val"} & set(default), "a default config.json keeps its keys"
    assert default == ct_torch_ref.CompressiveTransformer(**base).config
    config = ct_jax.ModelConfig.from_kwargs(json.loads(json.dumps(dict(base, adaptive_cutoffs=[10, 25],
                                                                       adaptive_div_val=2))))
    assert config.adaptive_cutoffs == (10, 25) and config.adaptive
    assert config.to_kwargs() == ct_torch_ref.CompressiveTransformer(**config.to_kwargs()).config


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=[str(case[0]) for case in BAD])
def test_jax_model_refuses_bad_adaptive_arguments_as_torch(kwargs, error, message, unchecked_types):
    with pytest.raises(error, match=message):
        ct_jax.CompressiveTransformer(**MODEL, **kwargs, rngs=nnx.Rngs(0))


def test_greedy_generation_matches_torch():
    name = "adaptive_div2"
    torch_model, model = _adaptive_models(name)
    torch_model.eval()
    config = ADAPTIVE_CONFIGS[name]
    prime = np.random.default_rng(3).integers(0, config["num_tokens"], (2, config["seq_len"] + 2))
    length = 4 * config["seq_len"]
    drawn_from = []
    hook = torch_model.register_forward_hook(lambda module, args, out: drawn_from.append(out[0][:, -1].clone()))
    try:
        expected = ct_torch_ref.AutoregressiveWrapper(torch_model).generate(torch.from_numpy(prime), length,
                                                                           temperature=0)
    finally:
        hook.remove()
        torch_model.train()
    eval_copy = nnx.clone(model)
    eval_copy.eval()
    got = decode(eval_copy, prime, length, jax.random.key(0), temperature=0, return_logits=True)
    assert_close("log-probs of every draw", got.logits, torch.stack(drawn_from[-length:], dim=1),
                 GENERATION_LOGITS_ATOL)
    np.testing.assert_array_equal(np.asarray(got.tokens), expected.numpy(), err_msg="greedy tokens")


def test_training_loss_never_builds_the_full_log_probs():
    """The jaxpr of an adaptive model's gradient holds no value as large as (b, t, V); a full-softmax
    model of the same sizes does (the check can fail)."""
    batch, seq_len, vocab = 2, 16, 997
    base = dict(num_tokens=vocab, dim=16, seq_len=seq_len, depth=1, heads=2)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, 2 * seq_len + 1)))

    def largest(kwargs) -> list[tuple[int, ...]]:
        model = nnx.eval_shape(lambda: ct_jax.CompressiveTransformer(**kwargs, rngs=nnx.Rngs(0)))
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def objective(params):
            return sequence_grads(nnx.merge(graphdef, params, rest), tokens)

        shapes = _shapes(jax.make_jaxpr(objective)(params).jaxpr)
        return [shape for shape in shapes if int(np.prod(shape)) >= batch * seq_len * vocab]

    assert largest(dict(base, adaptive_cutoffs=[50, 300], adaptive_div_val=2)) == []
    assert (batch, seq_len, vocab) in largest(base), "the check must see a full-softmax model's logits"


def _param_sizes(model: ct_jax.CompressiveTransformer, prefix: str, suffix: str = "") -> int:
    return sum(value.size for key, value in convert.to_numpy(model).items()
               if key.startswith(prefix) and key.endswith(suffix))


@pytest.mark.parametrize("name", sorted(ADAPTIVE_CONFIGS))
def test_footprint_flops_and_sharding_know_the_adaptive_parameters(name):
    config = ADAPTIVE_CONFIGS[name]
    model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0))
    counted = count_parameters(**{key: value for key, value in config.items() if key != "memory_layers"})
    assert counted == _param_sizes(model, ""), f"count_parameters {counted} != the model's {_param_sizes(model, '')}"

    tokens = 2 * config["seq_len"]
    flops = run_flops(config, batch=2, segments=1, training=False)
    # every matrix of the softmax runs on every position: 2 FLOPs per weight and token
    assert flops["logits"].forward == 2 * tokens * _param_sizes(model, "to_logits.1.", "weight")
    projections = _param_sizes(model, "token_emb.emb_projs.") + _param_sizes(model, "to_logits.0.", "weight")
    projections += _param_sizes(model, "to_model_dim.", "weight")
    assert flops["embedding projections"].forward == 2 * tokens * projections

    params = nnx.state(model, nnx.Param)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        axes = logical_axes(path, leaf.ndim)
        assert None not in axes, f"{jax.tree_util.keystr(path)} {leaf.shape} has no logical axes: {axes}"


def test_full_softmax_loss_is_still_cross_entropy_of_the_logits_to_the_bit():
    """A default model's loss path: the forward's logits, then `token_nll` (what it was before the
    adaptive path existed), op for op; eager on both sides so that no fusion reorders either."""
    config = dict(num_tokens=32, dim=16, emb_dim=8, seq_len=4, depth=2, heads=2, cmem_ratio=2)
    model = ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(3))
    model.train()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 2 * 4 + 1)))
    with jax.disable_jit():
        result = losses(model, StreamBatch.from_windows(tokens, 4))
        memories = None
        for segment in range(2):
            window = slice(4 * segment, 4 * segment + 4)
            logits, memories, aux = model(tokens[:, :-1][:, window], memories)
            nll, count = token_nll(logits, tokens[:, 1:][:, window])
            assert float(result.nll[segment]) == float(nll) and int(result.counts[segment]) == int(count)
            assert float(result.lm_losses[segment]) == float(cross_entropy(logits, tokens[:, 1:][:, window]))
            assert float(result.aux_losses[segment]) == float(aux)
