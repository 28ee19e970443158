"""Tokenizers: text <-> token ids for the model, chosen by one flag and stored in the run folder.

`--tokenizer bytes | spm:PATH | spm-train:SIZE | hf:PATH | words[:MIN_COUNT]`:
- bytes: ids are the text's UTF-8 bytes (vocab 256), exactly `ct_jax.data.encode_text` / `decode_bytes`;
- spm:PATH: a SentencePiece `.model`; spm-train:SIZE: one trained here on the training text (deterministic);
- hf:PATH: a Hugging Face `tokenizers` file (`tokenizer.json`);
- words[:MIN_COUNT]: word level as Transformer-XL builds WikiText-103 (whitespace split, `<eos>` per line,
  words seen fewer than MIN_COUNT times become `<unk>`, vocabulary by frequency), stored as JSON.

A run stores its tokenizer with `save(run_dir)` (`TOKENIZER_RECORD` plus the model or vocabulary
file), and `load_tokenizer(run_dir)` restores the same one for evaluation, generation and resume.
"""

from __future__ import annotations

import abc
import collections
import functools
import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece
import tokenizers as hf_tokenizers

from ct_jax.io import atomic_write

TOKENIZER_FLAG = "--tokenizer"
TOKENIZER_FORMS = "bytes | spm:PATH | spm-train:SIZE | hf:PATH | words[:MIN_COUNT]"
TOKENIZER_RECORD = "tokenizer_spec.json"  # {"kind", "spec", "file"} in the run folder
SPM_FILE, HF_FILE, WORDS_FILE = "tokenizer.model", "hf_tokenizer.json", "words_vocab.json"
EOS, UNK = "<eos>", "<unk>"
SPM_TRAIN_BYTES = 64 * 2**20  # spm-train reads at most this much of the training text
_HF_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")

TextSource = str | Iterable[str]  # one text, or documents


class Tokenizer(abc.ABC):
    """Text <-> int32 token ids; `token_bytes[i]` is the UTF-8 length of what id i covers (0 for control ids)."""

    kind: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids: every id is in [0, vocab_size)."""

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """The `--tokenizer` value that makes this tokenizer again (from its files, or from the same text)."""

    @property
    def eos_id(self) -> int | None:
        """The end-of-document (or end-of-line, for words) id, None if there is none."""
        return None

    @property
    @abc.abstractmethod
    def token_bytes(self) -> np.ndarray:
        """(vocab_size,) int64: UTF-8 bytes each id stands for (0 for control ids), for per-token byte counts."""

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids (n,) int32 of `text`."""

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Token ids (n,) int32 of UTF-8 `data` (invalid bytes read as U+FFFD; bytes keeps them exactly)."""
        return self.encode(data.decode("utf-8", errors="replace"))

    @abc.abstractmethod
    def decode(self, ids: Any) -> str:
        """Text of token ids (n,); ids outside [0, vocab_size) are a ValueError."""

    @abc.abstractmethod
    def _model_bytes(self) -> bytes | None:
        """The model or vocabulary file's contents (None: nothing beyond the spec)."""

    def fingerprint(self) -> str:
        """A short hash of the spec and the model file: equal fingerprints encode alike (cache keys)."""
        digest = hashlib.sha256(f"{self.kind}|{self.vocab_size}|".encode())
        digest.update(self._model_bytes() or self.spec.encode())
        return digest.hexdigest()[:16]

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Writes `TOKENIZER_RECORD` and the model file (if any) into `run_dir`, atomically; returns the record."""
        run_dir = Path(run_dir)
        model = self._model_bytes()
        file = _FILES.get(self.kind)
        if model is not None:
            _write_if_changed(run_dir / file, model)
        record = {"kind": self.kind, "spec": self.spec, "file": file if model is not None else None,
                  "vocab_size": self.vocab_size}
        return _write_if_changed(run_dir / TOKENIZER_RECORD, json.dumps(record, indent=2).encode())

    def _checked_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}) ({self.spec}), got range "
                             f"[{ids.min()}, {ids.max()}]")
        return ids.astype(np.int64)


class ByteTokenizer(Tokenizer):
    """ids = the UTF-8 bytes of the text (vocab 256): today's byte-level behaviour, bit for bit."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def spec(self) -> str:
        return "bytes"

    @property
    def token_bytes(self) -> np.ndarray:
        return np.ones(256, np.int64)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_bytes(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        """Invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self._checked_ids(ids).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _model_bytes(self) -> bytes | None:
        return None


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (serialized proto); `spec` is `spm:PATH` of the file it was read from or saved to."""

    kind = "spm"

    def __init__(self, model_proto: bytes, path: str | os.PathLike):
        self.model_proto = model_proto
        self.path = Path(path)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        """Reads a `.model` file."""
        return cls(Path(path).read_bytes(), path)

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def spec(self) -> str:
        return f"spm:{self.path}"

    @property
    def eos_id(self) -> int | None:
        eos = self.processor.eos_id()
        return eos if eos >= 0 else None

    @functools.cached_property  # one pass over the vocabulary
    def token_bytes(self) -> np.ndarray:
        sp = self.processor
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                lengths[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                lengths[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return lengths

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.processor.encode(text), np.int32)

    def decode(self, ids: Any) -> str:
        return self.processor.decode(self._checked_ids(ids).tolist())

    def _model_bytes(self) -> bytes | None:
        return self.model_proto

    def save(self, run_dir: str | os.PathLike) -> Path:
        """As `Tokenizer.save`; the spec then names the file written (a trained model's first file may be gone)."""
        self.path = Path(run_dir) / SPM_FILE
        return super().save(run_dir)


def _write_if_changed(path: Path, content: bytes) -> Path:
    """Writes `content` to `path` atomically unless it already holds exactly that (a resumed run's files
    stay untouched)."""
    if not (path.is_file() and path.read_bytes() == content):
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))
    return path


def _prefix_lines(text: TextSource, max_bytes: int | None) -> Iterator[str]:
    """The lines of `text` (or of its documents, in order) up to about `max_bytes` UTF-8 bytes."""
    seen = 0
    for document in [text] if isinstance(text, str) else text:
        for line in document.split("\n"):
            if max_bytes is not None and seen >= max_bytes:
                return
            seen += len(line.encode("utf-8")) + 1
            yield line


def train_sentencepiece(text: TextSource, vocab_size: int, *, max_bytes: int | None = SPM_TRAIN_BYTES,
                        num_threads: int = 1) -> bytes:
    """A unigram SentencePiece model (serialized) trained on `text`, lossless and deterministic.

    Lossless: identity normalisation, whitespace kept as is, newlines a piece of their own, and
    byte fallback for characters outside the vocabulary, so `decode(encode(text)) == text`.
    Deterministic: the lines of the first `max_bytes` of the text, in order (no sampling or
    shuffling); the cap bounds time and memory on large corpora (~10 s per MB on one core).
    """
    lines = _prefix_lines(text, max_bytes)
    model = io.BytesIO()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model, vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=False, user_defined_symbols=["\n"], unk_id=0, eos_id=1, bos_id=-1, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 16,
            num_threads=num_threads, minloglevel=2,
        )
    except RuntimeError as error:  # e.g. "Vocabulary size is too high"
        raise ValueError(f"{TOKENIZER_FLAG} spm-train:{vocab_size}: SentencePiece training failed: {error}") from error
    return model.getvalue()


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer (`tokenizer.json`); special (added) tokens cover 0 bytes."""

    kind = "hf"

    def __init__(self, serialized: str, path: str | os.PathLike):
        self.serialized = serialized
        self.path = Path(path)
        self.tokenizer = hf_tokenizers.Tokenizer.from_str(serialized)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """Reads a `tokenizer.json` file."""
        return cls(Path(path).read_text(encoding="utf-8"), path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def spec(self) -> str:
        return f"hf:{self.path}"

    @property
    def eos_id(self) -> int | None:
        ids = (self.tokenizer.token_to_id(token) for token in _HF_EOS_CANDIDATES)
        return next((i for i in ids if i is not None), None)

    @functools.cached_property  # one pass over the vocabulary
    def token_bytes(self) -> np.ndarray:
        # Byte-level BPE (GPT-2 style) spells each byte as one character; otherwise each id's own
        # decoding is measured (approximate for pieces whose spacing depends on their neighbours).
        byte_level = (json.loads(self.serialized).get("decoder") or {}).get("type") == "ByteLevel"
        special = {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i in special:
                continue
            piece = self.tokenizer.id_to_token(i)
            if byte_level and piece is not None:
                lengths[i] = len(piece)
            else:
                lengths[i] = len(self.tokenizer.decode([i], skip_special_tokens=False).encode("utf-8"))
        return lengths

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode(self._checked_ids(ids).tolist(), skip_special_tokens=False)

    def _model_bytes(self) -> bytes | None:
        return self.serialized.encode("utf-8")


def text_lines(text: str) -> list[str]:
    """The lines of `text` as a file reads them: split at "\\n", no empty last line after a final newline."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


class WordTokenizer(Tokenizer):
    """Word level as Transformer-XL's WikiText-103: whitespace-split words plus `<eos>` per line, `<unk>` for the rest.

    `vocab` is the id order; `token_bytes` counts a word with its separating space, `<eos>` as the newline.
    """

    kind = "words"

    def __init__(self, vocab: list[str], min_count: int):
        if len(set(vocab)) != len(vocab) or EOS not in vocab or UNK not in vocab:
            raise ValueError(f"a word vocabulary must hold distinct words including {EOS!r} and {UNK!r}")
        self.vocab, self.min_count = list(vocab), min_count
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.unk = self.ids[UNK]

    @classmethod
    def train(cls, text: TextSource, min_count: int = 1) -> WordTokenizer:
        """The vocabulary of `text`: words seen at least `min_count` times by frequency (ties: first seen first),
        `<unk>` appended if the text has none (Transformer-XL keeps WikiText's own `<unk>` where it ranks)."""
        counts: collections.Counter[str] = collections.Counter()
        for document in [text] if isinstance(text, str) else text:
            for line in text_lines(document):
                counts.update(line.split())
                counts[EOS] += 1
        counts.setdefault(EOS, 0)
        vocab = [word for word, count in counts.most_common() if count >= min_count or word == EOS]
        return cls(vocab if UNK in vocab else [*vocab, UNK], min_count)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Reads the JSON vocabulary written by `save`."""
        stored = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(stored["vocab"], stored["min_count"])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def spec(self) -> str:
        return f"words:{self.min_count}"

    @property
    def eos_id(self) -> int | None:
        return self.ids[EOS]

    @functools.cached_property  # one pass over the vocabulary
    def token_bytes(self) -> np.ndarray:
        lengths = [len(word.encode("utf-8")) + 1 for word in self.vocab]  # the word and its space
        lengths[self.ids[EOS]], lengths[self.unk] = 1, 0
        return np.asarray(lengths, np.int64)

    def encode(self, text: str) -> np.ndarray:
        ids, unk, eos = self.ids, self.unk, self.ids[EOS]
        out = [i for line in text_lines(text) for i in [*(ids.get(word, unk) for word in line.split()), eos]]
        return np.asarray(out, np.int32)

    def decode(self, ids: Any) -> str:
        """Words joined by spaces, `<eos>` as a newline."""
        lines, line = [], []
        for word in (self.vocab[i] for i in self._checked_ids(ids)):
            if word == EOS:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(word)
        return "".join(lines) + " ".join(line)

    def _model_bytes(self) -> bytes | None:
        return json.dumps({"min_count": self.min_count, "vocab": self.vocab}, ensure_ascii=False).encode("utf-8")


_FILES = {"spm": SPM_FILE, "hf": HF_FILE, "words": WORDS_FILE}


def _flag_error(spec: str, problem: str) -> ValueError:
    return ValueError(f"{TOKENIZER_FLAG} {spec!r}: {problem}; expected {TOKENIZER_FORMS}")


def _positive_int(spec: str, text: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise _flag_error(spec, f"{what} must be a positive integer, got {text!r}")
    return int(text)


def _existing_file(spec: str, path: str) -> Path:
    if not path or not Path(path).expanduser().is_file():
        raise _flag_error(spec, f"no file at {path!r}")
    return Path(path).expanduser()


def check_spec(spec: str) -> str:
    """The kind a `--tokenizer` value names ('spm' for spm-train), after checking its form, without training or
    reading a model (a flag check before any data is read)."""
    if not isinstance(spec, str):
        raise TypeError(f"{TOKENIZER_FLAG} must be a str ({TOKENIZER_FORMS}), got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "bytes" and not arg:
        return kind
    if kind in ("spm", "hf"):
        _existing_file(spec, arg)
        return kind
    if kind == "spm-train" or (kind == "words" and arg):
        _positive_int(spec, arg, "SIZE" if kind == "spm-train" else "MIN_COUNT")
    if kind in ("spm-train", "words"):
        return "spm" if kind == "spm-train" else kind
    raise _flag_error(spec, "unknown form")


def known_vocab_size(spec: str) -> int | None:
    """The vocabulary a `--tokenizer` value gives before any text is read (bytes: 256, spm-train:SIZE: SIZE), else
    None (it depends on the text or a file)."""
    kind, _, arg = spec.partition(":")
    if spec == "bytes":
        return 256
    return int(arg) if kind == "spm-train" and arg.isdigit() else None


def tokenizer_from_spec(spec: str, *, train_text: TextSource | None = None,
                        run_dir: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer a `--tokenizer` value names. `spm-train:SIZE` and `words[:MIN_COUNT]` learn from
    `train_text` (the training split's text or documents); `spm-train` saves its `.model` in `run_dir`."""
    if not isinstance(spec, str):
        raise TypeError(f"{TOKENIZER_FLAG} must be a str ({TOKENIZER_FORMS}), got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind == "bytes" and not arg:
        return ByteTokenizer()
    if kind == "spm":
        return SentencePieceTokenizer.load(_existing_file(spec, arg))
    if kind == "hf":
        path = _existing_file(spec, arg)
        try:
            return HFTokenizer.load(path)
        except Exception as error:  # the tokenizers library raises its own Exception type
            raise _flag_error(spec, f"{path} is not a Hugging Face tokenizer.json ({error})") from error
    if kind in ("spm-train", "words"):
        if kind == "spm-train" and not arg:
            raise _flag_error(spec, "spm-train needs a vocabulary size")
        size = _positive_int(spec, arg, "SIZE" if kind == "spm-train" else "MIN_COUNT") if arg else 1
        if train_text is None:
            raise _flag_error(spec, f"{kind} learns from the training text, and none was given (train_text)")
        if kind == "words":
            return WordTokenizer.train(train_text, size)
        if run_dir is None:
            raise _flag_error(spec, "spm-train saves its model in the run folder, and none was given (run_dir)")
        path = Path(run_dir) / SPM_FILE
        model = train_sentencepiece(train_text, size)
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(model))
        return SentencePieceTokenizer(model, path)
    raise _flag_error(spec, "unknown form")


def load_tokenizer(run_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer a run stored with `Tokenizer.save`; a run folder without a record used bytes."""
    run_dir = Path(run_dir)
    record_path = run_dir / TOKENIZER_RECORD
    if not record_path.exists():
        return ByteTokenizer()
    record = json.loads(record_path.read_text())
    kind = record.get("kind")
    if kind == "bytes":
        return ByteTokenizer()
    if kind not in _FILES or not record.get("file"):
        raise ValueError(f"{record_path} names tokenizer kind {kind!r} without a file; expected one of "
                         f"'bytes', {', '.join(repr(k) for k in _FILES)}")
    path = run_dir / record["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{record_path} names {record['file']!r}, which is missing from {run_dir}")
    if kind == "spm":
        return SentencePieceTokenizer.load(path)
    if kind == "hf":
        return HFTokenizer.load(path)
    return WordTokenizer.load(path)
