"""qwen-ref: a pure-PyTorch reference implementation of the Qwen2-architecture models."""

from qwen_ref.config import QwenConfig
from qwen_ref.errors import (
    CheckpointError,
    ConfigError,
    InvalidInput,
    InvalidSamplingParams,
    QwenRefError,
    SourceNotFoundError,
    TokenizerError,
)
from qwen_ref.qwen import Qwen, load
from qwen_ref.workers_ai.generate import generate

__all__ = [
    "CheckpointError",
    "ConfigError",
    "InvalidInput",
    "InvalidSamplingParams",
    "Qwen",
    "QwenConfig",
    "QwenRefError",
    "SourceNotFoundError",
    "TokenizerError",
    "generate",
    "load",
]
__version__ = "0.1.0"
