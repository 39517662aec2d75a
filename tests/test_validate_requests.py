"""Request validation (qwen_ref.workers_ai.validate): the seeds' valid requests pass unchanged, and defaults."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from validate_helpers import (
    COUNTRY_SCHEMA,
    HELLO,
    PEP8,
    PIZZA,
    PLAIN_TOOL,
    WRAPPED_TOOL,
    chat,
    parameters,
    plain_tool,
    tool_request,
    weather_property,
    wrapped_tool,
)

from qwen_ref.workers_ai.validate import DEFAULTS, InvalidInput, validate_input, with_defaults

VALID: dict[str, dict[str, Any]] = {
    "hello-world": {"messages": HELLO},
    "hello-world-stream": {"messages": HELLO, "stream": True},
    "pep8-messages": {"messages": PEP8},
    "pep8-prompt": {"prompt": "Tell me all about PEP-8"},
    "pizza": {"messages": PIZZA},
    "tools-plain": {"messages": chat("Weather in London?"), "tools": [PLAIN_TOOL]},
    "tools-wrapped": {"messages": chat("Weather in London?"), "tools": [WRAPPED_TOOL]},
    "tools-both-forms": {"messages": chat("Weather?"), "tools": [PLAIN_TOOL, WRAPPED_TOOL]},
    "tools-empty-properties": {
        "messages": chat("Time?"),
        "tools": [{"name": "now", "description": "The time", "parameters": {"type": "object", "properties": {}}}],
    },
    "tool-round-trip": {
        "messages": [
            *chat("Weather in London?"),
            {"role": "assistant", "content": '<tool_call>\n{"name": "getWeather", "arguments": {}}\n</tool_call>'},
            {"role": "tool", "content": '{"temperature": 12}'},
        ],
        "tools": [PLAIN_TOOL],
    },
    "functions": {"messages": PIZZA, "functions": [{"name": "add", "code": "return a + b"}]},
    "json-object": {"prompt": "A country as JSON", "response_format": {"type": "json_object"}},
    "json-schema": {
        "messages": chat("Tell me about India"),
        "response_format": {"type": "json_schema", "json_schema": COUNTRY_SCHEMA},
    },
    "json-schema-boolean": {"prompt": "anything", "response_format": {"type": "json_schema", "json_schema": True}},
    "lora-prompt": {"prompt": "<|im_start|>user\nhi<|im_end|>\n", "raw": True, "lora": "my-adapter"},
    "lora-messages": {"messages": HELLO, "raw": True, "lora": "00000000-0000-0000-0000-000000000000"},
    "lower-bounds": {
        "prompt": "x",
        "temperature": 0,
        "top_p": 0,
        "top_k": 1,
        "seed": 1,
        "repetition_penalty": 0,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "max_tokens": 1,
    },
    "upper-bounds": {
        "prompt": "x",
        "temperature": 5,
        "top_p": 2.0,
        "top_k": 50,
        "seed": 9999999999,
        "repetition_penalty": 2,
        "frequency_penalty": 2,
        "presence_penalty": 2,
        "max_tokens": 32768,
    },
    "empty-content": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
}


@pytest.mark.parametrize("request_body", VALID.values(), ids=VALID.keys())
def test_valid_requests_pass_unchanged(request_body: dict[str, Any]) -> None:
    before = copy.deepcopy(request_body)
    assert validate_input(request_body) == before
    assert request_body == before


def test_validate_input_returns_a_deep_copy() -> None:
    body = {"messages": copy.deepcopy(HELLO)}
    checked = validate_input(body)
    checked["messages"][0]["content"] = "changed"
    assert body["messages"][0]["content"] == "You are a friendly assistant"


def test_integral_floats_are_integers() -> None:
    checked = validate_input({"prompt": "x", "max_tokens": 2.0, "top_k": 40.0, "seed": 9999999999.0})
    assert checked == {"prompt": "x", "max_tokens": 2, "top_k": 40, "seed": 9999999999}
    assert all(type(checked[k]) is int for k in ("max_tokens", "top_k", "seed"))


# ----------------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_are_the_schema_defaults() -> None:
    assert dict(DEFAULTS) == {"max_tokens": 256, "temperature": 0.6, "raw": False, "stream": False}


def test_with_defaults_fills_without_mutating() -> None:
    body = {"messages": HELLO, "temperature": 0.2}
    filled = with_defaults(body)
    assert filled == {"messages": HELLO, "temperature": 0.2, "max_tokens": 256, "raw": False, "stream": False}
    assert body == {"messages": HELLO, "temperature": 0.2}
    assert with_defaults({"prompt": "x", "stream": True, "max_tokens": 3})["stream"] is True
    with pytest.raises(InvalidInput):
        with_defaults(["prompt"])  # type: ignore[arg-type]



# What zod, pydantic, LangChain's @tool and openai.pydantic_function_tool write: any JSON Schema is accepted as a
# tool's parameters (the service's published schema asks for more, but the clients do not send it)
ANY_SCHEMA_TOOLS = [
    plain_tool(description=...),
    plain_tool(parameters=...),
    plain_tool(parameters=parameters(type=...)),
    plain_tool(parameters=parameters(properties=...)),
    plain_tool(parameters=weather_property(description=...)),
    plain_tool(parameters=weather_property(type=...)),
    wrapped_tool(description=...),
    wrapped_tool(parameters=...),
    wrapped_tool(parameters=parameters(properties=...)),
    wrapped_tool(parameters=weather_property(description=...)),
    wrapped_tool(parameters={"type": "object", "properties": {"unit": {"anyOf": [{"type": "string"},
                                                                                {"type": "null"}]}},
                             "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}),
    wrapped_tool(parameters={"type": "object", "properties": {"days": {"type": ["integer", "null"], "default": None}},
                             "required": ["days"], "title": "Forecast"}),
    wrapped_tool(parameters={"properties": {}, "type": "object"}),
]


@pytest.mark.parametrize("tool", ANY_SCHEMA_TOOLS)
def test_tool_parameters_take_any_json_schema(tool):
    validate_input(tool_request(tool))
