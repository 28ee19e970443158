"""Tokenizers: bytes as today's data.encode_text / decode_bytes, SentencePiece (loaded and trained),
Hugging Face tokenizers, Transformer-XL's word level; the flag parser and the run-folder round trip."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFLibTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ct_jax import data
from ct_jax.tokenizers import (
    TOKENIZER_RECORD,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    _prefix_lines,
    load_tokenizer,
    tokenizer_from_spec,
    train_sentencepiece,
)

SAMPLES = ["", "hello world", "def f(x):\n    return  x + 1\n\n", "é ü 漢字 😀\ttab\r\n"]


@pytest.fixture(scope="module")
def source_text() -> str:
    """~60 KB of Python source: enough for small vocabularies."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    text += (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()[:40_000]
    return text + "\n".join(SAMPLES)


@pytest.fixture(scope="module")
def trained_spm(source_text, tmp_path_factory) -> SentencePieceTokenizer:
    return tokenizer_from_spec("spm-train:400", train_text=source_text, run_dir=tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def hf_file(source_text, tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 style) trained on the fly."""
    tokenizer = HFLibTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([source_text], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("text", SAMPLES)
def test_bytes_are_data_encode_text(text):
    tokenizer = tokenizer_from_spec("bytes")
    ids = tokenizer.encode(text)
    expected = data.encode_text(text)
    assert ids.dtype == expected.dtype and np.array_equal(ids, expected), f"{ids} != {expected}"
    assert tokenizer.decode(ids) == data.decode_bytes(expected) == text


def test_bytes_decode_invalid_utf8_as_data():
    cut = data.encode_text("é")[:1]  # half of a two-byte character
    assert ByteTokenizer().decode(cut) == data.decode_bytes(cut) == "\ufffd"
    assert ByteTokenizer().vocab_size == 256 and ByteTokenizer().eos_id is None
    assert np.array_equal(ByteTokenizer().token_bytes, np.ones(256))
    with pytest.raises(ValueError, match=r"ids must be in \[0, 256\)"):
        ByteTokenizer().decode(np.array([256]))


def test_spm_train_is_lossless_and_deterministic(trained_spm, source_text, tmp_path):
    assert trained_spm.vocab_size == 400
    assert Path(trained_spm.spec.removeprefix("spm:")).is_file(), "spm-train must save its .model in run_dir"
    again = tokenizer_from_spec("spm-train:400", train_text=[source_text], run_dir=tmp_path)
    assert again.model_proto == trained_spm.model_proto, "training twice on the same text gave different models"
    for text in SAMPLES:
        ids = trained_spm.encode(text)
        assert trained_spm.decode(ids) == text, f"round trip of {text!r} gave {trained_spm.decode(ids)!r}"
        # byte fallback: no <unk>, so the ids' byte lengths add up to the text's
        assert trained_spm.token_bytes[ids].sum() == len(text.encode()), text
    assert trained_spm.eos_id == 1


def test_spm_path_loads_the_same_model(trained_spm):
    loaded = tokenizer_from_spec(trained_spm.spec)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert np.array_equal(loaded.encode(SAMPLES[2]), trained_spm.encode(SAMPLES[2]))
    assert loaded.fingerprint() == trained_spm.fingerprint()


def test_hf_tokenizer(hf_file):
    tokenizer = tokenizer_from_spec(f"hf:{hf_file}")
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 400
    assert tokenizer.eos_id == 0  # <|endoftext|>
    assert tokenizer.token_bytes[0] == 0
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.token_bytes[ids].sum() == len(text.encode()), text


def test_words_as_transformer_xl():
    text = "a b a\nc a\n\nb\n"  # a 3, b 2, c 1, and 4 lines: <eos> 4
    tokenizer = tokenizer_from_spec("words", train_text=text)
    assert tokenizer.vocab == ["<eos>", "a", "b", "c", "<unk>"]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("a c\n").tolist() == [1, 3, 0]
    rare = tokenizer_from_spec("words:2", train_text=[text])
    assert rare.vocab == ["<eos>", "a", "b", "<unk>"] and rare.spec == "words:2"
    assert rare.encode("a c zzz\n").tolist() == [1, 3, 3, 0]
    assert rare.decode([1, 3, 0, 2]) == "a <unk>\nb"
    assert rare.token_bytes.tolist() == [1, 2, 2, 0]


def test_words_ties_by_first_occurrence():
    assert WordTokenizer.train("y x\nx y z\n").vocab == ["y", "x", "<eos>", "z", "<unk>"]
    assert WordTokenizer.train("hello <unk>\n").vocab == ["hello", "<unk>", "<eos>"], "a text's own <unk> ranks"


@pytest.mark.parametrize("kind", ["bytes", "spm", "hf", "words"])
def test_saved_run_restores_the_tokenizer(kind, trained_spm, hf_file, source_text, tmp_path):
    tokenizer = {"bytes": ByteTokenizer(), "spm": trained_spm, "hf": tokenizer_from_spec(f"hf:{hf_file}"),
                 "words": tokenizer_from_spec("words:2", train_text=source_text)}[kind]
    tokenizer.save(tmp_path)
    record = json.loads((tmp_path / TOKENIZER_RECORD).read_text())
    assert record["kind"] == kind and record["vocab_size"] == tokenizer.vocab_size
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("*.pickle"))
    restored = load_tokenizer(tmp_path)
    assert type(restored) is type(tokenizer) and restored.fingerprint() == tokenizer.fingerprint()
    assert np.array_equal(restored.encode(source_text[:3000]), tokenizer.encode(source_text[:3000]))


def test_run_without_record_used_bytes(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


@pytest.mark.parametrize("spec, problem", [
    ("sentencepiece", "unknown form"), ("bytes:2", "unknown form"), ("spm:/no/such.model", "no file"),
    ("hf:", "no file"), ("spm-train", "vocabulary size"), ("spm-train:big", "SIZE must be a positive integer"),
    ("words:0", "MIN_COUNT must be a positive integer"),
])
def test_bad_flag_values_are_named(spec, problem):
    with pytest.raises(ValueError, match=problem) as error:
        tokenizer_from_spec(spec, train_text="a b\n", run_dir="/tmp")
    message = str(error.value)
    assert "--tokenizer" in message and "spm-train:SIZE | hf:PATH | words[:MIN_COUNT]" in message, message
    assert "\n" not in message


def test_learning_forms_need_their_inputs(tmp_path):
    with pytest.raises(ValueError, match="train_text"):
        tokenizer_from_spec("words:2")
    with pytest.raises(ValueError, match="run_dir"):
        tokenizer_from_spec("spm-train:300", train_text="a b\n")
    with pytest.raises(ValueError, match="--tokenizer spm-train:5: SentencePiece training failed"):
        tokenizer_from_spec("spm-train:5", train_text="a b\n" * 10, run_dir=tmp_path)
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        (tmp_path / "bad.json").write_text("{}")
        tokenizer_from_spec(f"hf:{tmp_path / 'bad.json'}")


def test_word_vocabulary_needs_its_specials():
    with pytest.raises(ValueError, match="including '<eos>' and '<unk>'"):
        WordTokenizer(["a", "<eos>"], 1)


def test_spm_train_reads_a_prefix(trained_spm, source_text):
    """max_bytes bounds the text read; the lines read are the text's first ones, whole."""
    assert list(_prefix_lines(["a\nbb", "ccc\nd"], max_bytes=5)) == ["a", "bb"]
    assert list(_prefix_lines("a\nbb", max_bytes=None)) == ["a", "bb"]
    small = train_sentencepiece([source_text, "never read"], 400, max_bytes=len(source_text.encode()) + 1)
    assert small == trained_spm.model_proto


def test_flag_forms_are_checked_without_training(tmp_path):
    from ct_jax.tokenizers import check_spec, known_vocab_size

    model = tmp_path / "m.model"
    model.write_bytes(b"x")
    assert [check_spec(spec) for spec in ("bytes", "spm-train:500", "words", "words:3", f"spm:{model}")] == [
        "bytes", "spm", "words", "words", "spm"]
    for bad in ("spm-train", "spm-train:0", "words:x", "spm:/no/such.model", "bpe:100", "bytes:1"):
        with pytest.raises(ValueError, match="--tokenizer"):
            check_spec(bad)
    assert known_vocab_size("bytes") == 256 and known_vocab_size("spm-train:1024") == 1024
    assert known_vocab_size("words:2") is None and known_vocab_size(f"spm:{model}") is None
