"""PyTorch reference of `compressive-transformer-pytorch` 0.4.0: same kwargs, state_dict
keys and forward values, with its defects fixed (see the tests named *defects*)."""

from .adaptive import AdaptiveEmbedding, AdaptiveLogSoftmax
from .attention import Memory, UsageMemory
from .autoregressive import AutoregressiveWrapper, Return, top_k, top_p
from .checkpoint import load_pretrained, load_state_dict_file, save_pretrained
from .model import CompressiveTransformer

__all__ = [
    "AdaptiveEmbedding",
    "AdaptiveLogSoftmax",
    "AutoregressiveWrapper",
    "CompressiveTransformer",
    "Memory",
    "Return",
    "load_pretrained",
    "load_state_dict_file",
    "save_pretrained",
    "top_k",
    "top_p",
    "UsageMemory",
]
