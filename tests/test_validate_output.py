"""Output validation (qwen_ref.workers_ai.validate.validate_output) against the contract's output schema."""

from __future__ import annotations

import json
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from validate_helpers import COUNTRY_SCHEMA

from qwen_ref.errors import QwenRefError
from qwen_ref.workers_ai.validate import InvalidOutput, validate_output

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
