"""What the JSON-mode tests share: vocabulary sizes, eos ids, the schemas, the tiny Qwen2.5 model and its
tokenizer (fixtures), and helpers that build a constraint and feed it text."""

from __future__ import annotations

import json

import pytest

import qwen_ref
from qwen_ref.sampling.json_mask import JsonConstraint

V = 151936  # the tiny Qwen2.5 model's logits rows; its tokenizer knows 151665 ids
CODER_V = 152064
EOS = (151645, 151643)  # <|im_end|>, <|endoftext|>

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                "address": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 8},
                                   "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city"],
                    "additionalProperties": False,
                },
            },
            "required": ["id", "tags", "address"],
            "additionalProperties": False,
        },
        "score": {"type": "number", "minimum": 0, "maximum": 10},
    },
    "required": ["user", "score"],
    "additionalProperties": False,
}
ENUMS = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "sizes": {"type": "array", "items": {"enum": ["S", "M", "L"]}, "minItems": 1, "maxItems": 4},
        "note": {"type": ["string", "null"], "maxLength": 8},
        "version": {"const": 2},
    },
    "required": ["color", "sizes", "version"],
    "additionalProperties": False,
}
NUMBERS = {
    "type": "object",
    "properties": {
        "values": {"type": "array", "items": {"type": "number"}, "maxItems": 4},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
        "count": {"type": "integer", "minimum": -5, "maximum": 5},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["values", "flags", "count"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", name="qwen")
def qwen_fixture(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


@pytest.fixture(scope="module", name="tok")
def tok_fixture(qwen):
    return qwen.tokenizer


def constraint(tok, response_format, vocab_size=V, **kw) -> JsonConstraint:
    return JsonConstraint.from_response_format(response_format, tok, vocab_size, eos_ids=EOS, **kw)


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": schema}


def allowed_ids(c: JsonConstraint) -> list[int]:
    return c.allowed_mask().nonzero().flatten().tolist()


def feed(c: JsonConstraint, tok, text: str) -> None:
    """Advance through the tokens of `text`, checking each was allowed by the mask before it."""
    for t in tok.encode(text):
        mask = c.allowed_mask()
        assert mask[t], f"{tok.decode([t])!r} should be allowed after the text before it in {text!r}"
        c.advance(t)


VALID_TEXTS = [
    '{"name": "Ada", "age": 36, "admin": true}',
    '{"name":"Ada","age":36,"admin":false}',
    json.dumps({"name": "Zoë 李", "age": 0, "admin": True}, indent=2, ensure_ascii=False),
    json.dumps({"name": "tab\tquote\"", "age": 120, "admin": False}),
    '{ "name" : "\\u00e9" , "age" : 7 , "admin" : true }',
]
