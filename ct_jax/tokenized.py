"""Tokenized corpora: a split's documents encoded once, cached as a memory-mapped token array
with its document starts, and the measures that compare models across tokenizers.

A cached split is three files in the cache folder, named by a key of (corpus fingerprint,
split, tokenizer fingerprint): `KEY.tokens` (uint16 where the vocabulary fits, else uint32),
`KEY.starts.npy` (int64 document starts) and `KEY.json` (counts), each written atomically; the
JSON is written last, so its presence means the split is complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ct_jax._checks import check_int
from ct_jax.data import Corpus, default_cache_dir, fingerprint
from ct_jax.io import atomic_write
from ct_jax.tokenizers import ByteTokenizer, Tokenizer, text_lines

_FORMAT = "ct_jax-tokenized-v1"
LN2 = math.log(2.0)


class TokenizedSplit(NamedTuple):
    """One split as token ids: `tokens` (n,) uint16/uint32 memmap, `doc_starts` (d,) int64 offsets into
    `tokens` (document i is tokens[doc_starts[i]:doc_starts[i + 1]]), `n_bytes` UTF-8 bytes of its text,
    `n_words` its words as the word tokenizer counts them (whitespace words + one per line)."""

    tokens: np.ndarray
    doc_starts: np.ndarray
    n_bytes: int
    n_words: int


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies up to 65536 ids, else uint32."""
    check_int("vocab_size", vocab_size)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def count_words(text: str) -> int:
    """Words of `text` as `WordTokenizer` counts them: whitespace-split words plus one `<eos>` per line."""
    return sum(len(line.split()) + 1 for line in text_lines(text))


def split_key(corpus_fingerprint: str, split: str, tokenizer: Tokenizer) -> str:
    """The cache name of a tokenized split: split name and a hash of corpus, split and tokenizer."""
    digest = hashlib.sha256(f"{_FORMAT}|{corpus_fingerprint}|{split}|{tokenizer.fingerprint()}".encode())
    return f"{split}-{tokenizer.kind}-{digest.hexdigest()[:20]}"


def _encoded(document: str | bytes, tokenizer: Tokenizer) -> tuple[np.ndarray, int, int]:
    """(ids, UTF-8 bytes, words) of one document."""
    if isinstance(document, bytes):
        return tokenizer.encode_bytes(document), len(document), count_words(document.decode("utf-8", "replace"))
    return tokenizer.encode(document), len(document.encode("utf-8")), count_words(document)


def _open(directory: Path, key: str) -> TokenizedSplit:
    meta = json.loads((directory / f"{key}.json").read_text())
    n_tokens = meta["n_tokens"]
    tokens = (np.memmap(directory / f"{key}.tokens", dtype=np.dtype(meta["dtype"]), mode="r", shape=(n_tokens,))
              if n_tokens else np.zeros(0, meta["dtype"]))
    starts = np.load(directory / f"{key}.starts.npy")  # one int64 per document: small
    return TokenizedSplit(tokens, starts, meta["n_bytes"], meta["n_words"])


def tokenize_split(
    documents: Iterable[str | bytes], tokenizer: Tokenizer, *, corpus_fingerprint: str, split: str,
    cache_dir: str | os.PathLike | None = None,
) -> TokenizedSplit:
    """The split's documents encoded by `tokenizer`, from the cache when this corpus, split and tokenizer
    were encoded before; else encoded once (a ValueError for ids outside the vocabulary) and cached.

    Documents given as bytes are read by `Tokenizer.encode_bytes` (bytes exactly, byte for byte) and count
    their own length.
    """
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "tokenized"
    key = split_key(corpus_fingerprint, split, tokenizer)
    if (directory / f"{key}.json").exists():
        return _open(directory, key)
    dtype, vocab = token_dtype(tokenizer.vocab_size), tokenizer.vocab_size
    starts, counts = [], {"n_tokens": 0, "n_bytes": 0, "n_words": 0}

    def write_tokens(tmp: str) -> None:
        with open(tmp, "wb") as out:
            for index, document in enumerate(documents):
                ids, n_bytes, n_words = _encoded(document, tokenizer)
                if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                    raise ValueError(f"{tokenizer.spec} gave ids in [{ids.min()}, {ids.max()}] for document {index} "
                                     f"of split {split!r}, outside its vocabulary [0, {vocab})")
                starts.append(counts["n_tokens"])
                out.write(ids.astype(dtype).tobytes())
                counts["n_tokens"] += ids.size
                counts["n_bytes"] += n_bytes
                counts["n_words"] += n_words

    atomic_write(directory / f"{key}.tokens", write_tokens)

    def write_starts(tmp: str) -> None:
        with open(tmp, "wb") as out:  # a file object: np.save would add ".npy" to a name
            np.save(out, np.asarray(starts, np.int64))

    atomic_write(directory / f"{key}.starts.npy", write_starts)
    meta = {"format": _FORMAT, "tokenizer": tokenizer.spec, "vocab_size": vocab, "dtype": dtype.name, **counts}
    atomic_write(directory / f"{key}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return _open(directory, key)


class Measures(NamedTuple):
    """Comparable losses of one evaluation: per token, per byte of the original text, per word."""

    bits_per_token: float
    perplexity: float  # per token
    bits_per_byte: float  # the same NLL over the text's UTF-8 bytes: comparable across tokenizers
    word_perplexity: float | None  # exp(NLL / words), None without a word count


def measures(nll: float, n_tokens: int, n_bytes: int, n_words: int | None = None) -> Measures:
    """Measures of a summed negative log-likelihood `nll` (nats) over `n_tokens` predicted tokens of a text
    of `n_bytes` UTF-8 bytes and `n_words` words (`count_words`; for a word tokenizer, its tokens)."""
    check_int("n_tokens", n_tokens)
    check_int("n_bytes", n_bytes)
    if n_words is not None:
        check_int("n_words", n_words)
    return Measures(
        bits_per_token=nll / (n_tokens * LN2),
        perplexity=math.exp(min(nll / n_tokens, 700.0)),  # capped below float overflow
        bits_per_byte=nll / (n_bytes * LN2),
        word_perplexity=None if n_words is None else math.exp(min(nll / n_words, 700.0)),
    )


class SplitCounts(NamedTuple):
    """What a split's measures are spread over: its tokens, the UTF-8 bytes of its text, and its words (a word
    tokenizer's tokens; None for other tokenizers: no word perplexity)."""

    n_tokens: int
    n_bytes: int
    n_words: int | None = None


class TokenCorpus(NamedTuple):
    """A corpus as token ids: per split the ids (bytes: the corpus's own uint8 arrays; else uint16/uint32
    memmaps), where its documents begin in those ids, and its counts."""

    splits: dict[str, np.ndarray]
    starts: dict[str, np.ndarray]
    counts: dict[str, SplitCounts]


def _distinct_starts(doc_starts: np.ndarray, n_tokens: int) -> np.ndarray:
    """Document starts (k,) int64 without the empty documents' repeats, 0 first, each inside the split."""
    starts = np.unique(np.concatenate([[0], doc_starts]).astype(np.int64))
    return starts[starts < max(n_tokens, 1)]


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | os.PathLike | None = None) -> TokenCorpus:
    """`corpus` (as `ct_jax.data.read_corpus` reads it) encoded by `tokenizer`, a document at a time, each split
    cached (`tokenize_split`, under `cache_dir/tokenized`). Bytes keeps the byte arrays as they are: bit-identical
    to a byte-level run."""
    if isinstance(tokenizer, ByteTokenizer):
        counts = {name: SplitCounts(len(split), len(split)) for name, split in corpus.splits.items()}
        return TokenCorpus(dict(corpus.splits), dict(corpus.starts), counts)
    directory = None if cache_dir is None else Path(cache_dir) / "tokenized"
    corpus_fingerprint = fingerprint(corpus.splits)
    splits, starts, counts = {}, {}, {}
    for name, split in corpus.splits.items():
        bounds = np.append(corpus.starts[name], len(split))
        documents = (bytes(split[begin:end]) for begin, end in zip(bounds[:-1], bounds[1:]))
        encoded = tokenize_split(documents, tokenizer, corpus_fingerprint=corpus_fingerprint, split=name,
                                 cache_dir=directory)
        splits[name], starts[name] = encoded.tokens, _distinct_starts(encoded.doc_starts, len(encoded.tokens))
        counts[name] = SplitCounts(len(encoded.tokens), encoded.n_bytes,
                                   len(encoded.tokens) if tokenizer.kind == "words" else None)
    return TokenCorpus(splits, starts, counts)


def split_measures(bits_per_token: float, counts: SplitCounts) -> Measures:
    """The measures of a split from its bits per token (`ct_jax.evaluation.evaluate_stream`): the per-token rate
    spread over the split's bytes and words (the NLL of its n_tokens tokens over its n_bytes bytes). For bytes
    (n_tokens == n_bytes) bits per byte is bits per token exactly."""
    return Measures(
        bits_per_token=bits_per_token,
        perplexity=2.0 ** min(bits_per_token, 1000.0),  # capped below float overflow
        bits_per_byte=bits_per_token * (counts.n_tokens / counts.n_bytes),
        word_perplexity=(None if counts.n_words is None
                         else 2.0 ** min(bits_per_token * (counts.n_tokens / counts.n_words), 1000.0)),
    )


def metric_values(prefix: str, measured: Measures) -> dict[str, float]:
    """`measured` as training-log columns: PREFIX_bpb (bits per byte), PREFIX_bits_per_token, PREFIX_ppl and,
    for a word tokenizer, PREFIX_word_ppl."""
    values = {f"{prefix}_bpb": measured.bits_per_byte, f"{prefix}_bits_per_token": measured.bits_per_token,
              f"{prefix}_ppl": measured.perplexity}
    if measured.word_perplexity is not None:
        values[f"{prefix}_word_ppl"] = measured.word_perplexity
    return values


def describe(measured: Measures) -> str:
    """One line of the measures, bits per byte first (comparable across tokenizers)."""
    words = "" if measured.word_perplexity is None else f", word perplexity {measured.word_perplexity:.2f}"
    return (f"{measured.bits_per_byte:.4f} bits/byte ({measured.bits_per_token:.4f} bits/token, perplexity "
            f"{measured.perplexity:.2f}{words})")
