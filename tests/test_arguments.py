"""ct_jax and ct_torch_ref accept the same constructor arguments and reject the others alike:
TypeError for a value of the wrong type, ValueError for a value out of range."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert
from tests.configs import randomize_
from tests.tolerances import JAX_VS_TORCH_ATOL, assert_close

BASE = dict(num_tokens=16, dim=16, seq_len=4, depth=2, heads=2)
DROPOUTS = ("attn_dropout", "ff_dropout", "attn_layer_dropout", "reconstruction_attn_dropout")


def _jax(**kwargs):
    return ct_jax.CompressiveTransformer(**kwargs, rngs=nnx.Rngs(0))


@pytest.mark.usefixtures("unchecked_types")  # the package's own messages
@pytest.mark.parametrize("override, error", [
    *((dict(dim=value), TypeError) for value in (16.0, "16", True, None)),
    *(({name: value}, TypeError) for name in ("num_tokens", "seq_len", "depth", "heads", "cmem_ratio", "emb_dim")
      for value in (2.0, "4")),
    (dict(mem_len=8.0), TypeError),
    (dict(cmem_len="2"), TypeError),
    (dict(memory_layers=[1.5]), TypeError),
    (dict(memory_layers=[True]), TypeError),
    *(({name: value}, TypeError) for name in DROPOUTS for value in ("0.1", True)),
    *(({name: value}, ValueError) for name in ("num_tokens", "seq_len", "depth", "heads", "cmem_ratio", "emb_dim")
      for value in (0, -1)),
    (dict(mem_len=3), ValueError),
    (dict(mem_len=8, cmem_len=1), ValueError),
    (dict(memory_layers=[0]), ValueError),
    (dict(heads=3), ValueError),
    *(({name: value}, ValueError) for name in DROPOUTS for value in (-0.1, 1.5)),
], ids=repr)
def test_both_frameworks_raise_the_same_error(override, error):
    kwargs = dict(BASE, **override)
    with pytest.raises(error):
        ct_torch_ref.CompressiveTransformer(**kwargs)
    with pytest.raises(error):
        _jax(**kwargs)


def test_dropout_one_is_accepted_and_drops_everything_alike():
    """Upstream's nn.Dropout takes p=1 (all zeros, no randomness): a reference checkpoint with
    it loads into ct_jax, and both frameworks compute the same training-mode forward."""
    config = dict(BASE, **{name: 1.0 for name in DROPOUTS})
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=0).train()
    jax_model = convert.from_torch(torch_model.state_dict(), _jax(**config))
    jax_model.train()
    assert jax_model.config.attn_dropout == 1.0
    tokens = torch.randint(0, BASE["num_tokens"], (2, BASE["seq_len"]), generator=torch.Generator().manual_seed(0))
    torch_memory, jax_memory = None, None
    for segment in range(3):  # the third segment compresses: the reconstruction path runs too
        with torch.no_grad():
            logits, torch_memory, aux = torch_model(tokens, memories=torch_memory)
        jax_logits, jax_memory, jax_aux = jax_model(jnp.asarray(tokens.numpy()), jax_memory,
                                                    rngs=nnx.Rngs(dropout=segment))
        assert_close(f"logits of segment {segment}, dropout 1", jax_logits, logits, JAX_VS_TORCH_ATOL)
        assert_close(f"aux loss of segment {segment}, dropout 1", jax_aux, aux.reshape(()), JAX_VS_TORCH_ATOL)
