"""Sample from a checkpoint directory (written by ct_jax or ct_torch_ref), streaming the text.

    python scripts/generate.py --checkpoint ckpt/ --prime "The " --length 500
    python scripts/generate.py --checkpoint ckpt/ --prime "The " --prime "Once upon" --length 100
    python scripts/generate.py --checkpoint ckpt/ --prime-file prompts.txt --length 200 \\
        --temperature 0.8 --top-k 20 --seed 1 --dtype bfloat16

Tokens are those of the tokenizer stored with the model (scripts/train.py --tokenizer): each prime
(--prime, or a line of --prime-file) is encoded by it and the sample decoded. A model without one
is byte level: a prime is the UTF-8 encoding of --prime, or a line's raw bytes (without its line
end), token t < 256 is printed as byte t and any larger id as `<id>`. --stop-at-eos ends a
sample at the tokenizer's end token (a line's end for words).
All primes, of any lengths, are one batch and the whole sample one compiled call
(`ct_jax.generation.decode`; each row generates what it would alone). One prime streams: each
token is handed to the host from inside that loop as it is made (`jax.debug.callback`) and
written to stdout at once; the first tokens wait for the compilation. Several primes: each
continuation is written once all are made, in the primes' order, each followed by a line end.
Only the generated text goes to stdout; a summary line goes to stderr.

Filtering: --top-k K keeps the K most likely tokens, --top-p P the smallest set whose
probability exceeds P (nucleus sampling); without either, upstream's default (top_k with
filter_thres 0.9: the top 10% of the vocabulary). --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ct_jax import cli
from ct_jax._checks import check_float, check_int
from ct_jax.generation import decode
from ct_jax.loading import load_model, load_run_tokenizer
from ct_jax.tokenizers import ByteTokenizer, Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="directory with model.safetensors + config.json, or a training --out folder (its model/, "
                        "else its newest verified checkpoint)")
    prime = parser.add_mutually_exclusive_group(required=True)
    prime.add_argument("--prime", action="append", help="prime text (UTF-8); repeat for several samples in one batch")
    prime.add_argument("--prime-file", type=Path, help="file with one prime per line (a batch of them)")
    parser.add_argument("--length", type=int, required=True, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    filters = parser.add_mutually_exclusive_group()
    filters.add_argument("--top-k", type=int, help="keep the K most likely tokens")
    filters.add_argument("--top-p", type=float, help="keep the most likely tokens until their probability exceeds P")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--stop-at-eos", action="store_true",
                        help="end the sample at the tokenizer's end-of-document token (words: end of line)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="decode in this dtype (bfloat16: weights and cache cast, half the bytes per token; "
                        "close to float32, not equal: ct_jax.parity.BF16_DECODE_LOGITS_ATOL); default float32")
    return parser.parse_args(argv)


def filter_options(args: argparse.Namespace, vocab: int) -> tuple[str, float]:
    """(filter_logits_fn, filter_thres) in upstream's terms for --top-k / --top-p."""
    if args.top_k is not None:
        if not 1 <= args.top_k <= vocab:
            raise ValueError(f"--top-k must be in [1, {vocab}] (the vocabulary), got {args.top_k}")
        # top_k keeps int((1 - thres) * vocab) tokens: aim at K + 0.5 so rounding cannot drop one.
        return "top_k", 1.0 - (args.top_k + 0.5) / vocab
    if args.top_p is not None:
        if not 0.0 < args.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        return "top_p", 1.0 - args.top_p
    return "top_k", 0.9


def token_bytes(token: int) -> bytes:
    return bytes([token]) if token < 256 else f"<{token}>".encode()


class TextStream:
    """Writes a token stream's text as it grows: the whole sample is decoded again per token (a piece's text can
    depend on its neighbours), and what extends the text already written goes out."""

    def __init__(self, tokenizer: Tokenizer, out: Any):
        self.tokenizer, self.out, self.ids, self.written = tokenizer, out, [], ""

    def add(self, token: int) -> None:
        """Appends `token`; writes the new text unless it stops in the middle of a character."""
        self.ids.append(token)
        self.flush(partial=False)

    def flush(self, partial: bool = True) -> None:
        """Writes what extends the text written so far (`partial`: even a cut character, at the end)."""
        text = self.tokenizer.decode(np.asarray(self.ids, np.int64))
        if text.startswith(self.written) and (partial or not text.endswith("\ufffd")):
            self.out.write(text[len(self.written):].encode("utf-8"))
            self.out.flush()
            self.written = text


def check_args(args: argparse.Namespace) -> list[bytes]:
    """The primes, after checking every argument that needs no model; nothing is loaded yet."""
    if args.length < 1:
        raise ValueError(f"--length must be >= 1, got {args.length}")
    check_float("--temperature", args.temperature, 0.0)
    check_int("--seed", args.seed, 0)
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prime_file is not None and not args.prime_file.is_file():
        raise ValueError(f"--prime-file must be a file, got {str(args.prime_file)!r}"
                         + (" (a folder)" if args.prime_file.is_dir() else " (not found)"))
    if args.prime is not None:
        primes = [text.encode("utf-8") for text in args.prime]
        for index, prime in enumerate(primes, start=1):
            if not prime:
                raise ValueError(f"--prime number {index} is empty; give at least one byte")
        return primes
    primes = args.prime_file.read_bytes().splitlines()
    if not primes:
        raise ValueError(f"--prime-file {str(args.prime_file)!r} is empty; give one prime per line")
    for line, prime in enumerate(primes, start=1):
        if not prime:
            raise ValueError(f"--prime-file {str(args.prime_file)!r}: line {line} is empty; give one prime per line")
    return primes


def encoded(primes: list[bytes], tokenizer: Tokenizer, vocab: int, byte_level: bool) -> list[list[int]]:
    """Each prime's token ids, with an error naming the prime that encodes to nothing or outside the model."""
    out = []
    for index, prime in enumerate(primes, start=1):
        ids = list(prime) if byte_level else tokenizer.encode_bytes(prime).tolist()
        which = "the prime" if len(primes) == 1 else f"prime {index} ({prime[:20]!r})"
        if not ids:
            raise ValueError(f"{which} encodes to no token with {tokenizer.spec!r}; give more text")
        if max(ids) >= vocab:
            raise ValueError(f"{which} holds {'byte' if byte_level else 'token'} {max(ids)}, outside the model's "
                             f"{vocab} tokens")
        out.append(ids)
    return out


def continuation(tokens: np.ndarray, tokenizer: Tokenizer, byte_level: bool) -> bytes:
    """A row's sample as the bytes written to stdout."""
    if byte_level:
        return b"".join(token_bytes(int(token)) for token in tokens)
    return tokenizer.decode(np.asarray(tokens, np.int64)).encode("utf-8")


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-generate` / scripts/generate.py: the sample on stdout, a summary on stderr."""
    args = parse_args(argv)
    primes = check_args(args)
    model, source, step = load_model(args.checkpoint)
    if step is not None:
        print(f"loaded {source}", file=sys.stderr)
    vocab = model.config.num_tokens
    tokenizer = load_run_tokenizer(args.checkpoint, model)
    byte_level = isinstance(tokenizer, ByteTokenizer)
    prompts = encoded(primes, tokenizer, vocab, byte_level)
    filter_fn, filter_thres = filter_options(args, vocab)
    eos = tokenizer.eos_id if args.stop_at_eos else None
    if args.stop_at_eos and eos is None:
        raise ValueError(f"--stop-at-eos: the tokenizer {tokenizer.spec!r} has no end-of-document token")

    out = sys.stdout.buffer
    text = TextStream(tokenizer, out)
    ended = []  # the eos was sampled: what follows is padding

    def write(index, tokens) -> None:
        token = int(tokens[0])
        if ended or index[0] < 0:
            return
        if token == eos:
            ended.append(index)
        if byte_level:
            out.write(token_bytes(token))
            out.flush()
        else:
            text.add(token)

    streams = len(prompts) == 1
    start = time.perf_counter()
    result = decode(model, prompts if not streams else prompts[0], args.length, jax.random.key(args.seed),
                    args.temperature, filter_fn, filter_thres, eos, on_token=write if streams else None,
                    dtype=jnp.dtype(args.dtype))
    jax.block_until_ready(result.tokens)
    jax.effects_barrier()  # every callback has run
    seconds = time.perf_counter() - start
    if streams:
        if not byte_level:
            text.flush()
        out.write(b"\n")
    else:
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        for row, length in zip(tokens, lengths):
            out.write(continuation(row[:length], tokenizer, byte_level) + b"\n")
    out.flush()
    made = f"{args.length} tokens" if streams else f"{len(prompts)} samples of {args.length} tokens"
    print(f"{made} in {seconds:.2f}s (compilation included)", file=sys.stderr)
    return 0
