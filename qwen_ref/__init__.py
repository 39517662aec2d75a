"""qwen-ref: a pure-PyTorch reference implementation of the Qwen2-architecture models."""

from typing import TYPE_CHECKING, Any

from qwen_ref.errors import (
    CheckpointError,
    ConfigError,
    InvalidInput,
    InvalidSamplingParams,
    QwenRefError,
    SourceNotFoundError,
    TokenizerError,
)

if TYPE_CHECKING:
    from qwen_ref.config import QwenConfig
    from qwen_ref.qwen import Qwen, load
    from qwen_ref.workers_ai.generate import generate

# torch is imported on first use of these, so that `import qwen_ref.<module>` stays light where a module needs
# no model (the chat-template worker process imports only jinja2)
_LAZY = {"QwenConfig": "qwen_ref.config", "Qwen": "qwen_ref.qwen", "load": "qwen_ref.qwen",
         "generate": "qwen_ref.workers_ai.generate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen_ref' has no attribute {name!r}")

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
