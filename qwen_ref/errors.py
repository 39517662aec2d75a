"""Typed errors raised by the public API, and the one table of the Workers AI service's codes and HTTP statuses.

Each message names the field, the value and what is allowed. The server answers an error with the status and
code SERVICE_ERRORS gives its class (the nearest listed base class counts).
"""

from __future__ import annotations


class QwenRefError(Exception):
    """Base class of every error qwen_ref raises on purpose."""

    @property
    def status(self) -> int:
        """The HTTP status the service answers this error with (SERVICE_ERRORS)."""
        return service_status(self)[0]

    @property
    def code(self) -> int:
        """The service's error code for it (SERVICE_ERRORS)."""
        return service_status(self)[1]


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


# ------------------------------------------------------------------------------------ the request contract


class InvalidInput(QwenRefError, ValueError):
    """A request body breaks a rule; `.path` is the JSON pointer of the offending value, `.rule` the rule."""

    def __init__(self, path: str, rule: str, detail: str) -> None:
        super().__init__(f"Bad input: {path}: {detail}")
        self.path = path
        self.rule = rule
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidInput], tuple[str, str, str]]:
        return type(self), (self.path, self.rule, self.detail)


class ContextWindowExceeded(QwenRefError, ValueError):
    """prompt_tokens + max_tokens is more than the model's context window."""


class LoraUnavailable(QwenRefError, ValueError):
    """The request names a LoRA adapter the model cannot serve."""


JSON_MODE_NOT_MET = "JSON Mode couldn't be met"  # the service's message, word for word


class JsonModeNotMet(QwenRefError):
    """The output is not a complete JSON value matching the schema (max_tokens ran out first). The message is
    the service's, word for word; `.detail` says what happened."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(JSON_MODE_NOT_MET)
        self.detail = detail

    def __reduce__(self) -> tuple[type[JsonModeNotMet], tuple[str]]:
        return type(self), (self.detail,)


# ------------------------------------------------------------------------------------------------ the engine


class EngineError(QwenRefError, RuntimeError):
    """Something failed inside the engine while running one request (the other requests go on)."""


class NonFiniteLogits(EngineError):
    """The model's logits for a request hold NaN or +inf, so no token can be drawn."""


class KVMemoryExceeded(QwenRefError, ValueError):
    """A request could need more KV cache memory than the engine's whole budget."""


class RequestTimeout(QwenRefError, TimeoutError):
    """A request ran past its deadline (queueing included)."""


# ------------------------------------------------------------------------------------------------ the server


class Unauthorized(QwenRefError):
    """No or a wrong bearer token."""


class NoSuchModel(QwenRefError, LookupError):
    """The request names a model this server does not serve."""


class NoRoute(QwenRefError, LookupError):
    """No route for that URI."""


class MethodNotAllowed(QwenRefError):
    """The route exists, but not for this HTTP method."""


class RequestTooLarge(QwenRefError, ValueError):
    """The request body is over the server's limit."""


class UnsupportedMediaType(QwenRefError, ValueError):
    """The body is not sent as JSON."""


class OutOfCapacity(QwenRefError):
    """The queue is full."""


class ClientClosed(QwenRefError):
    """The client went away before its answer was ready."""


class FeatureUnavailable(QwenRefError):
    """The request needs an optional part this installation lacks (JSON mode without llguidance): the server's
    fault, not the client's."""


class ShuttingDown(QwenRefError):
    """The server is stopping."""


# The service's answer to each error: (HTTP status, Workers AI error code). Codes from the service's error
# table where it has one (5006 bad input, 5005 no LoRA, 5007 no such model, 3006 too large, 3007 timeout,
# 3040 out of capacity, 10000 authentication, 7000 no route); else the status itself.
SERVICE_ERRORS: dict[type[Exception], tuple[int, int]] = {
    InvalidInput: (400, 5006),
    ContextWindowExceeded: (400, 400),
    JsonModeNotMet: (400, 400),
    KVMemoryExceeded: (413, 3006),
    LoraUnavailable: (405, 5005),
    Unauthorized: (401, 10000),
    NoSuchModel: (400, 5007),
    NoRoute: (404, 7000),
    MethodNotAllowed: (405, 405),
    RequestTooLarge: (413, 3006),
    UnsupportedMediaType: (415, 415),
    RequestTimeout: (408, 3007),
    OutOfCapacity: (429, 3040),
    ClientClosed: (499, 499),
    EngineError: (500, 500),
    ShuttingDown: (503, 503),
    FeatureUnavailable: (501, 501),
}


def service_status(error: Exception) -> tuple[int, int]:
    """(HTTP status, Workers AI code) for an error; any other typed error is the client's bad input."""
    for cls in type(error).__mro__:
        if cls in SERVICE_ERRORS:
            return SERVICE_ERRORS[cls]
    return SERVICE_ERRORS[InvalidInput] if isinstance(error, QwenRefError) else (500, 500)
