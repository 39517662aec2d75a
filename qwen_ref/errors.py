"""Typed errors raised by the public API. Each message names the field, the value and what is allowed."""


class QwenRefError(Exception):
    """Base class of every error qwen_ref raises on purpose."""


class ConfigError(QwenRefError, ValueError):
    """A config.json field is missing, unknown, out of range or contradicts another field."""


class CheckpointError(QwenRefError, ValueError):
    """Weights on disk do not match the model: missing, unexpected or mis-shaped tensors, bad files."""


class SourceNotFoundError(QwenRefError, FileNotFoundError):
    """A checkpoint source (directory, hub repo id, Workers AI id) could not be resolved."""


class TokenizerError(QwenRefError, ValueError):
    """Tokenizer files are missing, malformed, or disagree with the model."""


class InvalidSamplingParams(QwenRefError, ValueError):
    """A sampling parameter is of the wrong type or outside its allowed range."""
