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
from .validate import InvalidInput


def generate(qwen, inputs, *, n=1, exact=True):
    """A Workers AI text-generation request in, its result out (see qwen_ref.api.generate)."""
    from .api import generate as _generate

    return _generate(qwen, inputs, n=n, exact=exact)


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
