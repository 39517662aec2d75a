"""The server's settings and their defaults (no HTTP library needed to read them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_ref.workers_ai.limits import Limits

TOKEN_ENV = "QWEN_REF_API_TOKEN"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 1024
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Settings:
    api_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_queue: int = DEFAULT_MAX_QUEUE
    strict: bool = False  # unknown request keys: an error naming them, instead of ignored and listed
    limits: Limits = field(default_factory=Limits)  # request sizes, checked before any expensive work
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # the whole body must arrive within this (408)
