"""The model config of a bare upstream / ct_torch_ref `state_dict`, read from its keys and shapes.

What shapes the weights is read from them (num_tokens, emb_dim, dim, depth, heads, cmem_ratio,
gru_gated_residual, mogrify_gru, ff_glu, compression, the relative positions, an autoencoder
aux loss). `pos_emb` holds `seq_len + mem_len + cmem_len` rows, so those three need two of
them given (e.g. seq_len and mem_len). Settings the weights do not show (`UNSEEN`: every
layer holds a compressor upstream, so memory_layers is one of them; `TRAINING_ONLY`) take
upstream's defaults unless given.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from ct_jax.config import ModelConfig

_LAYER = re.compile(r"^attn_layers\.(\d+)\.")
_LENGTHS = ("seq_len", "mem_len", "cmem_len")
# Settings that change the forward pass but no weight's shape or key; and those that change only training.
UNSEEN = ("memory_layers", "enhanced_recurrence", "reconstruction_target", "eviction_padding", "clamp_len")
TRAINING_ONLY = ("attn_dropout", "ff_dropout", "attn_layer_dropout", "reconstruction_attn_dropout",
                 "reconstruction_loss_weight", "aux_loss")


def _need(names: list[str], why: str, example: str) -> ValueError:
    return ValueError(f"cannot infer {', '.join(names)} from the weights ({why}): give "
                      f"{'it' if len(names) == 1 else 'them'} with --config, e.g. --config '{example}'")


def _lengths(given: Mapping[str, Any], pos_rows: int | None) -> dict[str, int]:
    """seq_len, mem_len and cmem_len: those given, the third from pos_emb's rows when two are given."""
    known = {name: given[name] for name in _LENGTHS if given.get(name) is not None}
    if pos_rows is None:  # sinusoidal positions: no parameter depends on the lengths
        if "seq_len" not in known:
            raise _need(["seq_len"], "no parameter depends on it with sinusoidal positions", '{"seq_len": 512}')
        return known
    missing = [name for name in _LENGTHS if name not in known]
    if len(missing) > 1:
        raise _need(missing, f"pos_emb holds seq_len + mem_len + cmem_len = {pos_rows} rows",
                    '{"seq_len": 512, "mem_len": 512}')
    if missing:
        known[missing[0]] = pos_rows - sum(known.values())
    return known


def config_from_weights(state: Mapping[str, np.ndarray], given: Mapping[str, Any] | None = None) -> ModelConfig:
    """The config of an upstream-keyed `state`: `given` settings (constructor kwargs) win, the rest is read
    from the keys and shapes, then upstream's defaults. Raises ValueError naming what cannot be inferred."""
    given = dict(given or {})
    if "token_emb.weight" not in state or not any(_LAYER.match(key) for key in state):
        raise ValueError("the weights are not a Compressive Transformer state_dict (no token_emb.weight or "
                         "attn_layers.N keys): give the whole config with --config")
    layers = sorted({int(_LAYER.match(key)[1]) for key in state if _LAYER.match(key)})
    num_tokens, emb_dim = state["token_emb.weight"].shape
    dim = state["attn_layers.0.fn.norm.weight"].shape[0] if "attn_layers.0.fn.norm.weight" in state else None
    inferred: dict[str, Any] = dict(num_tokens=num_tokens, emb_dim=emb_dim, depth=len(layers))
    if dim is not None:
        inferred["dim"] = dim
    sinusoidal = "attn_layers.0.fn.fn.pos_bias_u" in state
    heads_from = "attn_layers.0.fn.fn.pos_bias_u" if sinusoidal else "pos_emb"
    if heads_from in state:
        inferred["heads"] = state[heads_from].shape[0]
    if sinusoidal:
        inferred["relative_positions"] = "sinusoidal"
    compressor = "attn_layers.0.fn.fn.compress_mem_fn."
    if f"{compressor}conv.weight" in state:  # every layer holds one, memory layer or not
        inferred["cmem_ratio"] = state[f"{compressor}conv.weight"].shape[2]
        if f"{compressor}dilated.0.weight" in state:
            inferred["compression"] = "dilated_conv"
        if "attn_layers.0.fn.fn.decompress_mem_fn.conv.weight" in state:
            inferred["aux_loss"] = "autoencoder"
    elif not {"compression", "cmem_ratio"} <= set(given):
        raise _need(["compression", "cmem_ratio"], "no layer holds a convolutional compressor, so the compression "
                    "is a pooling or most_used one", '{"compression": "mean_pool", "cmem_ratio": 4}')
    inferred["gru_gated_residual"] = "attn_layers.0.gru.weight_ih" in state
    inferred["mogrify_gru"] = any(".mogrify." in key for key in state)
    w1, w2 = state.get("ff_layers.0.fn.fn.w1.weight"), state.get("ff_layers.0.fn.fn.w2.weight")
    if w1 is not None and w2 is not None:
        inferred["ff_glu"] = w1.shape[0] == 2 * w2.shape[1]  # GLU: w1 makes both halves of the gate
    missing = [name for name in ("dim", "heads") if name not in inferred and name not in given]
    if missing:
        raise _need(missing, "their parameters are absent", '{"dim": 512, "heads": 8}')
    pos_rows = state["pos_emb"].shape[1] if "pos_emb" in state and not sinusoidal else None
    return ModelConfig.from_kwargs({**inferred, **given, **_lengths(given, pos_rows)})
