"""HTTP in and out: auth, the body as JSON, and errors in the service's envelope (or OpenAI's error shape).

The server's modules import starlette (the `serve` extra) at their top; `qwen-ref serve` imports them when it runs.

Every answer to an error takes its status and code from qwen_ref.errors.SERVICE_ERRORS.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwen_ref.errors import (
    ContextWindowExceeded,
    InvalidInput,
    JsonModeNotMet,
    LoraUnavailable,
    QwenRefError,
    RequestTimeout,
    RequestTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    service_status,
)
from qwen_ref.server.settings import Settings

log = logging.getLogger("qwen_ref.server")
_SURROGATE = re.compile("[\ud800-\udfff]")
# the content types a JSON body may arrive with: curl -d sends form-urlencoded, and the service reads it as JSON
JSON_LIKE_TYPES = ("", "application/json", "text/plain", "application/x-www-form-urlencoded")
# errors of the request contract, which the service words as "AiError: ..."
CONTRACT_ERRORS = (InvalidInput, LoraUnavailable, ContextWindowExceeded, JsonModeNotMet)


# Server-side directories (the models', the adapters', the cache) never reach a client: create_app adds them, and
# every error message shown to a client has them replaced by "…" (the server's log keeps the full message).
HIDDEN_PATHS: set[str] = set()


def hide_paths(*paths: Any) -> None:
    """Hide these directories (absolute, resolved: a relative "model" would hide the word everywhere)."""
    for path in paths:
        if path is not None:
            for form in {str(Path(path).absolute()), str(Path(path).resolve())}:
                if len(form) > 1:
                    HIDDEN_PATHS.add(form)


def _scrub(text: str) -> str:
    for path in sorted(HIDDEN_PATHS, key=len, reverse=True):
        text = text.replace(path, "…")
    return text


def message_of(e: Exception) -> str:
    """The message the service gives for an error (always encodable: a lone surrogate becomes U+FFFD; no
    server-side path)."""
    if isinstance(e, CONTRACT_ERRORS):
        text = f"AiError: {e}"
    elif isinstance(e, QwenRefError) and service_status(e) == service_status(InvalidInput("/", "", "")):
        text = f"AiError: Bad input: {e}"  # another typed error of the request (a template, an adapter file)
    else:
        text = str(e) if isinstance(e, QwenRefError) else f"Internal server error: {type(e).__name__}"
    scrubbed = _scrub(text)
    if scrubbed != text:
        log.info("error shown without server paths: %s", text)
    return _SURROGATE.sub("\ufffd", scrubbed)


def bad_input(path: str, detail: str) -> InvalidInput:
    return InvalidInput(path, "request", detail)


def check_auth(request: Request, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    # headers arrive as latin-1 text of the raw bytes: compare bytes, so a non-ASCII token can match
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1", "replace"),
                                                            token.encode("utf-8")):
        raise Unauthorized("Authentication error")


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The body, at most `limit` bytes (413), whole within `timeout_s` seconds (408)."""
    too_large = RequestTooLarge(f"Request too large: the body is over the server's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
        raise RequestTimeout(f"Timeout: the request body did not arrive within {timeout_s:g}s") from None
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_LIKE_TYPES and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"Bad input: the body must be JSON, not {kind!r} (send application/json)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} does not fit a double")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise bad_input("/", f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise bad_input("/", "the body nests arrays or objects too deeply") from None
    except ValueError as e:  # JSONDecodeError, a non-finite number, an integer of too many digits
        raise bad_input("/", f"the body is not valid JSON ({e})") from None


async def read_json(request: Request, settings: Settings) -> Any:
    check_content_type(request)
    return parse_json(await read_body(request, settings.max_body_bytes, settings.body_timeout_s))


def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def error_envelope(e: Exception, reached_model: bool = False) -> dict[str, Any]:
    """The service's error envelope; `result` is {} for an error of a request that reached the model (its
    input, its generation), null for one refused before (auth, route, body)."""
    return {"result": {} if reached_model else None, "success": False,
            "errors": [{"code": service_status(e)[1], "message": message_of(e)}], "messages": []}


def openai_error_body(e: Exception) -> dict[str, Any]:
    status, code = service_status(e)
    kinds = {401: "authentication_error", 404: "not_found_error", 408: "timeout", 429: "rate_limit_error"}
    kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message_of(e), "type": kind, "param": None, "code": code}}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/ai/v1/" in path


def error_response(path: str, e: Exception, reached_model: bool = False) -> Response:
    body = openai_error_body(e) if is_openai_path(path) else error_envelope(e, reached_model)
    status = service_status(e)[0]
    return JSONResponse(body, status_code=status, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
