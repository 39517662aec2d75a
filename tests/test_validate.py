from __future__ import annotations

import copy
import json
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from qwen_ref.errors import QwenRefError
from qwen_ref.workers_ai.validate import (
    DEFAULTS,
    InvalidInput,
    InvalidOutput,
    validate_input,
    validate_output,
    with_defaults,
)

# ----------------------------------------------------------------------------------------------------------
# The seeds' own example requests, and tools in both forms


def chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a friendly assistant"}, {"role": "user", "content": user}]


HELLO = chat("What is the origin of the phrase Hello, World")
PEP8 = chat("Tell me all about PEP-8")
PIZZA = chat("Why is pizza so good")

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "latitude": {"type": "string", "description": "Latitude of the place"},
        "longitude": {"type": "string", "description": "Longitude of the place"},
    },
    "required": ["latitude", "longitude"],
}
PLAIN_TOOL = {"name": "getWeather", "description": "Current weather at a place", "parameters": WEATHER_PARAMETERS}
WRAPPED_TOOL = {"type": "function", "function": PLAIN_TOOL}
COUNTRY_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "capital": {"type": "string"},
        "languages": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "capital", "languages"],
}

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
# Invalid requests: (request, JSON path of the problem, rule)


def prm(**extra: Any) -> dict[str, Any]:
    return {"prompt": "Tell me all about PEP-8", **extra}


def msg(**extra: Any) -> dict[str, Any]:
    return {"messages": copy.deepcopy(HELLO), **extra}


def tool_request(tool: Any) -> dict[str, Any]:
    return msg(tools=[tool])


def plain_tool(**changes: Any) -> dict[str, Any]:
    tool = copy.deepcopy(PLAIN_TOOL)
    tool.update(changes)
    return {k: v for k, v in tool.items() if v is not ...}


def wrapped_tool(**changes: Any) -> dict[str, Any]:
    function = copy.deepcopy(PLAIN_TOOL)
    function.update(changes)
    return {"type": "function", "function": {k: v for k, v in function.items() if v is not ...}}


def parameters(**changes: Any) -> dict[str, Any]:
    params = copy.deepcopy(WEATHER_PARAMETERS)
    params.update(changes)
    return {k: v for k, v in params.items() if v is not ...}


def weather_property(**changes: Any) -> dict[str, Any]:
    prop = {"type": "string", "description": "Latitude"}
    prop.update(changes)
    return parameters(properties={"latitude": {k: v for k, v in prop.items() if v is not ...}})


NAN, INF = float("nan"), float("inf")

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
        {"messages": [*HELLO, {"role": "user", "content": "hi", "name": "bob"}]},
        "/messages/2/name",
        "additionalProperties",
    ),
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
    ("tool-missing-description", tool_request(plain_tool(description=...)), "/tools/0/description", "required"),
    ("tool-missing-parameters", tool_request(plain_tool(parameters=...)), "/tools/0/parameters", "required"),
    ("tool-name-number", tool_request(plain_tool(name=1)), "/tools/0/name", "type"),
    ("tool-parameters-string", tool_request(plain_tool(parameters="{}")), "/tools/0/parameters", "type"),
    (
        "tool-parameters-without-type",
        tool_request(plain_tool(parameters=parameters(type=...))),
        "/tools/0/parameters/type",
        "required",
    ),
    (
        "tool-parameters-without-properties",
        tool_request(plain_tool(parameters=parameters(properties=...))),
        "/tools/0/parameters/properties",
        "required",
    ),
    (
        "tool-parameters-required-not-strings",
        tool_request(plain_tool(parameters=parameters(required=[1]))),
        "/tools/0/parameters/required/0",
        "type",
    ),
    (
        "tool-property-without-description",
        tool_request(plain_tool(parameters=weather_property(description=...))),
        "/tools/0/parameters/properties/latitude/description",
        "required",
    ),
    (
        "tool-property-without-type",
        tool_request(plain_tool(parameters=weather_property(type=...))),
        "/tools/0/parameters/properties/latitude/type",
        "required",
    ),
    (
        "tool-property-not-object",
        tool_request(plain_tool(parameters=parameters(properties={"latitude": "string"}))),
        "/tools/0/parameters/properties/latitude",
        "type",
    ),
    ("tool-unknown-key", tool_request(plain_tool(strict=True)), "/tools/0/strict", "additionalProperties"),
    # tools: {type, function: {name, description, parameters}}
    ("wrapped-missing-type", tool_request({"function": PLAIN_TOOL}), "/tools/0/type", "required"),
    ("wrapped-type-number", tool_request({"type": 1, "function": PLAIN_TOOL}), "/tools/0/type", "type"),
    ("wrapped-function-string", tool_request({"type": "function", "function": "f"}), "/tools/0/function", "type"),
    ("wrapped-missing-name", tool_request(wrapped_tool(name=...)), "/tools/0/function/name", "required"),
    (
        "wrapped-missing-description",
        tool_request(wrapped_tool(description=...)),
        "/tools/0/function/description",
        "required",
    ),
    (
        "wrapped-missing-parameters",
        tool_request(wrapped_tool(parameters=...)),
        "/tools/0/function/parameters",
        "required",
    ),
    (
        "wrapped-parameters-without-properties",
        tool_request(wrapped_tool(parameters=parameters(properties=...))),
        "/tools/0/function/parameters/properties",
        "required",
    ),
    (
        "wrapped-property-without-description",
        tool_request(wrapped_tool(parameters=weather_property(description=...))),
        "/tools/0/function/parameters/properties/latitude/description",
        "required",
    ),
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


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (prm(temperature=5.01), ["5.01", "maximum 5", "from 0 to 5"]),
        (prm(top_k=2.5), ["2.5", "an integer from 1 to 50"]),
        (prm(seed=True), ["true", "boolean", "an integer from 1 to 9999999999"]),
        (prm(temprature=0.5), ["'temprature'", "did you mean 'temperature'"]),
        (prm(tools=[PLAIN_TOOL]), ["only allowed in a 'messages' request"]),
        ({"messages": [{"role": "bot", "content": "hi"}]}, ['"bot"', '"system"', '"user"', '"assistant"', '"tool"']),
        ({"prompt": "x", "messages": HELLO}, ["exactly one of 'prompt' or 'messages'", "both"]),
        ({}, ["exactly one of 'prompt' or 'messages'", "neither"]),
        ({"prompt": ""}, ["empty string", "at least 1"]),
        ({"messages": [{"role": "user"}]}, ["'content' is missing"]),
        (prm(temperature=NAN), ["NaN", "finite"]),
    ],
)
def test_messages_show_value_and_what_is_allowed(body: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_input(body)
    for word in words:
        assert word in str(caught.value)


def test_first_error_does_not_depend_on_key_order() -> None:
    body = {"top_k": 0, "messages": [{"role": "user"}], "temperature": 9, "temprature": 1}
    reordered = dict(reversed(list(body.items())))
    paths = set()
    for candidate in (body, reordered):
        with pytest.raises(InvalidInput) as caught:
            validate_input(candidate)
        paths.add(caught.value.path)
    assert paths == {"/messages/0/content"}


def test_every_unknown_key_is_named() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_input(prm(modle="x"))
    assert "'modle'" in str(caught.value)


def test_invalid_input_survives_pickling() -> None:
    with pytest.raises(InvalidInput) as caught:
        validate_input(prm(top_p=3))
    clone = pickle.loads(pickle.dumps(caught.value))
    assert (str(clone), clone.path, clone.rule, clone.code) == (
        str(caught.value),
        "/top_p",
        "maximum",
        5006,
    )


def test_jsonschema_itself_says_booleans_are_not_numbers() -> None:
    assert not Draft202012Validator({"type": "integer"}).is_valid(True)
    assert not Draft202012Validator({"type": "number"}).is_valid(False)
    assert Draft202012Validator({"type": "integer"}).is_valid(2.0)


def test_deep_nesting_is_refused() -> None:
    schema: dict[str, Any] = {}
    inner = schema
    for _ in range(200):
        inner["items"] = {}
        inner = inner["items"]
    with pytest.raises(InvalidInput) as caught:
        validate_input(prm(response_format={"type": "json_schema", "json_schema": schema}))
    assert caught.value.rule == "maxDepth"


def test_json_schema_of_another_draft_is_checked_by_its_draft() -> None:
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "definitions": {}}
    assert validate_input(prm(response_format={"type": "json_schema", "json_schema": draft7}))
    with pytest.raises(InvalidInput) as caught:
        validate_input(prm(response_format={"type": "json_schema", "json_schema": {"$schema": ["x"]}}))
    assert caught.value.path == "/response_format/json_schema/$schema"


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


# ----------------------------------------------------------------------------------------------------------
# Arbitrary JSON never raises anything but InvalidInput

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
KNOWN_KEYS = [
    "prompt", "messages", "lora", "raw", "stream", "max_tokens", "temperature", "top_p", "top_k", "seed",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "functions", "tools", "response_format",
]  # fmt: skip
roles = st.sampled_from(["system", "user", "assistant", "tool", "bot"])
message = st.fixed_dictionaries({"role": roles, "content": st.text(max_size=5)}) | st.dictionaries(
    st.sampled_from(["role", "content", "name"]), roles | json_values
)
tools = st.lists(
    st.sampled_from([PLAIN_TOOL, WRAPPED_TOOL, plain_tool(parameters=...), wrapped_tool(name=...)]) | json_values,
    max_size=3,
)
response_formats = st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["json_object", "json_schema", "text"]), "json_schema": json_values}
)
optional_fields = st.fixed_dictionaries(
    {},
    optional={
        **{key: json_values for key in KNOWN_KEYS if key not in ("prompt", "messages")},
        "temperature": st.floats(min_value=-1, max_value=6) | json_values,
        "top_k": st.integers(min_value=-1, max_value=60) | json_values,
        "max_tokens": st.integers(min_value=-1, max_value=10) | st.floats(min_value=-1, max_value=10),
        "tools": tools,
        "response_format": response_formats,
        "raw": st.booleans(),
    },
)
branches = st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=5) | json_values}),
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3) | json_values}),
    st.dictionaries(st.sampled_from(["prompt", "messages"]), json_values),
)
shaped_requests = st.builds(lambda branch, fields: {**fields, **branch}, branches, optional_fields)


def _check_any(value: Any) -> None:
    try:
        checked = validate_input(value)
    except InvalidInput as error:
        assert str(error).startswith("Bad input: /")
        assert error.path.startswith("/")
        return
    assert validate_input(checked) == checked
    json.dumps(checked, allow_nan=False)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_arbitrary_json_raises_only_invalid_input(value: Any) -> None:
    _check_any(value)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped_requests)
def test_request_shaped_json_raises_only_invalid_input(value: dict[str, Any]) -> None:
    _check_any(value)


# ----------------------------------------------------------------------------------------------------------
# Output

USAGE = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}

VALID_OUTPUTS: list[tuple[str, Any, Any]] = [
    ("text", {"response": "Hello, World comes from Kernighan.", "usage": USAGE}, None),
    ("empty-text", {"response": "", "usage": {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}}, None),
    ("no-usage", {"response": "hi"}, None),
    (
        "tool-calls",
        {
            "response": "",
            "usage": USAGE,
            "tool_calls": [{"name": "getWeather", "arguments": {"latitude": "51.5074", "longitude": "-0.1278"}}],
        },
        None,
    ),
    ("json-object", {"response": {"a": 1}, "usage": USAGE}, {"type": "json_object"}),
    (
        "json-schema",
        {"response": {"name": "India", "capital": "New Delhi", "languages": ["Hindi", "English"]}, "usage": USAGE},
        {"type": "json_schema", "json_schema": COUNTRY_SCHEMA},
    ),
]

INVALID_OUTPUTS: list[tuple[str, Any, Any, str]] = [
    ("not-object", ["hi"], None, "/"),
    ("sse-string", "data: [DONE]\n\n", None, "/"),
    ("missing-response", {"usage": USAGE}, None, "/"),
    ("response-number", {"response": 1, "usage": USAGE}, None, "/response"),
    ("object-response-without-json-mode", {"response": {"a": 1}}, None, "/response"),
    ("usage-list", {"response": "x", "usage": [1, 2, 3]}, None, "/usage"),
    ("usage-string-count", {"response": "x", "usage": {**USAGE, "prompt_tokens": "20"}}, None, "/usage/prompt_tokens"),
    ("usage-missing-count", {"response": "x", "usage": {"prompt_tokens": 1}}, None, "/usage/completion_tokens"),
    (
        "usage-negative",
        {"response": "x", "usage": {**USAGE, "completion_tokens": -1}},
        None,
        "/usage/completion_tokens",
    ),
    ("usage-bad-total", {"response": "x", "usage": {**USAGE, "total_tokens": 24}}, None, "/usage/total_tokens"),
    ("tool_calls-object", {"response": "x", "tool_calls": {"name": "f"}}, None, "/tool_calls"),
    (
        "tool_call-arguments-string",
        {"response": "", "tool_calls": [{"name": "f", "arguments": '{"a": 1}'}]},
        None,
        "/tool_calls/0/arguments",
    ),
    ("tool_call-missing-name", {"response": "", "tool_calls": [{"arguments": {}}]}, None, "/tool_calls/0/name"),
    ("json-object-array", {"response": [1], "usage": USAGE}, {"type": "json_object"}, "/response"),
    (
        "json-schema-mismatch",
        {"response": {"name": "India"}, "usage": USAGE},
        {"type": "json_schema", "json_schema": COUNTRY_SCHEMA},
        "/response",
    ),
]


@pytest.mark.parametrize(
    ("output", "response_format"), [c[1:] for c in VALID_OUTPUTS], ids=[c[0] for c in VALID_OUTPUTS]
)
def test_valid_outputs_pass(output: Any, response_format: Any) -> None:
    validate_output(output, response_format)


@pytest.mark.parametrize(
    ("output", "response_format", "path"), [c[1:] for c in INVALID_OUTPUTS], ids=[c[0] for c in INVALID_OUTPUTS]
)
def test_invalid_outputs_fail(output: Any, response_format: Any, path: str) -> None:
    with pytest.raises(InvalidOutput) as caught:
        validate_output(output, response_format)
    assert str(caught.value).startswith(f"invalid output: {path}")
    assert isinstance(caught.value, AssertionError) and isinstance(caught.value, QwenRefError)


def test_bundled_output_schema_accepts_what_validate_output_accepts() -> None:
    from importlib import resources

    schema = json.loads(resources.files("qwen_ref").joinpath("data", "output.schema.json").read_text())
    for _, output, response_format in VALID_OUTPUTS:
        if response_format is None:
            assert Draft202012Validator(schema).is_valid(output)
