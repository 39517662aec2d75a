"""Request validation on generated JSON (hypothesis): nothing but InvalidInput is ever raised."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from validate_helpers import PLAIN_TOOL, WRAPPED_TOOL, plain_tool, wrapped_tool

from qwen_ref.workers_ai.validate import InvalidInput, validate_input

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

