"""cmem_len 0 with a full-size memory (a plain Transformer-XL) as a first-class model: the forward against
ct_torch_ref, the converter both ways and its files, the memory conversion, and evaluation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert, evaluation, parity
from ct_jax.memory import Memory
from tests.configs import TRANSFORMER_XL, forward, loaded_model, randomize_


@pytest.fixture(scope="module")
def models():
    """(ct_torch_ref model with random weights, its JAX copy)."""
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**TRANSFORMER_XL), seed=3)
    return torch_model, loaded_model(TRANSFORMER_XL, torch_model.state_dict())


@pytest.mark.parametrize("mask_kind", [None, "right"])
def test_forward_matches_ct_torch_ref_with_no_compressed_memory(models, mask_kind):
    torch_model, jax_model = models
    rows = parity.compare(torch_model, jax_model, segments=6, batch=2, mask_kind=mask_kind)
    missed = [row for row in rows if not row.ok]
    assert not missed, parity.format_table(missed)
    compressed = [row for row in rows if row.output == "compressed_mem"]
    assert len(compressed) == 12, "both modes, every segment compared"
    aux = [row for row in rows if row.output == "aux_loss"]
    assert all(row.max_abs_diff == 0 for row in aux), "no compressed memory: no aux loss on either side"


def test_memory_stays_plain_and_drops_what_it_evicts(models):
    _, jax_model = models
    tokens = jax.numpy.asarray(np.random.default_rng(0).integers(0, TRANSFORMER_XL["num_tokens"], (2, 4)))
    memories = None
    for _ in range(4):  # 16 tokens through 8 slots: evictions every segment from the third on
        _, memories, aux = forward(jax_model, tokens, memories)
    assert memories.compressed_mem.shape == (2, 2, 0, 16) and int(memories.compressed_mem_valid.max()) == 0
    assert memories.mem_valid.tolist() == [8, 8] and float(aux) == 0.0
    torch_memory = convert.memory_to_torch(memories)
    assert tuple(torch_memory.compressed_mem.shape) == (2, 2, 0, 16)
    back = convert.memory_from_torch(torch_memory, jax_model)
    for got, expected in zip(jax.tree.leaves(back), jax.tree.leaves(memories)):
        np.testing.assert_array_equal(got, expected)


def test_converter_both_ways_and_its_files(models, tmp_path):
    torch_model, jax_model = models
    state = convert.to_torch(jax_model)
    fresh_torch = ct_torch_ref.CompressiveTransformer(**TRANSFORMER_XL)
    fresh_torch.load_state_dict(state, strict=True)
    for key, value in torch_model.state_dict().items():
        np.testing.assert_array_equal(fresh_torch.state_dict()[key].numpy(), value.numpy(), err_msg=key)
    convert.save_pretrained(jax_model, tmp_path / "model")
    loaded = convert.load_pretrained(tmp_path / "model")
    assert loaded.config == jax_model.config and loaded.config.cmem_len == 0
    for got, expected in zip(jax.tree.leaves(nnx.state(loaded, nnx.Param)),
                             jax.tree.leaves(nnx.state(jax_model, nnx.Param))):
        np.testing.assert_array_equal(got, expected)
    reference = ct_torch_ref.load_pretrained(tmp_path / "model")
    assert reference.cmem_len == 0


def test_evaluation_knockout_of_the_absent_compressed_memory_changes_nothing(models):
    _, jax_model = models
    jax_model.eval()
    data = np.random.default_rng(1).integers(0, TRANSFORMER_XL["num_tokens"], 120).astype(np.uint8)
    plain = evaluation.stream_eval(jax_model, data, 2, segments_per_call=8, progress=False, attention_mass=True)
    knocked = evaluation.stream_eval(jax_model, data, 2, segments_per_call=8, progress=False, knockout="compressed")
    assert knocked.total == plain.total
    assert np.all(plain.attention_mass[:, 0] == 0) and np.all(plain.attention_mass[:, 1] > 0)
    assert plain.bucket_edges == (4, 12, 12) and plain.bucket_count[2] == 0, "no compressed reach"


def test_memory_empty_has_zero_size_compressed_buffers():
    memories = Memory.empty(ct_jax.ModelConfig.from_kwargs(TRANSFORMER_XL), 3)
    assert memories.compressed_mem.shape == (2, 3, 0, 16)
