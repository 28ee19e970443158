"""Compressive Transformer in JAX / Flax NNX, weight-compatible with the PyTorch upstream."""

from ct_jax import autoregressive, convert, data, presets  # public submodules
from ct_jax.config import ModelConfig
from ct_jax.memory import Memory
from ct_jax.model import CompressiveTransformer

__all__ = ["CompressiveTransformer", "Memory", "ModelConfig", "autoregressive", "convert", "data", "presets"]
