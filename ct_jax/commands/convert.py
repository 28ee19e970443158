"""Convert weights between PyTorch files and checkpoint directories (model.safetensors + config.json).

    python scripts/convert.py --from upstream.pt --config config.json --to ckpt/   # torch state_dict -> dir
    python scripts/convert.py --from ckpt/ --to weights.pt                           # dir -> torch state_dict
    python scripts/convert.py --from ckpt/ --to other_ckpt/                          # re-export, validated

Every conversion loads the weights strictly into the JAX model (missing, unexpected or
mis-shaped keys are errors) and writes atomically. `.pt`/`.bin` files are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax import nnx

from ct_jax import cli, convert
from ct_jax.config import ModelConfig
from ct_jax.io import atomic_write
from ct_jax.model import CompressiveTransformer

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="a checkpoint directory, or a .pt/.pth/.bin/.safetensors state_dict")
    parser.add_argument("--to", dest="target", type=Path, required=True,
                        help="a checkpoint directory, or a .pt / .safetensors file for a state_dict")
    parser.add_argument("--config", help="constructor kwargs (JSON text or file) for a bare state_dict")
    return parser.parse_args(argv)


def _bare_config(args: argparse.Namespace) -> ModelConfig:
    """The model config of a bare state_dict: --config, checked against a config.json beside the file."""
    beside = args.source.parent / convert.CONFIG_FILE
    saved = convert.read_config(args.source.parent) if beside.is_file() else None
    if args.config is None:
        if saved is None:
            raise ValueError("--config is required with a bare state_dict (no config.json beside it): the "
                             "constructor kwargs as JSON")
        return saved
    config = convert.config_from_json(args.config)
    if saved is not None and saved != config:
        now, before = config.to_kwargs(), saved.to_kwargs()
        differ = {key: (now[key], before[key]) for key in now if now[key] != before[key]}
        raise ValueError(f"--config differs from {beside}, which describes these weights (--config, config.json): "
                         f"{differ}; weights of the same shapes would load into the wrong model")
    return config


def check_args(args: argparse.Namespace) -> None:
    """Checks the paths before anything is read or written."""
    if not args.source.exists():
        raise FileNotFoundError(f"--from {args.source} does not exist")
    if not args.source.is_dir() and args.source.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"--from must be a directory or end in {TORCH_SUFFIXES}, got {args.source}")
    if args.target.suffix in TORCH_SUFFIXES and args.target.is_dir():
        raise ValueError(f"--to {args.target} is a folder; a {args.target.suffix} target must be a file")
    if not args.target.suffix and args.target.is_file():
        raise ValueError(f"--to {args.target} is a file; a checkpoint directory target must be a folder")


def _load(args: argparse.Namespace) -> CompressiveTransformer:
    if args.source.is_dir():
        return convert.load_pretrained(args.source)
    config = _bare_config(args)
    model = CompressiveTransformer(**config.to_kwargs(), rngs=nnx.Rngs(0))
    return convert.from_torch(convert.read_state_dict(args.source), model)


def _write(model: CompressiveTransformer, target: Path) -> list[Path]:
    if target.suffix in (".pt", ".pth", ".bin"):
        import torch

        state = convert.to_torch(model)
        atomic_write(target, lambda tmp: torch.save(state, tmp))
        return [target]
    if target.suffix == ".safetensors":
        from safetensors.numpy import save_file

        weights = convert.to_numpy(model)
        atomic_write(target, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        return [target]
    convert.save_pretrained(model, target)
    return [target / convert.WEIGHTS_FILE, target / convert.CONFIG_FILE]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        model = _load(args)
        written = _write(model, args.target)
    except (TypeError, ValueError, OSError) as error:  # TypeError: a wrongly typed config.json
        return cli.refuse(error)
    n_params = sum(value.size for value in convert.to_numpy(model).values())
    print(f"loaded {args.source}: {n_params:,} parameters, config {model.config.to_kwargs()}")
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
