"""Convert weights between PyTorch files and checkpoint directories (model.safetensors + config.json).

    python scripts/convert.py --from upstream.pt --config '{"seq_len": 512, "mem_len": 512}' --to ckpt/
    python scripts/convert.py --from ckpt/ --to weights.pt                           # dir -> torch state_dict
    python scripts/convert.py --from ckpt/ --to other_ckpt/                          # re-export, validated
    python scripts/convert.py --from runs/train --to ckpt/   # a run's model/, else its newest verified checkpoint

A bare state_dict's config is read from its shapes (`ct_jax.config_from_weights`); --config
gives what they do not show (seq_len and mem_len, as pos_emb holds their sum with cmem_len),
and a config.json beside the file is used and checked. Every conversion loads the weights
strictly into the JAX model (missing, unexpected or mis-shaped keys are errors) and writes
atomically: a directory target is written beside it and swapped in whole. An existing target
is refused unless --force. Tensors that are not float32 are cast to float32 (a line says
which) unless --keep-dtype. `.pt`/`.bin` files are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ct_jax import cli, convert
from ct_jax.config import ModelConfig
from ct_jax.config_from_weights import UNSEEN, config_from_weights
from ct_jax.io import atomic_write, replace_folder
from ct_jax.loading import CHECKPOINTS_FOLDER, load_model
from ct_jax.model import CompressiveTransformer

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
CHECKPOINT_FILES = (convert.WEIGHTS_FILE, convert.CONFIG_FILE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--from", dest="source", type=Path, required=True,
                        help="a checkpoint directory, or a .pt/.pth/.bin/.safetensors state_dict")
    parser.add_argument("--to", dest="target", type=Path, required=True,
                        help="a checkpoint directory, or a .pt / .safetensors file for a state_dict")
    parser.add_argument("--config", help="constructor kwargs (JSON text or file) for a bare state_dict: those its "
                        "shapes do not show (seq_len and mem_len), or all of them")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing --to (a file, or a folder holding only a checkpoint), atomically")
    parser.add_argument("--keep-dtype", action="store_true",
                        help="write tensors in their source dtypes (float16, bfloat16, float64) instead of float32")
    return parser.parse_args(argv)


def _bare_config(args: argparse.Namespace, state: dict[str, np.ndarray]) -> ModelConfig:
    """The model config of a bare state_dict: a config.json beside the file (checked against --config), or
    --config completed from the weights' shapes."""
    beside = args.source.parent / convert.CONFIG_FILE
    saved = convert.read_config(args.source.parent) if beside.is_file() else None
    if saved is None:
        given = {} if args.config is None else convert.json_kwargs(args.config)
        config = config_from_weights(state, given)
        defaults = {name: getattr(config, name) for name in UNSEEN if name not in given}
        if defaults:
            print("config read from the weights' shapes; not shown by them, upstream's defaults (--config sets "
                  "them): " + ", ".join(f"{name}={value!s}" for name, value in defaults.items()))
        return config
    if args.config is None:
        return saved
    config = convert.config_from_json(args.config)
    if saved != config:
        now, before = config.to_kwargs(), saved.to_kwargs()
        differ = {key: (now[key], before[key]) for key in now if now[key] != before[key]}
        raise ValueError(f"--config differs from {beside}, which describes these weights (--config, config.json): "
                         f"{differ}; weights of the same shapes would load into the wrong model")
    return config


def _check_target(target: Path, force: bool) -> None:
    """Refuses to replace an existing target without --force, and a folder holding more than a checkpoint."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if target.is_dir():
        others = sorted(entry.name for entry in target.iterdir()
                        if entry.name not in CHECKPOINT_FILES and not entry.name.endswith(".tmp"))  # a killed write's
        if others:
            raise ValueError(f"--to {target} holds more than a checkpoint ({', '.join(others[:5])}"
                             f"{', ...' if len(others) > 5 else ''}), which a conversion would replace; give a new "
                             f"folder (or a run's model/ folder)")
    if not force:
        raise ValueError(f"--to {target} already exists; --force replaces it (atomically), or give another path")


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
    _check_target(args.target, args.force)


def _load(args: argparse.Namespace) -> tuple[CompressiveTransformer, dict[str, np.ndarray], str]:
    """(model, the source's arrays, what was read): a checkpoint directory, a run's newest verified
    checkpoint, or a bare state_dict."""
    folder = convert.model_directory(args.source)
    if args.source.is_dir() and not (folder / convert.CONFIG_FILE).is_file() \
            and (args.source / CHECKPOINTS_FOLDER).is_dir():
        loaded = load_model(args.source)
        return loaded.model, convert.to_numpy(loaded.model), loaded.source
    if args.source.is_dir():
        config, state = convert.read_config(folder), convert.read_state_dict(folder / convert.WEIGHTS_FILE)
    else:
        state = convert.read_state_dict(args.source)
        config = _bare_config(args, state)
    return convert.from_torch(state, convert.model_for_weights(config)), state, str(args.source)


def _weights(model: CompressiveTransformer, state: dict[str, np.ndarray], keep_dtype: bool) -> dict[str, np.ndarray]:
    """The arrays to write: the model's (float32), or with --keep-dtype the source's where their dtype differs."""
    weights = convert.to_numpy(model)
    if keep_dtype:
        weights.update({key: value for key, value in state.items()
                        if key in weights and value.dtype != weights[key].dtype})
    return weights


def _write(model: CompressiveTransformer, weights: dict[str, np.ndarray], target: Path) -> list[Path]:
    if target.suffix in (".pt", ".pth", ".bin"):
        import torch

        state = convert.tensors(weights)
        atomic_write(target, lambda tmp: torch.save(state, tmp))
        return [target]
    if target.suffix == ".safetensors":
        from safetensors.numpy import save_file

        atomic_write(target, lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        return [target]

    def write(folder: Path) -> None:
        convert.save_pretrained(model, folder, weights=weights)

    replace_folder(target, write)
    return [target / convert.WEIGHTS_FILE, target / convert.CONFIG_FILE]


@cli.command
def main(argv: list[str] | None = None) -> int:
    """`ct-convert` / scripts/convert.py: every check before the target is touched."""
    args = parse_args(argv)
    check_args(args)
    model, state, source = _load(args)
    cast = convert.cast_dtypes(state)
    weights = _weights(model, state, args.keep_dtype)
    written = _write(model, weights, args.target)
    n_params = sum(value.size for value in weights.values())
    print(f"loaded {source}: {n_params:,} parameters, config {model.config.to_kwargs()}")
    if cast:
        counts = ", ".join(f"{count} {dtype}" for dtype, count in sorted(cast.items()))
        print(f"kept the source dtypes of {counts} tensors (--keep-dtype)" if args.keep_dtype else
              f"cast {counts} tensors to float32 (--keep-dtype keeps them)")
    for path in written:
        print(f"wrote {path} ({path.stat().st_size:,} bytes)")
    return 0
