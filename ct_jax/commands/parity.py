"""Run ct_torch_ref and ct_jax on the same weights and random inputs; print a per-segment table.

    python scripts/parity.py --config '{"num_tokens": 256, "dim": 64, "seq_len": 16, "depth": 2, "heads": 4}'
    python scripts/parity.py --checkpoint ckpt/ --segments 6

Exits non-zero if any output misses its tolerance (ct_jax.parity states them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import ct_torch_ref
from ct_jax import cli, convert, parity
from ct_jax.loading import load_model
from ct_jax.model import CompressiveTransformer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="constructor kwargs as JSON, or a path to a JSON file (random weights)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint directory (model.safetensors + config.json), "
                        "or a training run's folder (its model/, else its newest verified checkpoint)")
    parser.add_argument("--segments", type=int, default=4, help="segments to run, the last one short (>= 2)")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--float64", action="store_true", help="compare in float64 (semantics, tolerance 1e-10)")
    args = parser.parse_args(argv)
    if args.segments < 2:
        parser.error(f"--segments must be >= 2, got {args.segments}")
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def _torch_model(args: argparse.Namespace):
    """The reference model: the checkpoint's weights (checked strictly by ct_jax first), or random ones."""
    import torch

    if args.checkpoint is not None:
        loaded, source, step = load_model(args.checkpoint)
        if step is not None:
            print(f"loaded {source}")
        model = ct_torch_ref.CompressiveTransformer(**loaded.config.to_kwargs())
        model.load_state_dict(convert.to_torch(loaded), strict=True)
        return model.eval()
    config = convert.config_from_json(args.config)
    torch.manual_seed(args.seed)
    model = ct_torch_ref.CompressiveTransformer(**config.to_kwargs())
    with torch.no_grad():  # pos_emb starts at zero upstream, which would hide positional errors
        model.pos_emb.normal_(0.0, 0.5)
    return model


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-parity` / scripts/parity.py: exit status 1 when a comparison misses its tolerance."""
    args = parse_args(argv)
    torch_model = _torch_model(args)
    dtype = jnp.float32
    if args.float64:
        jax.config.update("jax_enable_x64", True)
        torch_model = torch_model.double()
        dtype = jnp.float64
    jax_model = CompressiveTransformer(**torch_model.config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    convert.from_torch(torch_model.state_dict(), jax_model)
    modes = ("eval", "train")
    if jax_model.config.uses_dropout:
        modes = ("eval",)
        print("dropout > 0 in this config: comparing eval mode only (dropout masks differ across frameworks)")
    rows = parity.compare(torch_model, jax_model, segments=args.segments, batch=args.batch, seed=args.seed, modes=modes)
    print(parity.format_table(rows))
    misses = [row for row in rows if not row.ok]
    worst = max(row.max_abs_diff for row in rows)
    print(f"\n{len(rows) - len(misses)} of {len(rows)} comparisons within tolerance; worst max abs diff {worst:.3e}")
    return 1 if misses else 0
