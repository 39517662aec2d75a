"""qwen-ref: a pure-PyTorch reference implementation of the Qwen2-architecture models."""

from qwen_ref.config import QwenConfig
from qwen_ref.errors import (
    CheckpointError,
    ConfigError,
    InvalidSamplingParams,
    QwenRefError,
    SourceNotFoundError,
    TokenizerError,
)
from qwen_ref.qwen import Qwen, load
from qwen_ref.workers_ai.validate import InvalidInput


def generate(qwen, inputs, *, n=1, exact=True):
    """A Workers AI text-generation request in, its result out (see qwen_ref.api.generate)."""
    from qwen_ref.workers_ai.generate import generate as _generate

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
