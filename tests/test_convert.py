"""Converter: strict, loss-free weights both ways, memory hand-over, checkpoint files, scripts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ct_jax
import ct_torch_ref
from ct_jax import convert
from ct_jax.commands import convert as convert_command
from ct_jax.commands import parity
from ct_jax.config_from_weights import TRAINING_ONLY, UNSEEN, config_from_weights
from tests.configs import CONFIGS, forward, randomize_

ROOT = Path(__file__).resolve().parents[1]


def _jax_model(name: str, seed: int = 0) -> ct_jax.CompressiveTransformer:
    return ct_jax.CompressiveTransformer(**CONFIGS[name], rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_to_jax_to_torch_is_bit_exact(name):
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**CONFIGS[name]), seed=3)
    original = torch_model.state_dict()
    back = convert.to_torch(convert.from_torch(original, _jax_model(name)))
    assert list(back) == list(original) or sorted(back) == sorted(original)
    for key, value in original.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), f"{key} changed in the round trip"
    # and the upstream package loads what we export, strictly
    import compressive_transformer_pytorch as upstream

    upstream.CompressiveTransformer(**CONFIGS[name]).load_state_dict(back, strict=True)


@pytest.mark.parametrize("name", ["defaults", "mogrify_odd_seq", "small_emb_no_recurrence"])
def test_jax_to_torch_to_jax_is_bit_exact(name):
    model = _jax_model(name, seed=4)
    other = convert.from_torch(convert.to_torch(model), _jax_model(name, seed=9))
    for key, value in convert.to_numpy(model).items():
        np.testing.assert_array_equal(convert.to_numpy(other)[key], value, err_msg=key)


def test_strict_loading_lists_every_problem_and_changes_nothing():
    model = _jax_model("defaults")
    before = convert.to_numpy(model)
    state = convert.to_torch(_jax_model("defaults", seed=1))
    del state["pos_emb"]
    state["surprise.weight"] = torch.zeros(3)
    state["to_logits.1.bias"] = torch.zeros(7)
    with pytest.raises(ValueError) as error:
        convert.from_torch(state, model)
    message = str(error.value)
    assert "missing keys ['pos_emb']" in message
    assert "unexpected keys ['surprise.weight']" in message
    assert "to_logits.1.bias: expected (32,), got (7,)" in message
    for key, value in convert.to_numpy(model).items():
        np.testing.assert_array_equal(value, before[key], err_msg=f"{key} changed by a failed load")


def test_reads_the_old_bias_free_mogrifier_layout():
    """mogrifier < 0.0.5 stored `mogrify.Q.0.weight` / `Q.1.weight` without biases."""
    name = "mogrify_odd_seq"
    torch_model = randomize_(ct_torch_ref.CompressiveTransformer(**CONFIGS[name]), seed=5)
    with torch.no_grad():
        for key, param in torch_model.named_parameters():
            if ".mogrify." in key and key.endswith("bias"):
                param.zero_()
    old = {}
    for key, value in torch_model.state_dict().items():
        if ".mogrify." in key:
            if key.endswith("bias"):
                continue
            key = key.replace(".0.0.weight", ".0.weight").replace(".0.1.weight", ".1.weight")
        old[key] = value
    assert any(k.endswith("mogrify.Q.1.weight") for k in old)
    model = convert.from_torch(old, _jax_model(name))
    exported = convert.to_torch(model)
    for key, value in torch_model.state_dict().items():
        assert torch.equal(exported[key], value), key


def test_checkpoint_directories_are_shared_by_both_frameworks(tmp_path):
    name = "top_layer_only_mogrify"
    jax_model = _jax_model(name, seed=2)
    convert.save_pretrained(jax_model, tmp_path / "from_jax")
    assert sorted(p.name for p in (tmp_path / "from_jax").iterdir()) == ["config.json", "model.safetensors"]
    torch_model = ct_torch_ref.load_pretrained(tmp_path / "from_jax")
    for key, value in convert.to_numpy(jax_model).items():
        np.testing.assert_array_equal(torch_model.state_dict()[key].numpy(), value, err_msg=key)
    ct_torch_ref.save_pretrained(torch_model, tmp_path / "from_torch")
    again = convert.load_pretrained(tmp_path / "from_torch")
    assert again.config == jax_model.config
    for key, value in convert.to_numpy(jax_model).items():
        np.testing.assert_array_equal(convert.to_numpy(again)[key], value, err_msg=key)


def test_broken_files_are_refused_with_a_reason(tmp_path):
    model = _jax_model("defaults")
    convert.save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        convert.load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        convert.read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_tokens": 32, "dim": 16, "seq_len": 4, "depth": 2,
                                                      "heads": 3}))
    with pytest.raises(ValueError, match="divisible by heads"):
        convert.read_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.read_config(tmp_path / "nowhere")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickles_that_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"pos_emb": _Payload()}, path, pickle_module=pickle)
    with pytest.raises(ValueError, match="weights_only"):
        convert.read_state_dict(path)


def test_config_mismatching_the_weights_is_reported(tmp_path):
    convert.save_pretrained(_jax_model("defaults"), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing keys \[.*attn_layers\.2\."):
        convert.load_pretrained(tmp_path)


def test_memory_from_torch_checks_its_input():
    model = _jax_model("heads1_subset_mem2x")  # 2 memory layers, mem_len 8, cmem_len 4, dim 16
    good = ct_torch_ref.Memory(torch.zeros(2, 3, 8, 16), torch.zeros(2, 3, 1, 16))
    memory = convert.memory_from_torch(good, model)
    assert memory.mem.shape == (2, 3, 8, 16) and memory.compressed_mem_valid.tolist() == [1, 1, 1]
    cases = [
        (ct_torch_ref.Memory(torch.zeros(3, 3, 8, 16), torch.zeros(3, 3, 0, 16)), "must have shape"),
        (ct_torch_ref.Memory(torch.zeros(2, 3, 9, 16), torch.zeros(2, 3, 0, 16)), "more than its capacity 8"),
        (ct_torch_ref.Memory(torch.zeros(2, 3, 4, 16), torch.zeros(2, 3, 1, 16)), "while memory is not full"),
        (ct_torch_ref.Memory(torch.zeros(2, 3, 8, 16), torch.zeros(2, 2, 1, 16)), "batch"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            convert.memory_from_torch(bad, model)


def test_memory_to_torch_has_upstream_shapes():
    model = _jax_model("heads1_subset_mem2x")
    _, memory, _ = forward(model, jnp.zeros((2, 4), jnp.int32))
    torch_memory = convert.memory_to_torch(memory)
    assert tuple(torch_memory.mem.shape) == (2, 2, 4, 16)
    assert tuple(torch_memory.compressed_mem.shape) == (2, 2, 0, 16)


def test_convert_and_parity_scripts(tmp_path, capsys):
    config = {"num_tokens": 40, "dim": 16, "seq_len": 4, "depth": 2, "heads": 2, "mem_len": 6, "cmem_len": 3,
              "cmem_ratio": 2}
    # Random weights everywhere: upstream initialises pos_emb to zeros, which would hide positional errors.
    source = randomize_(ct_torch_ref.CompressiveTransformer(**config), seed=0)
    assert source.pos_emb.abs().min() > 0
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "config.json").write_text(json.dumps(config))

    status = convert_command.main(["--from", str(tmp_path / "weights.pt"), "--config", str(tmp_path / "config.json"),
                                   "--to", str(tmp_path / "ckpt")])
    assert status == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out and (tmp_path / "ckpt" / "model.safetensors").is_file()
    status = convert_command.main(["--from", str(tmp_path / "ckpt"), "--to", str(tmp_path / "back.pt")])
    assert status == 0, capsys.readouterr().err
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back[key], value) for key, value in source.state_dict().items())

    status = parity.main(["--checkpoint", str(tmp_path / "ckpt"), "--segments", "4"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "| eval | 3 | logits |" in out and "MISS" not in out


def _given(config: dict) -> dict:
    """What a bare state_dict's user gives: seq_len and mem_len, and the settings no weight shows."""
    full = ct_jax.ModelConfig(**config)
    return dict(seq_len=full.seq_len, mem_len=full.mem_len,
                **{name: config[name] for name in UNSEEN + TRAINING_ONLY if name in config})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_config_of_a_saved_reference_state_dict_is_read_from_its_shapes(tmp_path, name):
    torch.save(ct_torch_ref.CompressiveTransformer(**CONFIGS[name]).state_dict(), tmp_path / "weights.pt")
    state = convert.read_state_dict(tmp_path / "weights.pt")
    assert config_from_weights(state, _given(CONFIGS[name])) == ct_jax.ModelConfig(**CONFIGS[name])


@pytest.mark.parametrize("options", [dict(compression="dilated_conv", aux_loss="autoencoder"),
                                     dict(relative_positions="sinusoidal")])
def test_paper_options_that_shape_the_weights_are_read_from_them(options):
    config = dict(CONFIGS["defaults"], **options)
    state = convert.to_numpy(ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0)))
    given = dict(seq_len=4) if "relative_positions" in options else dict(seq_len=4, mem_len=4)  # nothing else
    assert config_from_weights(state, given) == ct_jax.ModelConfig(**config)


def test_convert_reads_an_upstream_state_dict_naming_what_it_cannot_infer(tmp_path, capsys):
    """README's example: an upstream file alone; seq_len and mem_len are the only settings to give."""
    import compressive_transformer_pytorch as upstream

    config = dict(num_tokens=40, dim=16, seq_len=4, depth=3, heads=4, mem_len=8, cmem_ratio=2, memory_layers=[2, 3],
                  ff_glu=True, mogrify_gru=True)
    torch.save(upstream.CompressiveTransformer(**config).state_dict(), tmp_path / "upstream.pt")
    status = convert_command.main(["--from", str(tmp_path / "upstream.pt"), "--to", str(tmp_path / "ckpt")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot infer seq_len, mem_len, cmem_len from the weights (pos_emb holds "
                               "seq_len + mem_len + cmem_len = 16 rows): give them with --config"), lines[0]
    assert not (tmp_path / "ckpt").exists()

    given = json.dumps(dict(seq_len=4, mem_len=8, memory_layers=[2, 3]))
    assert convert_command.main(["--from", str(tmp_path / "upstream.pt"), "--config", given, "--to",
                                 str(tmp_path / "ckpt")]) == 0
    assert "not shown by them, upstream's defaults (--config sets them): enhanced_recurrence=True" in \
        capsys.readouterr().out
    assert convert.read_config(tmp_path / "ckpt") == ct_jax.ModelConfig(**config)


def test_pooling_compressors_need_their_settings_given():
    config = dict(CONFIGS["defaults"], compression="mean_pool", cmem_ratio=2)
    state = convert.to_numpy(ct_jax.CompressiveTransformer(**config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"cannot infer compression, cmem_ratio from the weights .* --config"):
        config_from_weights(state, _given(config))
    given = dict(_given(config), compression="mean_pool", cmem_ratio=2)
    assert config_from_weights(state, given) == ct_jax.ModelConfig(**config)


def test_from_torch_refuses_what_is_not_a_state_dict_and_non_finite_weights(unchecked_types):
    model = _jax_model("defaults")
    with pytest.raises(TypeError, match="state_dict must be a mapping of parameter names .*got NoneType"):
        convert.from_torch(None, model)
    with pytest.raises(TypeError, match="model must be a ct_jax.CompressiveTransformer, got dict"):
        convert.from_torch({}, {})
    state = convert.to_numpy(model)
    before = state["token_emb.weight"].copy()
    poisoned = dict(state, **{"to_logits.1.bias": np.full_like(state["to_logits.1.bias"], np.nan)})
    poisoned["token_emb.weight"] = before + 1
    with pytest.raises(ValueError, match=r"weights holding NaN or Inf \['to_logits.1.bias'\]"):
        convert.from_torch(poisoned, model)
    np.testing.assert_array_equal(convert.to_numpy(model)["token_emb.weight"], before, err_msg="changed on refusal")
    convert.from_torch(poisoned, model, allow_non_finite=True)
    assert np.isnan(convert.to_numpy(model)["to_logits.1.bias"]).all()


def test_model_configs_from_json_are_checked(tmp_path):
    with pytest.raises(TypeError, match=r"must be a mapping of constructor keywords \(a JSON object\), got list"):
        convert.config_from_json("[1, 2]")
    with pytest.raises(TypeError, match=r"unknown model arguments \['colour'\]"):
        convert.config_from_json('{"num_tokens": 8, "dim": 4, "seq_len": 2, "depth": 1, "heads": 1, "colour": 1}')
    with pytest.raises(ValueError, match="is not valid JSON"):
        convert.config_from_json("{nope")
    with pytest.raises(FileNotFoundError, match="neither JSON text nor a file"):
        convert.config_from_json(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="reconstruction_loss_weight must be a finite number, got nan"):
        ct_jax.ModelConfig(num_tokens=8, dim=4, seq_len=2, depth=1, heads=1, reconstruction_loss_weight=float("nan"))


def test_a_training_folder_loads_through_its_model_folder(tmp_path):
    model = _jax_model("defaults")
    convert.save_pretrained(model, tmp_path / "run" / "model")
    again = convert.load_pretrained(tmp_path / "run")
    assert again.config == model.config
    with pytest.raises(FileNotFoundError, match="nor in its model/ folder"):
        convert.read_config(tmp_path)


def _state_besides_params(model: ct_jax.CompressiveTransformer) -> list[np.ndarray]:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x) for x in leaves]


def test_a_model_for_weights_holds_shapes_only_unless_it_has_dropout_streams():
    """Loading needs no random init; a model with dropout keeps its seeded random streams (real state)."""
    shaped = convert.model_for_weights(ct_jax.ModelConfig.from_kwargs(CONFIGS["defaults"]))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(shaped)))
    dropout = ct_jax.ModelConfig.from_kwargs(dict(CONFIGS["defaults"], ff_dropout=0.1))
    reference = ct_jax.CompressiveTransformer(**dropout.to_kwargs(), rngs=nnx.Rngs(3))
    loaded = convert.from_torch(convert.to_torch(reference), convert.model_for_weights(dropout, seed=3))
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(loaded)))
    got, expected = _state_besides_params(loaded), _state_besides_params(reference)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
