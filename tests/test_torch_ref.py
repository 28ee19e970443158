"""ct_torch_ref against upstream compressive-transformer-pytorch 0.4.0: same state_dict,
same values for every tiny config x mask kind x mode, checkpoints, input validation."""

from __future__ import annotations

import functools
import json
import pickle

import pytest
import torch
from compressive_transformer_pytorch import AutoregressiveWrapper as UpstreamWrapper
from compressive_transformer_pytorch import CompressiveTransformer as UpstreamTransformer

import ct_torch_ref
from ct_jax.parity import MASK_KINDS, make_inputs
from ct_torch_ref import AutoregressiveWrapper, CompressiveTransformer, Memory
from tests.configs import CONFIGS, randomize_
from tests.tolerances import TORCH_REF_VS_UPSTREAM_ATOL as ATOL
from tests.tolerances import assert_close

# Tiny tensors: a second intra-op thread only adds synchronisation (16x slower matmuls
# on a busy 2-core machine). Values are unaffected: both models run in this process.

N_SEGMENTS = 5  # 4 full segments (compression from the 2nd or 3rd on), then a short one


@functools.cache
def _random_state(name: str) -> dict[str, torch.Tensor]:
    return randomize_(UpstreamTransformer(**CONFIGS[name]), seed=1).state_dict()


def model_pair(name: str, training: bool) -> tuple[torch.nn.Module, CompressiveTransformer]:
    """Upstream model with random weights (pos_emb too) and ct_torch_ref loaded strictly."""
    upstream = UpstreamTransformer(**CONFIGS[name])
    upstream.load_state_dict(_random_state(name), strict=True)
    ours = CompressiveTransformer(**CONFIGS[name])
    ours.load_state_dict(_random_state(name), strict=True)
    return upstream.train(training), ours.train(training)


def assert_memory_close(label: str, got: Memory, expected: Memory) -> None:
    assert_close(f"{label} mem", got.mem, expected.mem, ATOL)
    assert_close(f"{label} compressed_mem", got.compressed_mem, expected.compressed_mem, ATOL)


# --- forward parity ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_forward_matches_upstream(name, mask_kind, mode):
    upstream, ours = model_pair(name, training=mode == "train")
    segments, masks = make_inputs(
        CONFIGS[name], batch=3, n_segments=N_SEGMENTS, seed=2, mask_kind=mask_kind
    )
    up_mem = our_mem = None
    aux_values = []
    for i, (tokens, mask) in enumerate(zip(segments, masks)):
        up_logits, up_mem, up_aux = upstream(tokens, memories=up_mem, mask=mask)
        our_logits, our_mem, our_aux = ours(tokens, memories=our_mem, mask=mask)
        label = f"{name}/{mask_kind}/{mode} segment {i}"
        assert_close(f"{label} logits", our_logits, up_logits, ATOL)
        assert_memory_close(label, our_mem, up_mem)
        assert our_aux.shape == (), f"{label}: aux loss shape {tuple(our_aux.shape)}, expected ()"
        assert_close(f"{label} aux_loss", our_aux, up_aux.reshape(()), ATOL)
        aux_values.append(our_aux.detach().item())
    # The inputs must exercise compression, or the aux comparisons above prove nothing.
    if ours.config["cmem_len"] > 0:
        assert our_mem.compressed_mem.shape[2] > 0, f"{name}: nothing was compressed"
        if mode == "train":
            assert any(a > 0 for a in aux_values), f"{name}: aux loss was 0 on every segment"


def test_random_weights_are_nonzero_everywhere():
    for name in CONFIGS:
        for key, value in _random_state(name).items():
            assert (value != 0).all(), f"{name}: {key} has zero entries after randomize_"


def test_dropout_matches_upstream_under_the_same_seed():
    """Dropout draws happen in upstream's order, so seeded training forwards agree too."""
    config = dict(CONFIGS["defaults"], attn_dropout=0.2, ff_dropout=0.3, attn_layer_dropout=0.1,
                  reconstruction_attn_dropout=0.25)
    upstream = randomize_(UpstreamTransformer(**config), seed=3).train()
    ours = CompressiveTransformer(**config).train()
    ours.load_state_dict(upstream.state_dict(), strict=True)
    segments, masks = make_inputs(config, batch=2, n_segments=4, seed=0, mask_kind="right")
    results = []
    for model in (upstream, ours):
        torch.manual_seed(123)
        memories, outputs = None, []
        for tokens, mask in zip(segments, masks):
            logits, memories, aux = model(tokens, memories=memories, mask=mask)
            outputs.append((logits, memories, aux.reshape(())))
        results.append(outputs)
    for i, (up, our) in enumerate(zip(*results)):
        assert_close(f"segment {i} logits", our[0], up[0], ATOL)
        assert_memory_close(f"segment {i}", our[1], up[1])
        assert_close(f"segment {i} aux_loss", our[2], up[2], ATOL)


@pytest.mark.parametrize("enhanced_recurrence", [True, False])
def test_short_segment_returns_memory_rolled_by_enhanced_recurrence(enhanced_recurrence):
    """Upstream quirk kept: a short segment returns its input memory, after the roll."""
    config = dict(CONFIGS["defaults"], enhanced_recurrence=enhanced_recurrence)
    ours = randomize_(CompressiveTransformer(**config), seed=0).eval()
    upstream = UpstreamTransformer(**config).eval()
    upstream.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, config["num_tokens"], (2, 4 + 4 + 3))
    _, memories, _ = ours(tokens[:, :4])
    _, memories, _ = ours(tokens[:, 4:8], memories=memories)
    _, after_short, _ = ours(tokens[:, 8:], memories=memories)
    _, up_after_short, _ = upstream(tokens[:, 8:], memories=memories)
    shift = -1 if enhanced_recurrence else 0
    assert_close("mem after short segment", after_short.mem, memories.mem.roll(shift, 0), 0.0)
    assert_close("cmem after short segment", after_short.compressed_mem,
                 memories.compressed_mem.roll(shift, 0), 0.0)
    assert_memory_close("upstream after short segment", after_short, up_after_short)


def test_eviction_shorter_than_ratio_compresses_nothing():
    """Upstream's Conv1d raises on 1 evicted slot with ratio 4 (padded to 2 < kernel 4);
    ct_torch_ref compresses nothing on that segment and carries on like upstream after."""
    config = dict(num_tokens=32, dim=16, seq_len=6, depth=2, heads=2, mem_len=11)
    upstream = randomize_(UpstreamTransformer(**config), seed=0).eval()
    ours = CompressiveTransformer(**config).eval()
    ours.load_state_dict(upstream.state_dict())
    tokens = torch.randint(0, 32, (2, 18))
    _, memories, _ = ours(tokens[:, :6])
    _, up_memories, _ = upstream(tokens[:, :6])
    with pytest.raises(RuntimeError, match="Kernel size"):
        upstream(tokens[:, 6:12], memories=up_memories)
    _, memories, _ = ours(tokens[:, 6:12], memories=memories)
    assert memories.mem.shape[2] == 11 and memories.compressed_mem.shape[2] == 0
    # Next segment: 6 evicted, padded to 8 -> 2 slots; upstream agrees from that state.
    our_logits, our_next, _ = ours(tokens[:, 12:], memories=memories)
    up_logits, up_next, _ = upstream(tokens[:, 12:], memories=memories)
    assert our_next.compressed_mem.shape[2] == 2
    assert_close("logits", our_logits, up_logits, ATOL)
    assert_memory_close("memory", our_next, up_next)


# --- parameters and checkpoints ----------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_match_upstream(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    upstream = UpstreamTransformer(**config).state_dict()
    torch.manual_seed(0)
    ours = CompressiveTransformer(**config).state_dict()
    assert [(k, tuple(v.shape)) for k, v in ours.items()] == [
        (k, tuple(v.shape)) for k, v in upstream.items()
    ]
    # Same creation order as upstream: a seeded init gives the same numbers.
    for key in upstream:
        assert torch.equal(ours[key], upstream[key]), f"{name}: seeded init differs at {key}"
    has_emb_projection = config.get("emb_dim", config["dim"]) != config["dim"]
    assert ("to_logits.0.weight" in ours) == has_emb_projection
    assert ("to_model_dim.weight" in ours) == has_emb_projection
    if config.get("mogrify_gru"):
        assert "attn_layers.0.mogrify.Q.0.0.weight" in ours
        assert "ff_layers.0.mogrify.R.0.1.bias" in ours


def test_config_is_normalised_and_json_serialisable():
    model = CompressiveTransformer(num_tokens=10, dim=16, seq_len=4, depth=3, heads=2,
                                   memory_layers=range(3, 1, -1))
    assert model.config["memory_layers"] == [2, 3]
    assert model.config["mem_len"] == 4 and model.config["cmem_len"] == 1
    assert model.config["emb_dim"] == 16
    assert json.loads(json.dumps(model.config)) == model.config
    rebuilt = CompressiveTransformer(**model.config)
    assert rebuilt.config == model.config


@pytest.mark.parametrize("name", ["small_emb_no_recurrence", "top_layer_only_mogrify"])
def test_save_load_round_trip(tmp_path, name):
    _, ours = model_pair(name, training=False)
    ct_torch_ref.save_pretrained(ours, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["config.json", "model.safetensors"], f"unexpected files {files}"
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text()) == ours.config

    loaded = ct_torch_ref.load_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), f"{key} changed in the round trip"
    segments, masks = make_inputs(CONFIGS[name], batch=2, n_segments=3, seed=0, mask_kind="left")
    mem_a = mem_b = None
    for tokens, mask in zip(segments, masks):
        logits_a, mem_a, _ = ours(tokens, memories=mem_a, mask=mask)
        logits_b, mem_b, _ = loaded(tokens, memories=mem_b, mask=mask)
        assert_close("reloaded logits", logits_b, logits_a, 0.0)

    # Saving again over the same directory replaces both files in place.
    ct_torch_ref.save_pretrained(loaded, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == files


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_load_upstream_torch_file_with_weights_only(tmp_path, suffix):
    upstream, _ = model_pair("mogrify_odd_seq", training=False)
    path = tmp_path / f"upstream{suffix}"
    torch.save(upstream.state_dict(), path)
    ours = CompressiveTransformer(**CONFIGS["mogrify_odd_seq"])
    ours.load_state_dict(ct_torch_ref.load_state_dict_file(path), strict=True)
    for key, value in upstream.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)


class _NotATensor:
    pass


def test_load_state_dict_file_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError):
        ct_torch_ref.load_state_dict_file(path)
    with pytest.raises(ValueError, match="must end in"):
        ct_torch_ref.load_state_dict_file(tmp_path / "weights.npz")


# --- wrapper and generation parity -------------------------------------------------------


@pytest.mark.parametrize("max_batch_size", [None, 2])
@pytest.mark.parametrize(
    "name", ["defaults", "residual_uneven_evictions", "top_layer_only_mogrify"]
)
def test_wrapper_losses_match_upstream(name, max_batch_size):
    upstream, ours = model_pair(name, training=True)
    seq_len = CONFIGS[name]["seq_len"]
    n_tokens = 4 * seq_len + seq_len // 2 + 1
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIGS[name]["num_tokens"], (3, n_tokens), generator=generator)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[1, -3:] = False  # a mask as wide as x: the wrappers trim it to x[:, :-1]
    kwargs = dict(max_batch_size=max_batch_size, return_loss=True, mask=mask)
    up_returns = list(UpstreamWrapper(upstream)(tokens, **kwargs))
    our_returns = list(AutoregressiveWrapper(ours)(tokens, **kwargs))
    assert len(our_returns) == len(up_returns) == 5 * (1 if max_batch_size is None else 2)
    for i, (our, up) in enumerate(zip(our_returns, up_returns)):
        assert_close(f"return {i} loss", our.loss, up.loss, ATOL)
        assert_close(f"return {i} aux_loss", our.aux_loss, up.aux_loss.reshape(()), ATOL)
        assert our.is_last_batch == up.is_last_batch


@pytest.mark.parametrize("prime_len", [1, 3, 4])
def test_generate_matches_upstream_for_primes_up_to_seq_len(prime_len):
    upstream, ours = model_pair("defaults", training=True)
    prime = torch.randint(0, 32, (2, prime_len), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected = UpstreamWrapper(upstream).generate(prime, 9)
    torch.manual_seed(5)
    got = AutoregressiveWrapper(ours).generate(prime, 9)
    assert torch.equal(got, expected), f"generated {got.tolist()}, upstream {expected.tolist()}"
    assert ours.training, "generate must restore training mode"


def test_generate_greedy_and_filter_options():
    _, ours = model_pair("defaults", training=False)
    wrapper = AutoregressiveWrapper(ours)
    prime = torch.randint(0, 32, (2, 3), generator=torch.Generator().manual_seed(1))
    logits, _, _ = ours(prime)
    greedy = wrapper.generate(prime, 1, temperature=0)
    assert torch.equal(greedy[:, 0], logits[:, -1].argmax(-1))
    greedy_run = wrapper.generate(prime, 6, temperature=0)
    assert torch.equal(greedy_run, wrapper.generate(prime, 6, temperature=0))
    for filter_fn in ("top_k", "top_p", None, ct_torch_ref.top_k):
        assert wrapper.generate(prime, 6, filter_logits_fn=filter_fn).shape == (2, 6)
    assert wrapper.generate(prime[0], 6).shape == (6,)
    with pytest.raises(ValueError, match="filter_logits_fn"):
        wrapper.generate(prime, 2, filter_logits_fn="top_z")
    with pytest.raises(ValueError, match="temperature"):
        wrapper.generate(prime, 2, temperature=-1.0)


# --- validation --------------------------------------------------------------------------

BASE = dict(num_tokens=16, dim=16, seq_len=4, depth=2, heads=2)


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize(
    "override, error, names",
    [
        (dict(num_tokens=0), ValueError, "num_tokens"),
        (dict(dim=-16), ValueError, "dim"),
        (dict(seq_len=0), ValueError, "seq_len"),
        (dict(depth=0), ValueError, "depth"),
        (dict(heads=0), ValueError, "heads"),
        (dict(cmem_ratio=0), ValueError, "cmem_ratio"),
        (dict(dim=2.5), TypeError, "dim"),
        (dict(heads=3), ValueError, "divisible"),
        (dict(emb_dim=0), ValueError, "emb_dim"),
        (dict(mem_len=3), ValueError, "mem_len"),
        (dict(mem_len=8, cmem_len=1), ValueError, "cmem_len"),
        (dict(memory_layers=[0]), ValueError, "memory_layers"),
        (dict(memory_layers=[3]), ValueError, "memory_layers"),
        (dict(memory_layers=[1.5]), TypeError, "memory_layers"),
        (dict(attn_dropout=1.5), ValueError, "attn_dropout"),
        (dict(reconstruction_loss_weight=float("nan")), ValueError, "reconstruction_loss_weight must be a finite"),
    ],
)
def test_constructor_rejects_invalid_arguments(override, error, names):
    with pytest.raises(error, match=names):
        CompressiveTransformer(**dict(BASE, **override))


def test_constructor_accepts_what_upstream_accepts():
    config = dict(BASE, memory_layers=(2,), mem_len=6, cmem_len=0, cmem_ratio=8)
    UpstreamTransformer(**config)
    assert CompressiveTransformer(**config).config["memory_layers"] == [2]


def _valid_memory(batch: int = 2) -> Memory:
    return Memory(torch.zeros(2, batch, 4, 16), torch.zeros(2, batch, 1, 16))


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(x=torch.zeros(2, 4)), TypeError, "token ids as torch.int64 or torch.int32, got torch.float32"),
        (dict(x=torch.zeros(2, 4, dtype=torch.uint8)), TypeError,
         "token ids as torch.int64 or torch.int32, got torch.uint8"),
        (dict(x=torch.zeros(2, 4, dtype=torch.long).tolist()), TypeError, "torch.Tensor"),
        (dict(x=torch.zeros(2, 5, dtype=torch.long)), ValueError, "seq_len=4"),
        (dict(x=torch.full((2, 4), 16)), ValueError, "num_tokens=16"),
        (dict(x=torch.full((2, 4), -1)), ValueError, "num_tokens=16"),
        (dict(mask=torch.ones(2, 4)), TypeError, "mask"),
        (dict(mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, "mask"),
        (dict(memories=Memory(torch.zeros(1, 2, 4, 16), None)), ValueError, "memories.mem"),
        (dict(memories=Memory(torch.zeros(2, 3, 4, 16), None)), ValueError, "memories.mem"),
        (dict(memories=Memory(torch.zeros(2, 2, 4, 8), None)), ValueError, "memories.mem"),
        (dict(memories=Memory(torch.zeros(2, 2, 5, 16), None)), ValueError, "length <= 4"),
        (dict(memories=Memory(None, torch.zeros(2, 2, 2, 16))), ValueError, "compressed_mem"),
        (dict(memories=torch.zeros(2, 2, 4, 16)), TypeError, "memories"),
    ],
)
def test_forward_rejects_invalid_inputs(kwargs, error, pattern):
    model = CompressiveTransformer(**BASE)
    kwargs = dict(dict(x=torch.zeros(2, 4, dtype=torch.long)), **kwargs)
    with pytest.raises(error, match=pattern):
        model(**kwargs)


def test_forward_accepts_full_and_partial_memories():
    model = CompressiveTransformer(**BASE)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    cases = [  # (tokens, memories, compressed slots after the step: 4 evicted slots / ratio 4)
        (tokens, _valid_memory(), 1),
        (tokens, (None, None), 0),
        (tokens[:, :2], Memory(torch.zeros(2, 2, 3, 16), None), 0),
    ]
    for x, memories, compressed in cases:
        logits, memory, aux = model(x, memories=memories)
        assert logits.shape == (2, x.shape[1], BASE["num_tokens"]), logits.shape
        assert memory.mem.shape[:2] == (2, 2) and memory.mem.shape[2] <= 4, memory.mem.shape
        assert memory.compressed_mem.shape == (2, 2, compressed, 16), memory.compressed_mem.shape
        assert torch.isfinite(logits).all() and torch.isfinite(aux)
        assert (aux.item() > 0) == (compressed > 0), f"aux loss {aux.item()} with {compressed} compressed slots"
