"""Sample from a checkpoint directory (written by ct_jax or ct_torch_ref), streaming the text.

    python scripts/generate.py --checkpoint ckpt/ --prime "The " --length 500
    python scripts/generate.py --checkpoint ckpt/ --prime-file prompt.txt --length 200 \\
        --temperature 0.8 --top-k 20 --seed 1 --dtype bfloat16

Tokens are bytes (a byte-level model: token t < 256 is printed as byte t; any larger id as
`<id>`). The prime is the UTF-8 encoding of --prime, or the raw bytes of --prime-file.
The whole sample is one compiled call (`ct_jax.generation.decode`); each token is handed
to the host from inside that loop as it is made (`jax.debug.callback`) and written to
stdout at once, so the text streams. The first tokens wait for the compilation. Only the
generated text goes to stdout; a summary line goes to stderr.

Filtering: --top-k K keeps the K most likely tokens, --top-p P the smallest set whose
probability exceeds P (nucleus sampling); without either, upstream's default (top_k with
filter_thres 0.9: the top 10% of the vocabulary). --temperature 0 is greedy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from ct_jax import cli
from ct_jax._checks import check_float, check_int
from ct_jax.generation import decode
from ct_jax.loading import load_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="directory with model.safetensors + config.json, or a training --out folder (its model/, "
                        "else its newest verified checkpoint)")
    prime = parser.add_mutually_exclusive_group(required=True)
    prime.add_argument("--prime", help="prime text (UTF-8)")
    prime.add_argument("--prime-file", type=Path, help="file whose bytes are the prime")
    parser.add_argument("--length", type=int, required=True, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    filters = parser.add_mutually_exclusive_group()
    filters.add_argument("--top-k", type=int, help="keep the K most likely tokens")
    filters.add_argument("--top-p", type=float, help="keep the most likely tokens until their probability exceeds P")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
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


def check_args(args: argparse.Namespace) -> bytes:
    """The prime, after checking every argument that needs no model; nothing is loaded yet."""
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
    prime = args.prime.encode("utf-8") if args.prime is not None else args.prime_file.read_bytes()
    if not prime:
        raise ValueError("the prime is empty; give at least one byte")
    return prime


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-generate` / scripts/generate.py: the sample on stdout, a summary on stderr."""
    args = parse_args(argv)
    prime = check_args(args)
    model, source, step = load_model(args.checkpoint)
    if step is not None:
        print(f"loaded {source}", file=sys.stderr)
    vocab = model.config.num_tokens
    if max(prime) >= vocab:
        raise ValueError(f"the prime holds byte {max(prime)}, outside the model's {vocab} tokens")
    filter_fn, filter_thres = filter_options(args, vocab)

    out = sys.stdout.buffer

    def write(index: int, tokens) -> None:
        out.write(token_bytes(int(tokens[0])))
        out.flush()

    start = time.perf_counter()
    result = decode(model, list(prime), args.length, jax.random.key(args.seed), args.temperature,
                    filter_fn, filter_thres, on_token=write, dtype=jnp.dtype(args.dtype))
    jax.block_until_ready(result.tokens)
    jax.effects_barrier()  # every callback has run
    seconds = time.perf_counter() - start
    out.write(b"\n")
    out.flush()
    print(f"{args.length} tokens in {seconds:.2f}s (compilation included)", file=sys.stderr)
    return 0
