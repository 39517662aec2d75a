"""qwen-ref: a pure-PyTorch reference implementation of the Qwen2-architecture models."""

from .config import QwenConfig
from .errors import (
    CheckpointError,
    ConfigError,
    InvalidSamplingParams,
    QwenRefError,
    SourceNotFoundError,
    TokenizerError,
)
from .loader import Qwen, load

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InvalidSamplingParams",
    "Qwen",
    "QwenConfig",
    "QwenRefError",
    "SourceNotFoundError",
    "TokenizerError",
    "load",
]
__version__ = "0.1.0"
