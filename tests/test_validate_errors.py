"""Request validation: what the error messages say, which error comes first, and the edge cases of schemas."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from validate_helpers import HELLO, NAN, PLAIN_TOOL, prm

from qwen_ref.workers_ai.validate import InvalidInput, validate_input


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

