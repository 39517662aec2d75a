"""JSON mode's schema: the JSON Schema a request's response_format asks for, checked, and compiled into an
llguidance grammar (docs/json_mode.md says what is accepted).

llguidance is an optional dependency (`pip install 'qwen-ref[json]'`); `load_llguidance()` imports it on first
use, so this module, json_mask.py and their error types import without it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from qwen_ref.errors import FeatureUnavailable, QwenRefError

Whitespace = Literal["bounded", "compact", "flexible"]
# What may stand between two JSON tokens (llguidance never allows whitespace before or after the value):
# - bounded: nothing, one space, or a newline and up to 20 spaces/tabs (llama.cpp's json.gbnf rule). Compact,
#   json.dumps-style and indented JSON all fit, but a run of blank lines does not, so a model cannot stall
#   on whitespace until max_tokens.
# - compact: nothing: {"a":1,"b":[2,3]}.
# - flexible: any JSON whitespace, any amount (llguidance's default; runaway whitespace is possible).
_WHITESPACE: dict[str, dict[str, Any]] = {
    "bounded": {"whitespace_pattern": r"(?: |\n[ \t]{0,20})"},
    "compact": {"whitespace_flexible": False},
    "flexible": {"whitespace_flexible": True},
}
# \u00e9-style escapes in strings, as json.dumps writes non-ASCII text by default (llguidance's default only allows
# them for control characters). Strings with a pattern, format or enum still take their characters literally.
_ESCAPES = {"json_allow_general_unicode_escapes": True}
# OpenAI's response_format.json_schema is {"name", "schema", "strict", "description"}; Workers AI's is the schema
_WRAPPER_KEYS = frozenset({"name", "description", "schema", "strict"})
_ROOT = "/response_format/json_schema"


class JsonModeUnavailable(FeatureUnavailable, ImportError):
    """llguidance, which JSON mode needs, is not installed."""


class InvalidJsonSchema(QwenRefError, ValueError):
    """response_format is malformed, or its schema is invalid or uses what JSON mode cannot enforce.
    `.path` is the JSON pointer of the problem inside the request, `.detail` the problem."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidJsonSchema], tuple[str, str]]:
        return type(self), (self.path, self.detail)


def load_llguidance() -> Any:
    """The llguidance module; the one place it is imported."""
    try:
        import llguidance
    except ImportError as e:
        raise JsonModeUnavailable(
            f"JSON mode (response_format) needs llguidance, which is not installed ({e}); "
            "install it with: pip install 'qwen-ref[json]'"
        ) from e
    return llguidance


def json_schema_of(response_format: Any) -> tuple[dict[str, Any] | bool, str]:
    """The JSON Schema a response_format asks for, and its JSON pointer in the request.

    {"type": "json_object"} is any JSON object. {"type": "json_schema", "json_schema": S} takes S as the schema
    (Workers AI's form), unless S is OpenAI's wrapper: an object with a "schema" key and no keys other than
    name, description, schema and strict; then its "schema" is used ("strict" is accepted and ignored: JSON
    mode always enforces the schema)."""
    if not isinstance(response_format, dict):
        raise InvalidJsonSchema("/response_format", f"expected an object, got {_show(response_format)}")
    kind = response_format.get("type")
    if kind == "json_object":
        if "json_schema" in response_format:
            raise InvalidJsonSchema(_ROOT, "only allowed with type 'json_schema', not with 'json_object'")
        return {"type": "object"}, "/response_format/type"
    if kind != "json_schema":
        raise InvalidJsonSchema("/response_format/type", f"expected 'json_object' or 'json_schema', got {_show(kind)}")
    if "json_schema" not in response_format:
        raise InvalidJsonSchema(_ROOT, "required key 'json_schema' is missing; type 'json_schema' needs it")
    schema = response_format["json_schema"]
    if isinstance(schema, dict) and "schema" in schema and set(schema) <= _WRAPPER_KEYS:
        _check_wrapper(schema)
        return schema["schema"], f"{_ROOT}/schema"
    return schema, _ROOT


def _check_wrapper(wrapper: dict[str, Any]) -> None:
    for key, kind in (("name", str), ("description", str), ("strict", bool)):
        if key in wrapper and not isinstance(wrapper[key], kind):
            raise InvalidJsonSchema(f"{_ROOT}/{key}", f"expected {'a boolean' if kind is bool else 'a string'}, "
                                                      f"got {_show(wrapper[key])}")


def check_schema(schema: Any, path: str) -> None:
    """Raise InvalidJsonSchema unless `schema` is valid against the metaschema of its $schema (default 2020-12)."""
    if not isinstance(schema, (dict, bool)):
        raise InvalidJsonSchema(path, f"expected a JSON Schema (an object or a boolean), got {_show(schema)}")
    if schema is False:
        raise InvalidJsonSchema(path, "the schema false allows no value, so no output can match it")
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        raise InvalidJsonSchema(f"{path}/$schema", f"expected a string URI, got {_show(schema['$schema'])}")
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as e:
        where = "".join(f"/{str(p).replace('~', '~0').replace('/', '~1')}" for p in e.absolute_path)
        raise InvalidJsonSchema(path + where, f"not a valid JSON Schema: {e.message}") from None
    except RecursionError:  # a `pattern` with hundreds of nested groups: Python's regex parser recurses
        raise InvalidJsonSchema(path, "the schema nests too deeply (a pattern or subschema) to be checked") from None


def compile_grammar(schema: dict[str, Any] | bool, path: str, whitespace: Whitespace) -> str:
    """llguidance's grammar for the schema, or InvalidJsonSchema naming what it cannot enforce."""
    llg = load_llguidance()
    if whitespace not in _WHITESPACE:
        raise ValueError(f"whitespace {whitespace!r} is not one of {', '.join(_WHITESPACE)}")
    # llguidance reads options from a top-level "x-guidance" key; some (lenient, coerce_one_of) would let
    # through output the schema rejects, so it is dropped: the request's schema means what JSON Schema says
    plain = {} if schema is True else {k: v for k, v in schema.items() if k != "x-guidance"}
    try:
        return llg.LLMatcher.grammar_from_json_schema(plain, overrides={**_WHITESPACE[whitespace], **_ESCAPES})
    except RecursionError:
        raise InvalidJsonSchema(path, "the schema nests too deeply to compile") from None
    except ValueError as e:
        raise InvalidJsonSchema(path, f"JSON mode cannot use this schema: {e}") from None


def lark_json(schema: dict[str, Any], whitespace: Whitespace = "bounded") -> str:
    """A `%json {...}` item for an llguidance Lark grammar: the schema with the same whitespace and escape rules
    as JSON mode (llguidance reads them from the schema's top-level "x-guidance")."""
    plain = {k: v for k, v in schema.items() if k != "x-guidance"}
    return "%json " + json.dumps({**plain, "x-guidance": {**_WHITESPACE[whitespace], **_ESCAPES}}, ensure_ascii=False)


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
