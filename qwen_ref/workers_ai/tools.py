"""Tools in, tool calls out: the request's `tools` in the one form templates get, the model's calls parsed back.

Rules (docs/chat_and_tools.md has examples):
- `normalize_tools` turns both request forms into the OpenAI form Qwen's own docs pass to the template:
  `{"type": "function", "function": {"name", "description", "parameters", ...}}`.
- `parse_tool_calls` reads Qwen's hermes-style `<tool_call>{json}</tool_call>` blocks (any tool name), and, only
  when tools were offered and no such block parsed, fenced ```json blocks or a bare JSON object naming an
  offered tool. A block that does not parse stays in the text; the others still count.
- `check_functions` validates `functions` (embedded function calling); they are accepted and ignored.
- `tool_choice`: "auto" (the default) lets the model choose, "none" hides the tools, "required" and a named
  function (`{"type": "function", "function": {"name"}}`) are enforced by `tool_call_grammar`: the output is
  tool-call blocks in Qwen's format whose JSON validates against the called tool's parameters.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from qwen_ref.errors import QwenRefError
from qwen_ref.sampling.json_schema import lark_json

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_FUNCTION_KEYS = ("name", "description", "parameters")
# A fence line ``` or ```json, a body, and a closing fence on its own line (or right after the body).
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n(.*?)\r?\n?[ \t]*```", re.DOTALL | re.IGNORECASE)
_DECODER = json.JSONDecoder()

ToolCall = dict[str, Any]  # {"name": str, "arguments": dict}


class ToolSpecError(QwenRefError, ValueError):
    """`tools` or `functions` in a request have a shape the reference cannot use."""


def _where(path: str, rule: str, value: Any) -> ToolSpecError:
    shown = json.dumps(value, ensure_ascii=False, default=repr)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ToolSpecError(f"{path}: {rule}, got {shown}")


def _function_body(spec: Mapping[str, Any], path: str) -> dict[str, Any]:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _where(f"{path}.name", "must be a non-empty string", name)
    if "description" in spec and not isinstance(spec["description"], str):
        raise _where(f"{path}.description", "must be a string", spec["description"])
    if "parameters" in spec and not isinstance(spec["parameters"], Mapping):
        raise _where(f"{path}.parameters", "must be an object (a JSON Schema)", spec["parameters"])
    body = {key: copy.deepcopy(spec[key]) for key in _FUNCTION_KEYS if key in spec}
    body.update((key, copy.deepcopy(value)) for key, value in spec.items() if key not in _FUNCTION_KEYS)
    return body


def normalize_tools(tools: Any) -> list[dict[str, Any]]:
    """Both request forms as `{"type": "function", "function": {"name", "description", "parameters", ...}}`.

    A tool with a "function" key is the wrapped form (its "type" is kept, default "function"); otherwise it is the
    flat form `{name, description, parameters}`, whose keys all move into "function". The function's keys come in
    the order name, description, parameters, then any others in their given order. None gives [].
    """
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _where("tools", "must be a list of tool objects", tools)
    normalized = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        if not isinstance(tool, Mapping):
            raise _where(path, "must be an object", tool)
        if "function" not in tool:
            normalized.append({"type": "function", "function": _function_body(tool, path)})
            continue
        if "name" in tool:
            raise ToolSpecError(f"{path}: has both 'name' and 'function'; use one form, not both")
        function = tool["function"]
        if not isinstance(function, Mapping):
            raise _where(f"{path}.function", "must be an object", function)
        kind = tool.get("type", "function")
        if not isinstance(kind, str):
            raise _where(f"{path}.type", "must be a string", kind)
        entry = {"type": kind, "function": _function_body(function, f"{path}.function")}
        entry.update((k, copy.deepcopy(v)) for k, v in tool.items() if k not in ("type", "function"))
        normalized.append(entry)
    return normalized


def forced_tools(tools: list[dict[str, Any]], choice: Any) -> list[dict[str, Any]] | None:
    """The normalized tools a tool_choice forces a call to (None: the model chooses, or no tools are shown);
    ToolSpecError when the choice names no offered tool or there are none to call."""
    if choice in (None, "auto", "none"):
        return None
    if not tools:
        raise ToolSpecError(f"{json.dumps(choice)} needs tools; the request offers none")
    if choice == "required":
        return tools
    name = choice["function"]["name"]
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        offered = ", ".join(sorted(tool_names(tools)))
        raise ToolSpecError(f"{json.dumps(name, ensure_ascii=False)[:80]} is not an offered tool; offered: {offered}")
    return named[:1]


def _arguments_schema(function: dict[str, Any]) -> dict[str, Any]:
    params = {k: v for k, v in (function.get("parameters") or {}).items() if k != "$schema"}
    return params if "type" in params else {"type": "object", **params}


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a Lark string literal: the same quoting and escapes as JSON


def tool_call_grammar(tools: list[dict[str, Any]], many: bool) -> str:
    """An llguidance Lark grammar for the output: one tool-call block (many=True: one or more, a newline apart,
    as Qwen's template joins them), each `<tool_call>\\n{"name": <tool>, "arguments": <JSON>}\\n</tool_call>` in the
    form the template shows the model, the arguments valid against that tool's parameters (their own root, so
    their "#/..." references resolve as in the tool's schema)."""
    calls, rules = [], []
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        head = _lark_string(f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ')
        calls.append(f"{head} args_{i}")
        rules.append(f"args_{i}: {lark_json(_arguments_schema(tool['function']))}")
    start = 'start: block ("\\n" block)*' if many else "start: block"
    close = _lark_string("}\n" + TOOL_CALL_CLOSE)
    return "\n".join([start, f"block: ({' | '.join(calls)}) {close}", *rules])


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    """The function names in normalized tools."""
    return {tool["function"]["name"] for tool in tools}


def check_functions(functions: Any) -> None:
    """Validate `functions` ([{name, code}], Workers AI's embedded function calling).

    The service's semantics for them are undocumented. The reference accepts well-formed entries and otherwise
    ignores them: their code is never executed and they are not shown to the model (not passed to the template).
    """
    if functions is None:
        return
    if not isinstance(functions, list):
        raise _where("functions", "must be a list of {name, code} objects", functions)
    for i, function in enumerate(functions):
        path = f"functions[{i}]"
        if not isinstance(function, Mapping):
            raise _where(path, "must be an object with 'name' and 'code'", function)
        for key in ("name", "code"):
            if key not in function:
                raise ToolSpecError(f"{path}: missing required key {key!r}")
            if not isinstance(function[key], str):
                raise _where(f"{path}.{key}", "must be a string", function[key])


def _as_call(obj: Any, names: set[str] | None) -> ToolCall | None:
    # {"name": str, "arguments": object | JSON text of an object}; a missing "arguments" falls back to
    # "parameters" (some models write that), then to {}.
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name or (names is not None and name not in names):
        return None
    arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"name": name, "arguments": arguments}


def _as_calls(value: Any, names: set[str] | None) -> list[ToolCall] | None:
    # One call object, or a non-empty list of them; None unless every entry is a valid call.
    items = value if isinstance(value, list) else [value]
    calls = [call for call in (_as_call(item, names) for item in items) if call is not None]
    return calls if calls and len(calls) == len(items) else None


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _decode_json_at(text: str, pos: int) -> tuple[Any, int] | None:
    pos = _skip_ws(text, pos)
    try:
        return _DECODER.raw_decode(text, pos)
    except ValueError:
        return None


def _hermes_blocks(text: str) -> list[tuple[int, int, list[ToolCall]]]:
    # Each "<tool_call>" opens a block when what follows is one JSON value, then optional whitespace, then
    # "</tool_call>" or the end of the text (an unterminated last block). A block that does not parse is no block:
    # its text stays, and the search goes on at the next "<tool_call>".
    blocks = []
    pos = text.find(TOOL_CALL_OPEN)
    while pos != -1:
        after = pos + len(TOOL_CALL_OPEN)
        next_pos = text.find(TOOL_CALL_OPEN, after)
        decoded = _decode_json_at(text, after)
        if decoded is not None:
            value, end = decoded
            end = _skip_ws(text, end)
            closed = text.startswith(TOOL_CALL_CLOSE, end)
            calls = _as_calls(value, None)
            if calls is not None and (closed or end == len(text)):
                end += len(TOOL_CALL_CLOSE) if closed else 0
                blocks.append((pos, end, calls))
                next_pos = text.find(TOOL_CALL_OPEN, end)
        pos = next_pos
    return blocks


def _fenced_blocks(text: str, names: set[str]) -> list[tuple[int, int, list[ToolCall]]]:
    blocks = []
    for match in _FENCE.finditer(text):
        decoded = _decode_json_at(match.group(1), 0)
        if decoded is None or match.group(1)[decoded[1]:].strip():
            continue
        calls = _as_calls(decoded[0], names)
        if calls is not None:
            blocks.append((match.start(), match.end(), calls))
    return blocks


def _bare_json(text: str, names: set[str]) -> list[tuple[int, int, list[ToolCall]]]:
    decoded = _decode_json_at(text, 0)
    if decoded is None or text[decoded[1]:].strip():
        return []
    calls = _as_calls(decoded[0], names)
    return [] if calls is None else [(0, len(text), calls)]


def parse_tool_calls(text: str, tool_names: set[str] | None = None) -> tuple[str, list[ToolCall]]:
    """Split model output into (content, tool_calls).

    Without any call found, the content is `text` unchanged. With calls, the content is the text outside the
    blocks that became calls (malformed blocks stay in it), with surrounding whitespace stripped.
    `tool_names` is the set of offered tools: fenced/bare JSON calls are only looked for when it is non-empty,
    and only name one of them; `<tool_call>` blocks may name any tool.
    """
    blocks = _hermes_blocks(text)
    if not blocks and tool_names:
        blocks = _fenced_blocks(text, tool_names) or _bare_json(text, tool_names)
    if not blocks:
        return text, []
    pieces, calls, last = [], [], 0
    for start, end, block_calls in blocks:
        pieces.append(text[last:start])
        calls.extend(block_calls)
        last = end
    pieces.append(text[last:])
    return "".join(pieces).strip(), calls
