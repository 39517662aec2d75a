"""What a reader makes of one generation in any format (BackendRecord of BackendTokens with their Alternatives),
and the JSON field helpers every reader uses: each names the offending field in a BackendFileError."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qwen_ref.oracle.files import BackendFileError


@dataclass
class Alternative:
    """One of a backend's top-N alternatives at a position."""

    logprob: float
    id: int | None = None
    text: str | None = None
    bytes: bytes | None = None


@dataclass
class BackendToken:
    """One position of a backend's output: the token (by id, bytes or text, whichever the format gives), its
    logprob, the top-N alternatives, and optionally its logprob under the backend's final sampling distribution."""

    logprob: float | None = None
    id: int | None = None
    text: str | None = None
    bytes: bytes | None = None
    top: list[Alternative] = field(default_factory=list)
    final_logprob: float | None = None


@dataclass
class BackendRecord:
    """One generation. The prompt is `prompt_ids`, else the Workers AI body `request` (chat template applied as
    generate() does), else the raw `prompt_text`. `params` are sampling fields by Workers AI name, or None
    when unknown (`notes` says why). `logprobs_of` says which distribution the token logprobs and top lists
    are of: "raw" (the model's) or "final" (after the backend's sampler)."""

    source: str
    tokens: list[BackendToken]
    prompt_ids: list[int] | None = None
    request: dict[str, Any] | None = None
    prompt_text: str | None = None
    params: dict[str, Any] | None = None
    text: str | None = None  # the whole output text, used to recover tokens shown only as U+FFFD
    prompt_tokens: list[BackendToken | None] | None = None  # prompt logprobs, aligned with the prompt
    logprobs_of: str = "raw"
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# JSON fields


def get_field(obj: Any, key: str, kind: type | tuple[type, ...], at: str, *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise BackendFileError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    value = obj.get(key)
    if value is None and optional:
        return None
    if value is None:
        raise BackendFileError(f"{at}: the field {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BackendFileError(f"{at}.{key}: expected {names}, got {json.dumps(value)[:60]}")
    return value


def as_object(value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BackendFileError(f"{at}: expected a JSON object, got {json.dumps(value)[:60]}")
    return value


def as_number(value: Any, at: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BackendFileError(f"{at}: expected a number, got {json.dumps(value)[:60]}")
    return float(value)


def maybe_number(value: Any, at: str) -> float | None:
    return None if value is None else as_number(value, at)


def token_id(value: Any, at: str) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)  # vLLM's logprob dicts have string keys in JSON
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BackendFileError(f"{at}: expected a token id (a non-negative integer), got {json.dumps(value)[:60]}")
    return value


def token_ids(value: Any, at: str) -> list[int]:
    if not isinstance(value, list):
        raise BackendFileError(f"{at}: expected a list of token ids, got {json.dumps(value)[:60]}")
    return [token_id(v, f"{at}[{i}]") for i, v in enumerate(value)]


def byte_list(value: Any, at: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, int) and 0 <= b < 256 for b in value):
        raise BackendFileError(f"{at}: expected a list of byte values 0..255")
    return bytes(value)


def attach_ids(tokens: list[BackendToken], ids: list[int], at: str) -> None:
    """The exact ids a response gives beside its logprob entries (vLLM's token_ids, llama.cpp's tokens)."""
    if len(ids) != len(tokens):
        raise BackendFileError(f"{at}: {len(ids)} token ids for {len(tokens)} logprob entries")
    for token, i in zip(tokens, ids):
        token.id = i


# ----------------------------------------------------------------------------------------------------------
# The prompt, from the request that produced a response


def set_prompt(record: BackendRecord, request: Mapping[str, Any] | None, at: str) -> None:
    if not request or record.prompt_ids is not None:
        return
    if isinstance(request.get("messages"), list):
        record.request = _chat_request(request)
    elif isinstance(request.get("prompt"), str):
        record.prompt_text = request["prompt"]
    elif isinstance(request.get("prompt"), list):
        record.prompt_ids = token_ids(request["prompt"], f"{at}: request.prompt")


def _chat_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat request's messages (text parts joined) and tools, as a Workers AI body."""
    messages = []
    for m in request["messages"]:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            m = {**m, "content": "".join(p.get("text", "") for p in content if isinstance(p, dict))}
        messages.append(m)
    body: dict[str, Any] = {"messages": messages}
    if request.get("tools"):
        body["tools"] = request["tools"]
    return body
