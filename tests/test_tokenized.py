"""Tokenized splits (cached, memory-mapped, refused when ids leave the vocabulary) and the measures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from ct_jax.tokenized import count_words, measures, token_dtype, tokenize_split
from ct_jax.tokenizers import ByteTokenizer, Tokenizer, WordTokenizer

DOCUMENTS = ["the cat sat\non the mat\n", "a dog\n", "", "the end é"]


class OutOfRange(ByteTokenizer):
    """A broken tokenizer: its ids run past its vocabulary."""

    def encode(self, text: str) -> np.ndarray:
        return super().encode(text) + 200


class Forbidden(WordTokenizer):
    """A tokenizer that must not be asked to encode (the split is cached)."""

    def encode(self, text: str) -> Any:
        raise AssertionError("encoded again although the split was cached")


def test_split_is_encoded_with_document_starts(tmp_path):
    tokenizer = WordTokenizer.train(DOCUMENTS)
    split = tokenize_split(DOCUMENTS, tokenizer, corpus_fingerprint="c1", split="train", cache_dir=tmp_path)
    encoded = [tokenizer.encode(document) for document in DOCUMENTS]
    assert isinstance(split.tokens, np.memmap) and split.tokens.dtype == np.uint16
    assert np.array_equal(split.tokens, np.concatenate(encoded))
    assert split.doc_starts.dtype == np.int64
    assert split.doc_starts.tolist() == np.cumsum([0] + [len(ids) for ids in encoded[:-1]]).tolist()
    assert split.n_bytes == sum(len(document.encode()) for document in DOCUMENTS)
    assert split.n_words == len(split.tokens), "the word tokenizer's tokens are the words"


def test_cached_split_is_not_encoded_again(tmp_path):
    tokenizer = WordTokenizer.train(DOCUMENTS)
    first = tokenize_split(DOCUMENTS, tokenizer, corpus_fingerprint="c1", split="train", cache_dir=tmp_path)
    cached = tokenize_split(DOCUMENTS, Forbidden(tokenizer.vocab, tokenizer.min_count), corpus_fingerprint="c1",
                            split="train", cache_dir=tmp_path)
    assert np.array_equal(first.tokens, cached.tokens) and first.n_bytes == cached.n_bytes
    other = tokenize_split(DOCUMENTS, ByteTokenizer(), corpus_fingerprint="c1", split="train", cache_dir=tmp_path)
    assert len(other.tokens) == other.n_bytes, "another tokenizer must get its own cache entry"
    changed = tokenize_split(DOCUMENTS[:1], ByteTokenizer(), corpus_fingerprint="c2", split="train",
                             cache_dir=tmp_path)
    assert len(changed.tokens) == len(DOCUMENTS[0].encode()), "another corpus must get its own cache entry"


def test_bytes_documents_keep_their_length(tmp_path):
    raw = [b"caf\xc3\xa9", b"cut \xc3"]  # the second ends inside a character
    split = tokenize_split(raw, ByteTokenizer(), corpus_fingerprint="b", split="validation", cache_dir=tmp_path)
    assert split.n_bytes == 10 and split.doc_starts.tolist() == [0, 5]
    assert bytes(np.asarray(split.tokens, np.uint8)) == b"".join(raw), "byte tokens must be the bytes, invalid ones too"


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ids in \[297, 297\] for document 0 of split 'train', outside"):
        tokenize_split(["a"], OutOfRange(), corpus_fingerprint="x", split="train", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == [], "a refused split must leave no cache file or temporary"


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(267_735) == np.uint32


def test_measures():
    nll = 1000 * math.log(256)  # a uniform byte model over 1000 bytes
    byte_level = measures(nll, n_tokens=1000, n_bytes=1000)
    assert byte_level.bits_per_token == pytest.approx(8) and byte_level.bits_per_byte == pytest.approx(8)
    assert byte_level.perplexity == pytest.approx(256) and byte_level.word_perplexity is None
    subword = measures(nll, n_tokens=250, n_bytes=1000, n_words=200)  # same NLL, 4 bytes per token
    assert subword.bits_per_byte == pytest.approx(8), "bits per byte must not depend on the tokenization"
    assert subword.bits_per_token == pytest.approx(32)
    assert subword.word_perplexity == pytest.approx(math.exp(nll / 200))
    with pytest.raises(ValueError, match="n_bytes must be a positive int"):
        measures(1.0, n_tokens=1, n_bytes=0)


def test_count_words_matches_the_word_tokenizer():
    text = "one two\n\n three  four five\nsix"
    assert count_words(text) == len(WordTokenizer.train(text).encode(text)) == 6 + 4  # words, lines


def test_tokenizer_interface_is_complete():
    abstract = Tokenizer.__abstractmethods__
    assert {"encode", "decode", "vocab_size", "token_bytes", "spec"} <= abstract


def _corpus() -> Any:
    from ct_jax.data import Corpus, document_offsets

    texts = {"train": DOCUMENTS, "validation": ["a cat\n", "the dog sat\n"]}
    splits = {name: np.frombuffer("".join(docs).encode(), np.uint8) for name, docs in texts.items()}
    starts = {name: document_offsets([len(doc.encode()) for doc in docs]) for name, docs in texts.items()}
    return Corpus(splits, starts), texts


def test_bytes_corpus_is_the_byte_arrays_themselves(tmp_path):
    from ct_jax.tokenized import SplitCounts, tokenize_corpus

    corpus, _ = _corpus()
    tokens = tokenize_corpus(corpus, ByteTokenizer(), tmp_path)
    for name, split in corpus.splits.items():
        assert tokens.splits[name] is split and tokens.starts[name] is corpus.starts[name]
        assert tokens.counts[name] == SplitCounts(len(split), len(split))
    assert not list(tmp_path.iterdir()), "bytes writes no cache"


def test_word_corpus_is_encoded_per_document_with_counts(tmp_path):
    from ct_jax.tokenized import tokenize_corpus

    corpus, texts = _corpus()
    tokenizer = WordTokenizer.train(texts["train"])
    tokens = tokenize_corpus(corpus, tokenizer, tmp_path)
    encoded = [tokenizer.encode(document) for document in texts["train"]]
    assert np.array_equal(tokens.splits["train"], np.concatenate(encoded))
    # the empty third document is no start of its own
    assert tokens.starts["train"].tolist() == [0, len(encoded[0]), len(encoded[0]) + len(encoded[1])]
    counts = tokens.counts["validation"]
    assert counts.n_tokens == counts.n_words == len(tokens.splits["validation"]) == 7
    assert counts.n_bytes == len("a cat\nthe dog sat\n")


def test_split_measures_spread_bits_per_token_over_bytes_and_words():
    from ct_jax.tokenized import SplitCounts, metric_values, split_measures

    for bits in (0.1, 1.234567, 7.9):
        byte_level = split_measures(bits, SplitCounts(1000, 1000))
        assert byte_level.bits_per_byte == bits, "bytes: bits per byte is bits per token exactly"
        assert byte_level.word_perplexity is None
    words = split_measures(2.0, SplitCounts(n_tokens=100, n_bytes=400, n_words=100))
    assert words == (2.0, 4.0, 0.5, 4.0)
    assert metric_values("val", words) == dict(val_bpb=0.5, val_bits_per_token=2.0, val_ppl=4.0, val_word_ppl=4.0)
    assert set(metric_values("test", split_measures(1.0, SplitCounts(3, 9)))) == {"test_bpb", "test_bits_per_token",
                                                                                  "test_ppl"}


def test_samplers_read_uint16_token_arrays_as_ids():
    from ct_jax.data import WindowSampler, eval_batches
    from ct_jax.streams import StreamSampler

    ids = (np.arange(400) * 97 % 5000).astype(np.uint16)  # ids past a byte's range
    window = next(WindowSampler(ids, 9, 2, seed=0))
    assert window.dtype == np.int32 and window.max() > 255
    assert any(np.array_equal(row, ids[start : start + 9]) for row in window for start in range(392))
    assert np.array_equal(next(eval_batches(ids, 9, 1))[0], ids[:9].astype(np.int32))
    batch = next(StreamSampler(ids, np.array([0, 200]), 8, 2, 2, seed=0))
    assert batch.inputs.max() > 255 and set(batch.inputs[batch.mask].tolist()) <= set(ids.tolist())
