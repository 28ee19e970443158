"""Upstream 0.4.0 defects that ct_torch_ref fixes.

Each test runs against both implementations: it passes on ct_torch_ref and is a strict
xfail on upstream, so the suite fails if upstream ever stopped showing the defect (the
test would then prove nothing) or if ct_torch_ref regressed.
"""

from __future__ import annotations

from types import SimpleNamespace

import compressive_transformer_pytorch as upstream_package
import compressive_transformer_pytorch.autoregressive_wrapper as upstream_wrapper
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

import ct_torch_ref
from ct_jax.parity import make_inputs
from tests.configs import CONFIGS, randomize_
from tests.tolerances import TORCH_REF_VS_UPSTREAM_ATOL as ATOL
from tests.tolerances import assert_close

OURS = SimpleNamespace(
    CompressiveTransformer=ct_torch_ref.CompressiveTransformer,
    AutoregressiveWrapper=ct_torch_ref.AutoregressiveWrapper,
    top_k=ct_torch_ref.top_k,
)
UPSTREAM = SimpleNamespace(
    CompressiveTransformer=upstream_package.CompressiveTransformer,
    AutoregressiveWrapper=upstream_package.AutoregressiveWrapper,
    top_k=upstream_wrapper.top_k,
)


def against_both(defect: str, upstream_raises: type[BaseException] | tuple = AssertionError):
    """Parametrizes `impl` over ct_torch_ref (must pass) and upstream (must fail)."""
    return pytest.mark.parametrize("impl", [
        pytest.param(OURS, id="ct_torch_ref"),
        pytest.param(UPSTREAM, id="upstream", marks=pytest.mark.xfail(
            strict=True, raises=upstream_raises, reason=f"upstream 0.4.0: {defect}")),
    ])


def _tokens(config: dict, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["num_tokens"], shape, generator=generator)


# 1. to_kv.weight.detach_() froze K/V after the first compression -------------------------


def _should_learn(name: str, memory_layers: list[int]) -> bool:
    """All parameters but the compressors of layers without memory (never used)."""
    if ".compress_mem_fn." in name:
        return int(name.split(".")[1]) + 1 in memory_layers
    return True


@pytest.mark.parametrize("name", ["heads1_subset_mem2x", "top_layer_only_mogrify"])
@against_both("K/V projections stop learning after the first compression")
def test_every_parameter_keeps_learning_through_compression(impl, name):
    config = CONFIGS[name]
    model = randomize_(impl.CompressiveTransformer(**config), seed=0).train()
    wrapper = impl.AutoregressiveWrapper(model)
    memory_layers = model.memory_layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens = _tokens(config, (2, 4 * config["seq_len"] + 2 + 1))
    kv_names = [f"attn_layers.{i - 1}.fn.fn.to_kv.weight" for i in memory_layers]
    for step in range(2):
        optimizer.zero_grad()
        compressed = False
        for ret in wrapper(tokens, return_loss=True):
            (ret.loss + ret.aux_loss.sum()).backward()
            compressed |= bool(ret.aux_loss.detach().sum() > 0)
        assert compressed, "the inputs must trigger compression for this test to mean anything"
        for param_name, param in model.named_parameters():
            if _should_learn(param_name, memory_layers):
                assert param.grad is not None and param.grad.abs().sum() > 0, (
                    f"step {step}: {param_name} got no gradient"
                )
        params = dict(model.named_parameters())
        kv_before = {n: params[n].detach().clone() for n in kv_names}
        optimizer.step()
        for n in kv_names:
            assert not torch.equal(params[n], kv_before[n]), f"step {step}: {n} did not change"


def test_kv_fix_leaves_every_other_gradient_as_upstream():
    config = CONFIGS["heads1_subset_mem2x"]
    upstream = randomize_(UPSTREAM.CompressiveTransformer(**config), seed=0).train()
    ours = OURS.CompressiveTransformer(**config).train()
    ours.load_state_dict(upstream.state_dict())
    tokens = _tokens(config, (2, 4 * config["seq_len"] + 2 + 1))
    for model, impl in ((upstream, UPSTREAM), (ours, OURS)):
        for ret in impl.AutoregressiveWrapper(model)(tokens, return_loss=True):
            (ret.loss + ret.aux_loss.sum()).backward()
    up_params = dict(upstream.named_parameters())
    for name, param in ours.named_parameters():
        if name.endswith("to_kv.weight"):
            continue
        expected = up_params[name].grad
        if expected is None:
            assert param.grad is None, f"{name}: upstream has no gradient, ours has one"
        else:
            assert_close(f"grad {name}", param.grad, expected, ATOL)



@pytest.mark.parametrize("impl", [OURS, UPSTREAM], ids=["ct_torch_ref", "upstream"])
def test_aux_loss_trains_only_the_compressors(impl):
    """The fix must keep the aux path's stop-gradients: K/V, queries and memory get none."""
    config = CONFIGS["heads1_subset_mem2x"]
    model = randomize_(impl.CompressiveTransformer(**config), seed=0).train()
    memories, aux_total = None, 0.0
    for tokens in make_inputs(config, batch=2, n_segments=5, seed=0)[0]:
        _, memories, aux_loss = model(tokens, memories=memories)
        aux_total = aux_total + aux_loss.sum()
    assert aux_total > 0
    aux_total.backward()
    learning = sorted(
        name
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    )
    expected = sorted(
        f"attn_layers.{layer - 1}.fn.fn.compress_mem_fn.conv.{kind}"
        for layer in config["memory_layers"] for kind in ("weight", "bias")
    )
    assert learning == expected

# 2. generate returned too few tokens for primes longer than seq_len ----------------------


@against_both("generate returns too few tokens for primes longer than seq_len")
def test_generate_returns_the_requested_number_of_tokens(impl):
    config = CONFIGS["defaults"]  # seq_len 4
    model = randomize_(impl.CompressiveTransformer(**config), seed=0)
    wrapper = impl.AutoregressiveWrapper(model)
    for prime_len in (1, 3, 4, 5, 8, 9, 11):
        prime = _tokens(config, (2, prime_len))
        for n_new in (1, 4, 9):
            out = wrapper.generate(prime, n_new)
            assert out.shape == (2, n_new), (
                f"prime of {prime_len}, asked {n_new}, got {tuple(out.shape)}"
            )
        assert wrapper.generate(prime[0], 3).shape == (3,)


@pytest.mark.parametrize("prime_len", [5, 8, 11])
def test_generate_long_prime_keeps_upstream_windows_and_memory(prime_len):
    """Same draws as upstream: upstream returns the tail of what ct_torch_ref returns,
    after the (prime_len - current window) tokens it cut off."""
    config = CONFIGS["defaults"]
    upstream = randomize_(UPSTREAM.CompressiveTransformer(**config), seed=0)
    ours = OURS.CompressiveTransformer(**config)
    ours.load_state_dict(upstream.state_dict())
    prime = _tokens(config, (2, prime_len), seed=3)
    n_new = 12
    torch.manual_seed(7)
    expected_tail = UPSTREAM.AutoregressiveWrapper(upstream).generate(prime, n_new)
    torch.manual_seed(7)
    got = OURS.AutoregressiveWrapper(ours).generate(prime, n_new)
    seq_len = config["seq_len"]
    cut = (prime_len - 1) // seq_len * seq_len  # prime tokens before the current window
    assert got.shape == (2, n_new)
    assert expected_tail.shape == (2, n_new - cut), "upstream no longer cuts: revisit this test"
    assert torch.equal(got[:, cut:], expected_tail)


# 3. top_k kept 0 tokens on small vocabularies --------------------------------------------


@against_both("top_k keeps int((1 - thres) * V) tokens, 0 on small vocabularies")
def test_top_k_keeps_at_least_one_token(impl):
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    filtered = impl.top_k(logits, thres=0.9)  # int(0.1 * 5) == 0
    kept = torch.isfinite(filtered)
    assert (kept.sum(-1) == 1).all(), f"kept {kept.sum(-1).tolist()} tokens per row"
    assert torch.equal(filtered.argmax(-1), logits.argmax(-1))
    # End to end: sampling from a 5-token model with the default filter works.
    config = dict(CONFIGS["defaults"], num_tokens=5)
    wrapper = impl.AutoregressiveWrapper(randomize_(impl.CompressiveTransformer(**config), seed=0))
    assert wrapper.generate(_tokens(config, (2, 3)), 4).shape == (2, 4)


def test_top_p_keeps_at_least_one_token():
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    for thres in (0.0, 0.5, 1.0):
        filtered = ct_torch_ref.top_p(logits, thres=thres)
        assert (torch.isfinite(filtered).sum(-1) >= 1).all()
        assert torch.equal(filtered.argmax(-1), logits.argmax(-1))
        kept = torch.isfinite(filtered)
        assert torch.equal(filtered[kept], logits[kept]), "kept logits must be unchanged"


@against_both("temperature 0 divides by zero (NaN probabilities)", RuntimeError)
def test_temperature_zero_is_greedy(impl):
    config = CONFIGS["defaults"]
    model = randomize_(impl.CompressiveTransformer(**config), seed=0).eval()
    prime = _tokens(config, (2, 3))
    out = impl.AutoregressiveWrapper(model).generate(prime, 1, temperature=0.0)
    logits, _, _ = model(prime)
    assert torch.equal(out[:, 0], logits[:, -1].argmax(-1))


# 4. the wrapper's forward was a generator even without return_loss -----------------------


@against_both("AutoregressiveWrapper.forward is a generator even without return_loss")
def test_wrapper_forward_without_loss_returns_the_net_output(impl):
    config = CONFIGS["defaults"]
    model = randomize_(impl.CompressiveTransformer(**config), seed=0)
    tokens = _tokens(config, (2, 4))
    out = impl.AutoregressiveWrapper(model)(tokens)
    assert isinstance(out, tuple) and len(out) == 3, f"got {type(out).__name__}"
    assert_close("logits", out[0], model(tokens)[0], 0.0)


# 5. list (variable-length) inputs crashed ------------------------------------------------


@against_both("list inputs crash (x.shape on a list)", AttributeError)
def test_list_inputs_pad_targets_with_ignore_index(impl):
    config = CONFIGS["defaults"]  # seq_len 4
    model = randomize_(impl.CompressiveTransformer(**config), seed=0).train()
    wrapper = impl.AutoregressiveWrapper(model, pad_value=0, ignore_index=-100)
    seqs = [_tokens(config, (n,), seed=n) for n in (11, 5, 2)]
    returns = list(wrapper(seqs, max_batch_size=2, return_loss=True))

    # Expected: inputs padded with pad_value, targets with ignore_index, mask from lengths.
    inputs = pad_sequence([s[:-1] for s in seqs], batch_first=True, padding_value=0)
    targets = pad_sequence([s[1:] for s in seqs], batch_first=True, padding_value=-100)
    mask = torch.arange(inputs.shape[1])[None, :] < torch.tensor([10, 4, 1])[:, None]
    expected, memories = [], [None, None]
    for xi, xo, mi in zip(inputs.split(4, 1), targets.split(4, 1), mask.split(4, 1)):
        for j, rows in enumerate((slice(0, 2), slice(2, 3))):
            logits, memories[j], _ = model(xi[rows], memories=memories[j], mask=mi[rows])
            valid = xo[rows] != -100
            if valid.any():
                expected.append(F.cross_entropy(logits[valid], xo[rows][valid]))
            else:
                expected.append(torch.zeros(()))
    assert len(returns) == len(expected) == 6
    for i, (ret, loss) in enumerate(zip(returns, expected)):
        assert torch.isfinite(ret.loss), f"return {i}: loss {ret.loss} (all targets are padding)"
        assert_close(f"return {i} loss", ret.loss, loss, 1e-6)

    # Without return_loss: padded with pad_value, mask built from the lengths.
    logits, _, _ = wrapper([s[:4] for s in seqs])
    full_inputs = pad_sequence([s[:4] for s in seqs], batch_first=True, padding_value=0)
    full_mask = torch.arange(4)[None, :] < torch.tensor([4, 4, 2])[:, None]
    assert_close("list forward logits", logits, model(full_inputs, mask=full_mask)[0], 0.0)


# 6. memory_layers=[] crashed opaquely, duplicates were accepted --------------------------


@pytest.mark.parametrize("memory_layers", [[], [1, 1]], ids=["empty", "duplicate"])
@against_both(
    "memory_layers [] crashes at forward, duplicates skew the aux loss", pytest.fail.Exception
)
def test_invalid_memory_layers_are_rejected_at_construction(impl, memory_layers):
    with pytest.raises(ValueError, match="memory_layers"):
        impl.CompressiveTransformer(**dict(CONFIGS["defaults"], memory_layers=memory_layers))


# 7. aux loss had shape (1,) unless every layer computed one ------------------------------


@against_both("aux loss has shape (1,) on some segments")
def test_aux_loss_is_always_a_scalar(impl):
    for name in ("defaults", "heads1_subset_mem2x"):
        config = CONFIGS[name]
        model = randomize_(impl.CompressiveTransformer(**config), seed=0)
        for training in (True, False):
            model.train(training)
            segments, masks = make_inputs(config, batch=2, n_segments=4, seed=0)
            memories = None
            for i, tokens in enumerate(segments):
                _, memories, aux_loss = model(tokens, memories=memories)
                assert aux_loss.shape == (), (
                    f"{name} segment {i}: aux loss shape {tuple(aux_loss.shape)}"
                )
