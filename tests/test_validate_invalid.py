"""Request validation: each invalid request is refused with the JSON path of its problem and the rule broken."""

from __future__ import annotations

from typing import Any

import pytest
from validate_helpers import (
    COUNTRY_SCHEMA,
    HELLO,
    INF,
    NAN,
    PLAIN_TOOL,
    WRAPPED_TOOL,
    msg,
    parameters,
    plain_tool,
    prm,
    tool_request,
    wrapped_tool,
)

from qwen_ref.errors import QwenRefError
from qwen_ref.workers_ai.validate import InvalidInput, validate_input

# ----------------------------------------------------------------------------------------------------------
# Invalid requests: (request, JSON path of the problem, rule)


INVALID: list[tuple[str, Any, str, str]] = [
    # which branch
    ("neither-prompt-nor-messages", {}, "/", "oneOf"),
    ("only-sampling-fields", {"temperature": 0.5}, "/", "oneOf"),
    ("both-prompt-and-messages", {"prompt": "x", "messages": HELLO}, "/", "oneOf"),
    # not an object at all
    ("body-array", [HELLO], "/", "type"),
    ("body-string", "Tell me all about PEP-8", "/", "type"),
    ("body-null", None, "/", "type"),
    ("body-number", 5, "/", "type"),
    # prompt
    ("prompt-empty", {"prompt": ""}, "/prompt", "minLength"),
    ("prompt-number", {"prompt": 5}, "/prompt", "type"),
    ("prompt-null", {"prompt": None}, "/prompt", "type"),
    ("prompt-list", {"prompt": ["a"]}, "/prompt", "type"),
    # messages
    ("messages-string", {"messages": "hi"}, "/messages", "type"),
    ("messages-object", {"messages": {"role": "user", "content": "hi"}}, "/messages", "type"),
    ("messages-empty", {"messages": []}, "/messages", "minItems"),
    ("message-not-object", {"messages": [5]}, "/messages/0", "type"),
    ("message-string", {"messages": ["hi"]}, "/messages/0", "type"),
    ("message-missing-role", {"messages": [{"content": "hi"}]}, "/messages/0/role", "required"),
    ("message-missing-content", {"messages": [{"role": "user"}]}, "/messages/0/content", "required"),
    ("message-content-array", {"messages": [{"role": "user", "content": ["hi"]}]}, "/messages/0/content", "type"),
    ("message-content-null", {"messages": [{"role": "user", "content": None}]}, "/messages/0/content", "type"),
    ("message-content-number", {"messages": [{"role": "user", "content": 1}]}, "/messages/0/content", "type"),
    ("message-role-number", {"messages": [{"role": 1, "content": "hi"}]}, "/messages/0/role", "type"),
    ("message-role-unknown", {"messages": [{"role": "bot", "content": "hi"}]}, "/messages/0/role", "enum"),
    ("message-role-case", {"messages": [{"role": "User", "content": "hi"}]}, "/messages/0/role", "enum"),
    (
        "message-unknown-key",
        {"messages": [*HELLO, {"role": "user", "content": "hi", "nmae": "bob"}]},  # name is known (tool messages)
        "/messages/2/nmae",
        "additionalProperties",
    ),
    ("tool-calls-not-a-list", {"messages": [*HELLO, {"role": "assistant", "content": "", "tool_calls": {}}]},
     "/messages/2/tool_calls", "type"),
    ("tool-call-without-name", {"messages": [*HELLO, {"role": "assistant", "content": "",
                                                      "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "/messages/2/tool_calls/0", "oneOf"),
    ("tool-call-id-number", {"messages": [*HELLO, {"role": "tool", "content": "1", "tool_call_id": 7}]},
     "/messages/2/tool_call_id", "type"),
    # numeric bounds, just outside
    ("temperature-below", prm(temperature=-0.01), "/temperature", "minimum"),
    ("temperature-above", prm(temperature=5.01), "/temperature", "maximum"),
    ("top_p-below", prm(top_p=-0.1), "/top_p", "minimum"),
    ("top_p-above", prm(top_p=2.1), "/top_p", "maximum"),
    ("top_k-zero", prm(top_k=0), "/top_k", "minimum"),
    ("top_k-above", msg(top_k=51), "/top_k", "maximum"),
    ("top_k-fraction", prm(top_k=2.5), "/top_k", "type"),
    ("seed-zero", prm(seed=0), "/seed", "minimum"),
    ("seed-above", msg(seed=10000000000), "/seed", "maximum"),
    ("seed-fraction", prm(seed=1.5), "/seed", "type"),
    ("repetition_penalty-below", prm(repetition_penalty=-0.1), "/repetition_penalty", "minimum"),
    ("repetition_penalty-above", msg(repetition_penalty=2.1), "/repetition_penalty", "maximum"),
    ("frequency_penalty-below", msg(frequency_penalty=-0.1), "/frequency_penalty", "minimum"),
    ("frequency_penalty-above", prm(frequency_penalty=2.1), "/frequency_penalty", "maximum"),
    ("presence_penalty-below", prm(presence_penalty=-0.1), "/presence_penalty", "minimum"),
    ("presence_penalty-above", msg(presence_penalty=2.1), "/presence_penalty", "maximum"),
    ("max_tokens-zero", prm(max_tokens=0), "/max_tokens", "minimum"),
    ("max_tokens-negative", msg(max_tokens=-5), "/max_tokens", "minimum"),
    ("max_tokens-fraction", prm(max_tokens=1.5), "/max_tokens", "type"),
    # wrong types
    ("max_tokens-string", prm(max_tokens="256"), "/max_tokens", "type"),
    ("temperature-string", prm(temperature="0.5"), "/temperature", "type"),
    ("top_p-null", msg(top_p=None), "/top_p", "type"),
    ("raw-string", prm(raw="yes"), "/raw", "type"),
    ("raw-number", msg(raw=1), "/raw", "type"),
    ("stream-number", prm(stream=1), "/stream", "type"),
    ("stream-null", msg(stream=None), "/stream", "type"),
    ("lora-number", prm(lora=5), "/lora", "type"),
    ("lora-object-with-messages", msg(lora={"name": "x"}), "/lora", "type"),
    # booleans are not numbers
    ("temperature-true", prm(temperature=True), "/temperature", "type"),
    ("top_k-true", msg(top_k=True), "/top_k", "type"),
    ("seed-false", prm(seed=False), "/seed", "type"),
    ("max_tokens-true", prm(max_tokens=True), "/max_tokens", "type"),
    ("presence_penalty-false", msg(presence_penalty=False), "/presence_penalty", "type"),
    # NaN and infinities
    ("temperature-nan", prm(temperature=NAN), "/temperature", "finite"),
    ("top_p-inf", msg(top_p=INF), "/top_p", "finite"),
    ("repetition_penalty-neg-inf", prm(repetition_penalty=-INF), "/repetition_penalty", "finite"),
    ("max_tokens-inf", prm(max_tokens=INF), "/max_tokens", "finite"),
    (
        "nan-inside-json-schema",
        prm(response_format={"type": "json_schema", "json_schema": {"type": "number", "maximum": NAN}}),
        "/response_format/json_schema/maximum",
        "finite",
    ),
    # values no JSON document holds
    ("prompt-tuple", {"prompt": ("a",)}, "/prompt", "json"),
    ("messages-tuple", {"messages": tuple(HELLO)}, "/messages", "json"),
    ("prompt-bytes", {"prompt": b"hi"}, "/prompt", "json"),
    ("non-string-key", {"prompt": "x", 1: 2}, "/", "json"),
    # tools: the container
    ("tools-object", msg(tools=PLAIN_TOOL), "/tools", "type"),
    ("tool-not-object", msg(tools=["getWeather"]), "/tools/0", "type"),
    ("tools-with-prompt", prm(tools=[PLAIN_TOOL]), "/tools", "additionalProperties"),
    # tools: {name, description, parameters}
    ("tool-missing-name", tool_request(plain_tool(name=...)), "/tools/0/name", "required"),
    ("tool-name-number", tool_request(plain_tool(name=1)), "/tools/0/name", "type"),
    ("tool-parameters-string", tool_request(plain_tool(parameters="{}")), "/tools/0/parameters", "type"),
    (  # parameters take any JSON Schema, but it must be one
        "tool-parameters-required-not-strings",
        tool_request(plain_tool(parameters=parameters(required=[1]))),
        "/tools/0/parameters/required/0",
        "jsonSchema",
    ),
    (
        "tool-property-not-object",
        tool_request(plain_tool(parameters=parameters(properties={"latitude": "string"}))),
        "/tools/0/parameters/properties/latitude",
        "jsonSchema",
    ),
    ("tool-unknown-key", tool_request(plain_tool(strict=True)), "/tools/0/strict", "additionalProperties"),
    # tools: {type, function: {name, description, parameters}}
    ("wrapped-missing-type", tool_request({"function": PLAIN_TOOL}), "/tools/0/type", "required"),
    ("wrapped-type-number", tool_request({"type": 1, "function": PLAIN_TOOL}), "/tools/0/type", "type"),
    ("wrapped-function-string", tool_request({"type": "function", "function": "f"}), "/tools/0/function", "type"),
    ("wrapped-missing-name", tool_request(wrapped_tool(name=...)), "/tools/0/function/name", "required"),
    (
        "wrapped-and-plain-mixed",
        tool_request({**WRAPPED_TOOL, "name": "getWeather"}),
        "/tools/0/name",
        "additionalProperties",
    ),
    # functions
    ("functions-object", msg(functions={"name": "f", "code": "c"}), "/functions", "type"),
    ("function-missing-code", msg(functions=[{"name": "f"}]), "/functions/0/code", "required"),
    ("function-missing-name", msg(functions=[{"code": "c"}]), "/functions/0/name", "required"),
    ("function-code-number", msg(functions=[{"name": "f", "code": 1}]), "/functions/0/code", "type"),
    (
        "function-unknown-key",
        msg(functions=[{"name": "f", "code": "c", "lang": "js"}]),
        "/functions/0/lang",
        "additionalProperties",
    ),
    ("functions-with-prompt", prm(functions=[{"name": "f", "code": "c"}]), "/functions", "additionalProperties"),
    # response_format
    ("response_format-string", prm(response_format="json_object"), "/response_format", "type"),
    ("response_format-type-unknown", msg(response_format={"type": "xml"}), "/response_format/type", "enum"),
    ("response_format-type-text", prm(response_format={"type": "text"}), "/response_format/type", "enum"),
    ("response_format-type-missing", prm(response_format={}), "/response_format/type", "required"),
    (
        "response_format-json_schema-missing",
        msg(response_format={"type": "json_schema"}),
        "/response_format/json_schema",
        "required",
    ),
    (
        "response_format-json_schema-not-schema",
        prm(response_format={"type": "json_schema", "json_schema": "object"}),
        "/response_format/json_schema",
        "type",
    ),
    (
        "response_format-json_schema-invalid",
        prm(response_format={"type": "json_schema", "json_schema": {"type": "objec"}}),
        "/response_format/json_schema/type",
        "jsonSchema",
    ),
    (
        "response_format-json_schema-with-json_object",
        prm(response_format={"type": "json_object", "json_schema": COUNTRY_SCHEMA}),
        "/response_format/json_schema",
        "additionalProperties",
    ),
    (
        "response_format-schema-instead-of-json_schema",
        prm(response_format={"type": "json_schema", "schema": COUNTRY_SCHEMA}),
        "/response_format/json_schema",
        "required",
    ),
    (
        "response_format-unknown-key",
        msg(response_format={"type": "json_object", "strict": True}),
        "/response_format/strict",
        "additionalProperties",
    ),
    # unknown keys
    ("unknown-key-typo", prm(temprature=0.5), "/temprature", "additionalProperties"),
    ("unknown-key-model", msg(model="@cf/qwen/qwen1.5-0.5b-chat"), "/model", "additionalProperties"),
    ("unknown-key-max_new_tokens", msg(max_new_tokens=10), "/max_new_tokens", "additionalProperties"),
]


@pytest.mark.parametrize(("body", "path", "rule"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_requests_name_the_path(body: Any, path: str, rule: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_input(body)
    error = caught.value
    assert (error.path, error.rule) == (path, rule), str(error)
    assert str(error).startswith(f"Bad input: {path}: ")
    assert error.code == 5006
    assert isinstance(error, ValueError) and isinstance(error, QwenRefError)


def test_the_table_is_large_and_unique() -> None:
    assert len(INVALID) >= 40
    assert len({name for name, *_ in INVALID}) == len(INVALID)
