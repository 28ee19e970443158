"""Weights interchange: a directory with `model.safetensors` (upstream key names) and
`config.json` (the constructor kwargs), written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import Tensor

from .model import CompressiveTransformer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Runs write(tmp_path) on a temp file beside `path`, flushes it to disk, then renames it
    over `path`; the file gets the umask's permissions (the reference's own copy of
    `ct_jax.io.atomic_write`, so that this package needs nothing from ct_jax)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: CompressiveTransformer, directory: str | os.PathLike) -> Path:
    """Writes model.safetensors and config.json into directory (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _write_atomic(
        directory / WEIGHTS_NAME,
        lambda tmp: safetensors.torch.save_file(state, tmp, metadata={"format": "pt"}),
    )

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(model.config, f, indent=2, sort_keys=True)
            f.write("\n")

    _write_atomic(directory / CONFIG_NAME, write_config)
    return directory


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Reads a state dict from `.safetensors`, or `.pt`/`.pth`/`.bin` via
    torch.load(weights_only=True) (no arbitrary pickles), onto the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path), device="cpu")
    if path.suffix not in (".pt", ".pth", ".bin"):
        raise ValueError(
            f"path must end in .safetensors, .pt, .pth or .bin, got {str(path)!r}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(
            f"{str(path)!r} must hold a flat dict of name -> tensor (a state_dict), "
            f"got {type(state).__name__}"
        )
    return dict(state)


def load_pretrained(directory: str | os.PathLike) -> CompressiveTransformer:
    """Builds the model from config.json and loads model.safetensors strictly; eval mode."""
    directory = Path(directory)
    with open(directory / CONFIG_NAME) as f:
        config = json.load(f)
    model = CompressiveTransformer(**config)
    model.load_state_dict(load_state_dict_file(directory / WEIGHTS_NAME), strict=True)
    return model.eval()
