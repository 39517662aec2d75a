"""JSON mode: the schema of a response_format, and the errors of bad schemas and a missing llguidance."""

from __future__ import annotations

import sys

import pytest
from json_mask_helpers import (
    PERSON,
    VALID_TEXTS,
    constraint,
    feed,
    qwen_fixture,  # noqa: F401 (the fixture `qwen`)
    schema_format,
    tok_fixture,  # noqa: F401 (the fixture `tok`)
)

from qwen_ref.errors import QwenRefError
from qwen_ref.sampling.json_mask import (
    JSON_MODE_NOT_MET,
    InvalidJsonSchema,
    JsonConstraintError,
    JsonModeNotMet,
    JsonModeUnavailable,
    json_schema_of,
)

pytest.importorskip("llguidance")

# ----------------------------------------------------------------------------------------------------------
# response_format and schema errors


def test_the_schema_is_taken_directly_or_from_openais_wrapper(tok):
    direct = schema_format(PERSON)
    wrapped = schema_format({"name": "person", "strict": True, "schema": PERSON})
    assert json_schema_of(direct) == (PERSON, "/response_format/json_schema")
    assert json_schema_of(wrapped) == (PERSON, "/response_format/json_schema/schema")
    assert json_schema_of({"type": "json_object"})[0] == {"type": "object"}
    for rf in (direct, wrapped):
        c = constraint(tok, rf)
        feed(c, tok, VALID_TEXTS[0])
        assert c.is_complete()
    # a schema that only looks like a wrapper because it has other keys is a schema
    odd = {"type": "object", "schema": {"type": "string"}}
    assert json_schema_of(schema_format(odd))[0] == odd


BAD_FORMATS = [
    ({"type": "json_schema"}, "/response_format/json_schema", "required key 'json_schema' is missing"),
    ({"type": "text"}, "/response_format/type", "expected 'json_object' or 'json_schema'"),
    ({"type": "json_object", "json_schema": PERSON}, "/response_format/json_schema", "only allowed with"),
    ("json", "/response_format", "expected an object"),
    (schema_format([1]), "/response_format/json_schema", "expected a JSON Schema"),
    (schema_format(False), "/response_format/json_schema", "allows no value"),
    (schema_format({"type": "foo"}), "/response_format/json_schema/type", "not a valid JSON Schema"),
    (schema_format({"type": "object", "properties": {"a": {"minLength": "x"}}}),
     "/response_format/json_schema/properties/a/minLength", "not a valid JSON Schema"),
    (schema_format({"type": "object", "required": "a"}), "/response_format/json_schema/required",
     "not a valid JSON Schema"),
    (schema_format({"$schema": 7}), "/response_format/json_schema/$schema", "expected a string URI"),
    (schema_format({"name": "x", "schema": {"type": "foo"}}), "/response_format/json_schema/schema/type",
     "not a valid JSON Schema"),
    (schema_format({"name": "x", "strict": "yes", "schema": {}}), "/response_format/json_schema/strict",
     "expected a boolean"),
    (schema_format({"not": {"type": "string"}}), "/response_format/json_schema", 'Unimplemented keys: ["not"]'),
    (schema_format({"type": "array", "uniqueItems": True}), "/response_format/json_schema", "uniqueItems"),
    (schema_format({"type": "string", "minLength": 5, "maxLength": 2}), "/response_format/json_schema",
     "minLength (5) is greater than maxLength (2)"),
    (schema_format({"$ref": "#/$defs/missing"}), "/response_format/json_schema", "does not exist"),
    (schema_format({"allOf": [{"type": "string"}, {"type": "integer"}]}), "/response_format/json_schema",
     "Unsatisfiable"),
]


@pytest.mark.parametrize(("response_format", "path", "detail"), BAD_FORMATS)
def test_a_bad_response_format_raises_invalid_json_schema(tok, response_format, path, detail):
    with pytest.raises(InvalidJsonSchema) as info:
        constraint(tok, response_format)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, QwenRefError)
    assert error.path == path and detail in error.detail, str(error)
    assert str(error).startswith(f"{path}: ")


def test_llguidance_options_in_the_schema_are_ignored(tok):
    # "lenient" would make llguidance skip "not" instead of refusing a schema it cannot enforce
    with pytest.raises(InvalidJsonSchema, match="Unimplemented keys"):
        constraint(tok, schema_format({"x-guidance": {"lenient": True}, "not": {"type": "string"}}))
    c = constraint(tok, schema_format({"x-guidance": {"whitespace_flexible": True}, "type": "array"}))
    c.advance(tok.encode("[")[0])
    with pytest.raises(JsonConstraintError):  # a blank line: not in the bounded whitespace rule
        c.advance(tok.encode("\n\n")[0])


def test_a_true_schema_allows_any_value(tok):
    c = constraint(tok, schema_format(True))
    feed(c, tok, "[1, {}]")
    assert c.is_complete()


def test_without_llguidance_json_mode_says_how_to_install_it(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # makes `import llguidance` fail
    with pytest.raises(JsonModeUnavailable, match=r"pip install 'qwen-ref\[json\]'") as info:
        constraint(tok, {"type": "json_object"})
    assert isinstance(info.value, ImportError) and isinstance(info.value, QwenRefError)


def test_json_mode_not_met_has_the_services_message():
    error = JsonModeNotMet("max_tokens ran out")
    assert str(error) == JSON_MODE_NOT_MET == "JSON Mode couldn't be met"
    assert isinstance(error, QwenRefError) and error.detail == "max_tokens ran out"

