"""The paper-faithful options, checked directly on ct_torch_ref (the JAX side is held to it
by tests/test_parity.py): each option does what docs/paper-options.md says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ct_jax.options
import ct_torch_ref.options
from ct_jax.config import ModelConfig
from ct_torch_ref import AutoregressiveWrapper, CompressiveTransformer
from ct_torch_ref.attention import SelfAttention, full_attn
from ct_torch_ref.compression import dilation_rates, reads_per_slot, select_most_used
from tests.configs import randomize_

DIM, HEADS = 8, 2


def _attention(seq_len: int, mem_len: int, ratio: int, seed: int = 0, **options) -> SelfAttention:
    """A SelfAttention with random weights (cmem_len generous), in training mode."""
    torch.manual_seed(seed)
    attn = SelfAttention(DIM, seq_len, mem_len, cmem_len=8, cmem_ratio=ratio, heads=HEADS, **options)
    return randomize_(attn, seed=seed).train()


def _full_memory(b: int, mem_len: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(b, mem_len, DIM, generator=generator), torch.zeros(b, 0, DIM)


def _segment(b: int, t: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, t, DIM, generator=torch.Generator().manual_seed(seed))


# --- options: names, values, errors -------------------------------------------------------


def test_option_tables_agree_and_defaults_are_upstream():
    assert ct_jax.options.OPTIONS == ct_torch_ref.options.OPTIONS
    assert ct_torch_ref.options.DEFAULTS == dict(
        compression="conv", reconstruction_target="memory", aux_loss="attention",
        eviction_padding="upstream", relative_positions="learned",
    )


@pytest.mark.parametrize("name", sorted(ct_torch_ref.options.OPTIONS))
def test_bad_value_names_the_option_and_lists_the_allowed(name):
    base = dict(num_tokens=8, dim=DIM, seq_len=2, depth=1, heads=HEADS)
    allowed = ct_torch_ref.options.OPTIONS[name]
    for build in (lambda **kw: CompressiveTransformer(**kw), lambda **kw: ModelConfig(**kw)):
        with pytest.raises(ValueError) as info:
            build(**base, **{name: "nope"})
        message = str(info.value)
        assert name in message and "nope" in message
        assert all(repr(value) in message for value in allowed), message


def test_most_used_with_autoencoder_is_rejected_in_both():
    kwargs = dict(num_tokens=8, dim=DIM, seq_len=2, depth=1, heads=HEADS, compression="most_used",
                  aux_loss="autoencoder")
    for build in (CompressiveTransformer, ModelConfig):
        with pytest.raises(ValueError, match="most_used"):
            build(**kwargs)


def test_options_are_stored_in_the_config():
    model = CompressiveTransformer(num_tokens=8, dim=DIM, seq_len=2, depth=1, heads=HEADS,
                                   compression="max_pool", relative_positions="sinusoidal")
    assert model.config["compression"] == "max_pool"
    assert model.config["relative_positions"] == "sinusoidal"
    assert CompressiveTransformer(**model.config).config == model.config


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize("value,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError),
                                         ("8", TypeError)])
def test_bad_clamp_len_is_named_in_both(value, error):
    kwargs = dict(num_tokens=8, dim=DIM, seq_len=2, depth=1, heads=HEADS, relative_positions="sinusoidal")
    for build in (CompressiveTransformer, ModelConfig):
        with pytest.raises(error, match=r"clamp_len must be a positive int, got") as info:
            build(**kwargs, clamp_len=value)
        assert repr(value) in str(info.value)


def test_clamp_len_with_learned_positions_is_refused_in_both():
    """Learned positions read a drifting table row per distance (docs/paper-options.md): no clamp."""
    kwargs = dict(num_tokens=8, dim=DIM, seq_len=2, depth=1, heads=HEADS, clamp_len=4)
    for build in (CompressiveTransformer, ModelConfig):
        with pytest.raises(ValueError, match=r"clamp_len=4 needs relative_positions='sinusoidal'.*'learned'"):
            build(**kwargs)


def test_trained_reach_is_the_farthest_distance_read():
    config = ModelConfig(num_tokens=8, dim=DIM, seq_len=4, depth=1, heads=HEADS, mem_len=6, cmem_len=3,
                         relative_positions="sinusoidal")
    assert config.trained_reach == 4 + 6 + 3 - 1
    assert ModelConfig(**{**config.to_kwargs(), "clamp_len": 5}).trained_reach == 5
    assert ModelConfig(**{**config.to_kwargs(), "clamp_len": 50}).trained_reach == 12


# --- compression ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,reduce", [("mean_pool", torch.mean), ("max_pool", torch.amax)])
@pytest.mark.parametrize("padding", ["upstream", "exact"])
def test_pooling_is_the_mean_or_max_of_the_evicted_windows(kind, reduce, padding):
    # mem_len 6, seq_len 5, ratio 2: 5 slots are evicted; upstream pads 1 (3 windows), exact
    # pads 1 too; seq_len 3 / ratio 2 below gives different windows in the other test.
    attn = _attention(seq_len=5, mem_len=6, ratio=2, compression=kind, eviction_padding=padding).eval()
    mem, cmem = _full_memory(2, 6)
    _, memory, _ = attn(_segment(2, 5), memories=(mem, cmem))
    evicted = mem[:, :5]
    padded = F.pad(evicted, (0, 0, 1, 0))  # 5 % 2 == -5 % 2 == 1 zero on the left
    expected = reduce(padded[:, :6].reshape(2, 3, 2, DIM), dim=2)
    torch.testing.assert_close(memory.compressed_mem, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["conv", "mean_pool", "max_pool", "dilated_conv"])
def test_exact_padding_reads_every_evicted_slot_upstream_drops_some(kind):
    # 3 slots evicted, ratio 4: upstream pads 3 % 4 = 3 zeros and its one window reads only
    # the first evicted slot; exact pads -3 % 4 = 1 and reads all three.
    def sensitivity(padding: str) -> list[bool]:
        attn = _attention(seq_len=3, mem_len=4, ratio=4, compression=kind, eviction_padding=padding).eval()
        mem, cmem = _full_memory(1, 4)
        x = _segment(1, 3)
        _, base, _ = attn(x, memories=(mem, cmem))
        changed = []
        for slot in range(3):  # the evicted slots are mem[:, :3]
            bumped = mem.clone()
            bumped[:, slot] += 1.0 + bumped[:, slot].abs()  # changes the max too
            _, memory, _ = attn(x, memories=(bumped, cmem))
            changed.append(not torch.equal(memory.compressed_mem, base.compressed_mem))
        return changed

    assert sensitivity("exact") == [True, True, True]
    assert sensitivity("upstream") == [True, False, False]


def test_dilated_conv_follows_its_written_definition():
    # docs/paper-options.md: per window w (ratio slots), h_0 = w; for each dilation r_k in
    # 1, 2, 4, ... < ratio: h_k[i] = relu(A_k h_{k-1}[i - r_k] + B_k h_{k-1}[i]) (zero
    # before the window's start); then the strided conv of upstream over h_K.
    ratio = 4
    assert dilation_rates(4) == [1, 2] and dilation_rates(1) == [] and dilation_rates(5) == [1, 2, 4]
    attn = _attention(seq_len=4, mem_len=4, ratio=ratio, compression="dilated_conv").eval()
    mem, cmem = _full_memory(1, 4)
    _, memory, _ = attn(_segment(1, 4), memories=(mem, cmem))
    hidden = mem[0]  # the one window: all 4 evicted slots, (r, d)
    for rate, conv in zip(dilation_rates(ratio), attn.compress_mem_fn.dilated):
        older, newer = conv.weight[:, :, 0], conv.weight[:, :, 1]  # (out, in)
        shifted = torch.cat([torch.zeros(rate, DIM), hidden[:-rate]])
        hidden = torch.relu(shifted @ older.T + hidden @ newer.T)
    final = attn.compress_mem_fn.conv
    expected = torch.einsum("oir,ri->o", final.weight, hidden) + final.bias
    torch.testing.assert_close(memory.compressed_mem[0, -1], expected, rtol=1e-5, atol=1e-6)


def test_most_used_keeps_the_highest_mean_attention_slots_in_order():
    evicted = torch.arange(6.0)[None, :, None].expand(2, 6, 3)
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    kept = select_most_used(evicted, scores, 3)[..., 0]
    assert kept.tolist() == [[1.0, 3.0, 4.0], [0.0, 1.0, 2.0]]  # ties: the older slot wins
    # reads: with mem_len 5, seq_len 2, a full memory's places 0..4 were read 3,2,2,1,1 times
    assert reads_per_slot(5, 5, 2).tolist() == [3, 2, 2, 1, 1]
    assert reads_per_slot(3, 5, 2).tolist() == [2, 1, 1]


def test_most_used_compressed_slots_are_evicted_slots_and_usage_is_carried():
    config = dict(num_tokens=16, dim=DIM, seq_len=3, depth=2, heads=HEADS, mem_len=6, cmem_len=4,
                  cmem_ratio=2, compression="most_used")
    model = randomize_(CompressiveTransformer(**config), seed=3).eval()
    tokens = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(0))
    memory = None
    for index, segment in enumerate(tokens.split(3, dim=1)):
        previous = memory
        _, memory, _ = model(segment, memories=memory)
        assert memory.mem_usage.shape == memory.mem.shape[:3]
        if index == 2:  # 3 slots evicted from a full memory of 6: 2 kept (3 + 1 padded) / 2
            rolled = torch.roll(previous.mem, -1, 0)  # enhanced recurrence
            evicted = rolled[:, :, :3]
            new = memory.compressed_mem[:, :, -2:]
            for layer in range(2):
                for row in range(2):
                    match = [(evicted[layer, row] == slot).all(-1).nonzero().flatten().tolist()
                             for slot in new[layer, row]]
                    assert all(len(m) == 1 for m in match), "compressed slots must be evicted slots"
                    assert match[0][0] < match[1][0], "kept slots keep their order"
            # slots read once carry attention; the 3 just stored have not been read yet
            assert (previous.mem_usage[..., :3] > 0).all() and (previous.mem_usage[..., 3:] == 0).all()


# --- reconstruction target and aux losses --------------------------------------------------


def test_evicted_target_is_attention_over_exactly_the_evicted_slots():
    attn = _attention(seq_len=2, mem_len=4, ratio=2, reconstruction_target="evicted")
    mem, cmem = _full_memory(2, 4)
    x = _segment(2, 2)
    _, memory, aux = attn(x, memories=(mem, cmem))
    q = attn._split_heads(attn.to_q(x))
    k, v = map(attn._split_heads, attn.to_kv(mem[:, :2]).chunk(2, dim=-1))  # the 2 evicted
    ck, cv = map(attn._split_heads, attn.to_kv(memory.compressed_mem[:, -1:]).chunk(2, dim=-1))
    expected = F.mse_loss(full_attn(q, k, v), full_attn(q, ck, cv))
    torch.testing.assert_close(aux, expected, rtol=1e-6, atol=0)
    upstream_target = _attention(seq_len=2, mem_len=4, ratio=2)(x, memories=(mem, cmem))[2]
    assert not torch.isclose(aux, upstream_target)


def test_aux_none_is_zero_and_attention_is_not():
    mem, cmem = _full_memory(2, 4)
    x = _segment(2, 2)
    assert float(_attention(2, 4, 2, aux_loss="none")(x, memories=(mem, cmem))[2].detach()) == 0.0
    assert float(_attention(2, 4, 2)(x, memories=(mem, cmem))[2].detach()) > 0.0


@pytest.mark.parametrize("kind", ["conv", "dilated_conv"])
def test_autoencoder_trains_only_compressor_and_decoder(kind):
    attn = _attention(seq_len=2, mem_len=4, ratio=2, compression=kind, aux_loss="autoencoder")
    mem, cmem = _full_memory(2, 4)
    _, memory, aux = attn(_segment(2, 2), memories=(mem, cmem))
    windows = mem[:, :2].detach()  # 2 evicted, no padding: one window
    decoded = attn.decompress_mem_fn(memory.compressed_mem[:, -1:])
    torch.testing.assert_close(aux, F.mse_loss(decoded, windows), rtol=1e-6, atol=0)
    aux.backward()
    for name, param in attn.named_parameters():
        learns = name.startswith(("compress_mem_fn", "decompress_mem_fn"))
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert has_grad == learns, f"{name}: gradient {'missing' if learns else 'unexpected'}"


# --- relative positions -------------------------------------------------------------------


def _sinusoidal(mem_len: int, cmem_len: int) -> CompressiveTransformer:
    return CompressiveTransformer(num_tokens=16, dim=DIM, seq_len=2, depth=2, heads=HEADS, mem_len=mem_len,
                                  cmem_len=cmem_len, cmem_ratio=2, relative_positions="sinusoidal")


def test_sinusoidal_weights_load_into_a_larger_memory_which_reads_the_extra_slots():
    small = randomize_(_sinusoidal(mem_len=2, cmem_len=1), seed=4).eval()
    assert not any("pos_emb" in name for name, _ in small.named_parameters())
    large = _sinusoidal(mem_len=6, cmem_len=6).eval()
    large.load_state_dict(small.state_dict(), strict=True)
    tokens = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(1))
    small_memory = large_memory = None
    for index, segment in enumerate(tokens.split(2, dim=1)):
        large_before = large_memory
        small_logits, small_memory, _ = small(segment, memories=small_memory)
        large_logits, large_memory, _ = large(segment, memories=large_memory)
        if index < 2:  # both hold the same memory (at most 2 slots): same function
            torch.testing.assert_close(large_logits, small_logits, rtol=1e-5, atol=1e-5)
    assert large_before.mem.shape[2] == 6 > small_memory.mem.shape[2]
    # The oldest slot, which the small model no longer holds uncompressed, is read.
    bumped = large_before.mem.clone()
    bumped[:, :, 0] += 1.0
    again, _, _ = large(segment, memories=type(large_before)(bumped, large_before.compressed_mem))
    assert not torch.allclose(again, large_logits)


# --- memory gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("memory_gradients", [False, True])
def test_memory_gradients_train_what_earlier_segments_stored(memory_gradients):
    # aux none: the compressor learns only through memory gradients of later LM losses.
    config = dict(num_tokens=16, dim=DIM, seq_len=2, depth=1, heads=HEADS, mem_len=2, cmem_len=2,
                  cmem_ratio=2, aux_loss="none")
    wrapper = AutoregressiveWrapper(randomize_(CompressiveTransformer(**config), seed=5),
                                    memory_gradients=memory_gradients)
    tokens = torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(2))
    if memory_gradients:
        sum(r.loss + r.aux_loss for r in wrapper(tokens, return_loss=True)).backward()
    else:
        for r in wrapper(tokens, return_loss=True):
            (r.loss + r.aux_loss).backward()
    grad = wrapper.net.attn_layers[0].fn.fn.compress_mem_fn.conv.weight.grad
    assert (grad is not None and bool(grad.abs().sum() > 0)) == memory_gradients
