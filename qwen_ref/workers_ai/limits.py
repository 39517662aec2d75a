"""Limits on a request's size, checked before any expensive work (schema validation, the chat template, the
tokenizer, grammar compilation), so that a hostile request costs milliseconds. The server takes each from a
flag (docs/server.md); generate() uses the defaults unless given `limits=`.

A text that cannot fit the context window is refused before it is tokenized: no token is longer than the
tokenizer's longest token (128 bytes for Qwen's vocabulary), so a text of C characters has at least
C / 128 tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from qwen_ref.errors import ContextWindowExceeded, InvalidInput


@dataclass(frozen=True)
class Limits:
    prompt_chars: int = 1_000_000  # the prompt, or the text of all messages together
    messages: int = 4096
    tools: int = 256
    schema_chars: int = 200_000  # response_format and all tools, as JSON text


DEFAULT_LIMITS = Limits()


def _texts(inputs: dict[str, Any]) -> int:
    """Characters of the prompt, or of every string value in the messages (content, earlier tool calls' names
    and arguments, ...): whatever a template may render. Bounded by the request's depth limit (validation)."""
    if isinstance(inputs.get("prompt"), str):
        return len(inputs["prompt"])
    total, stack = 0, [inputs.get("messages")]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return total


def _json_chars(value: Any) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False, default=str))
    except (ValueError, RecursionError):  # circular or too deep: validation names the problem
        return 0


def check_limits(inputs: Any, limits: Limits = DEFAULT_LIMITS) -> int:
    """Raise InvalidInput for a request over a limit; return its text's character count."""
    if not isinstance(inputs, dict):
        return 0
    messages, tools = inputs.get("messages"), inputs.get("tools")
    if isinstance(messages, list) and len(messages) > limits.messages:
        raise InvalidInput("/messages", "maxItems", f"{len(messages)} messages; at most {limits.messages}")
    if isinstance(tools, list) and len(tools) > limits.tools:
        raise InvalidInput("/tools", "maxItems", f"{len(tools)} tools; at most {limits.tools}")
    chars = _texts(inputs)
    if chars > limits.prompt_chars:
        where = "/prompt" if "prompt" in inputs else "/messages"
        raise InvalidInput(where, "maxLength", f"{chars} characters of text; at most {limits.prompt_chars}")
    for key in ("response_format", "tools"):
        size = _json_chars(inputs.get(key)) if inputs.get(key) is not None else 0
        if size > limits.schema_chars:
            raise InvalidInput(f"/{key}", "maxLength", f"{size} characters as JSON; at most {limits.schema_chars}")
    return chars


def check_fits(chars: int, max_tokens: int, window: int, longest_token: int) -> None:
    """ContextWindowExceeded when even the fewest tokens `chars` characters can make do not fit."""
    fewest = -(-chars // max(longest_token, 1))
    if fewest + max_tokens > window:
        raise ContextWindowExceeded(
            f"This model's maximum context length is {window} tokens. However, you requested {max_tokens} output "
            f"tokens and your prompt's {chars} characters make at least {fewest} input tokens, for a total of at "
            f"least {fewest + max_tokens} tokens. Please reduce the length of the input prompt or max_tokens.")
