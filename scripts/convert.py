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
import json
import sys
from pathlib import Path

from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone, uninstalled

from ct_jax import convert  # noqa: E402
from ct_jax.config import ModelConfig  # noqa: E402
from ct_jax.io import atomic_write  # noqa: E402
from ct_jax.model import CompressiveTransformer  # noqa: E402

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="a checkpoint directory, or a .pt/.pth/.bin/.safetensors state_dict")
    parser.add_argument("--to", dest="target", type=Path, required=True,
                        help="a checkpoint directory, or a .pt / .safetensors file for a state_dict")
    parser.add_argument("--config", help="constructor kwargs (JSON text or file) for a bare state_dict")
    return parser.parse_args(argv)


def _load(args: argparse.Namespace) -> CompressiveTransformer:
    if args.source.is_dir():
        return convert.load_pretrained(args.source)
    if args.source.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"--from must be a directory or end in {TORCH_SUFFIXES}, got {args.source}")
    if args.config is None:
        raise ValueError("--config is required with a bare state_dict: the constructor kwargs as JSON")
    text = Path(args.config).read_text() if Path(args.config).is_file() else args.config
    config = ModelConfig.from_kwargs(json.loads(text))
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
        model = _load(args)
        written = _write(model, args.target)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_params = sum(value.size for value in convert.to_numpy(model).values())
    print(f"loaded {args.source}: {n_params:,} parameters, config {model.config.to_kwargs()}")
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
