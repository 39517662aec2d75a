"""Validation of Workers AI text-generation request bodies and results, against the bundled JSON schemas.

validate_input() checks a request against data/input.schema.json (the service's own schema, Draft 2020-12) made
stricter where generate() needs it; docs/requests.md lists every rule and the reason for each. Every problem is
an InvalidInput naming the JSON path and the rule, never a traceback. validate_output() checks a non-stream
result against data/output.schema.json plus the invariants generate() promises.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any, NamedTuple

from jsonschema import Draft202012Validator, ValidationError
from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from qwen_ref.errors import InvalidInput, QwenRefError
from qwen_ref.sampling.json_schema import json_schema_of  # unwraps OpenAI's {"name", "schema"}; no llguidance

ROLES = ("system", "user", "assistant", "tool")  # the roles the Qwen chat templates render
_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads accepts "\\ud800"; no text may hold one
MAX_DEPTH = 64  # deepest nesting of objects and arrays accepted anywhere in a request
INTEGER_FIELDS = ("max_tokens", "top_k", "seed")
_BRANCH_KEYS = ("prompt", "messages")

Path = tuple[str | int, ...]


class InvalidOutput(QwenRefError, AssertionError):
    """A result breaks output.schema.json or an invariant of generate(): a bug, never the caller's fault."""


class _Problem(NamedTuple):
    path: Path
    rule: str
    detail: str

    def sort_key(self) -> tuple[tuple[tuple[int, int | str], ...], bool, str, str]:
        return _path_key(self.path), self.rule != "type", self.rule, self.detail  # a wrong type says the most


def _path_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, p) for p in path)


def pointer(path: Path) -> str:
    if not path:
        return "/"
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


# ----------------------------------------------------------------------------------------------------------
# Schemas


def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("qwen_ref").joinpath("data", name).read_text(encoding="utf-8"))


def _close(schema: dict[str, Any]) -> None:
    schema["additionalProperties"] = False


_ARGUMENTS = {"type": ["object", "string"]}  # an object, or (OpenAI) the object's JSON text
_CALL = {"type": "object", "properties": {"name": {"type": "string"}, "arguments": _ARGUMENTS},
         "required": ["name"], "additionalProperties": False}
# A tool conversation's history (null values count as absent): an assistant's earlier calls (the service's
# {name, arguments}, or OpenAI's {id, type, function: {name, arguments}}), and a tool message's call id and name.
_TOOL_CONVERSATION = {
    "tool_calls": {"type": ["array", "null"], "items": {"type": "object", "oneOf": [
        {**_CALL, "properties": {**_CALL["properties"], "id": {"type": "string"}}},
        {"type": "object", "properties": {"id": {"type": "string"}, "type": {"const": "function"},
                                          "function": _CALL}, "required": ["function"],
         "additionalProperties": False},
    ]}},
    "tool_call_id": {"type": ["string", "null"]},  # clients (LangChain's) send null for "none": left out
    "name": {"type": ["string", "null"]},
}


# "auto" (the default), "none" (the tools are not shown), "required" (one or more calls) or one named function
TOOL_CHOICE = {"oneOf": [
    {"enum": ["auto", "none", "required"]},
    {"type": "object", "properties": {"type": {"const": "function"}, "function": {
        "type": "object", "properties": {"name": {"type": "string", "minLength": 1}}, "required": ["name"],
        "additionalProperties": False}}, "required": ["function"], "additionalProperties": False},
]}


def _strict_branch(branch: dict[str, Any]) -> dict[str, Any]:
    """One oneOf branch of the input schema with the rules generate() adds (see docs/requests.md)."""
    strict = copy.deepcopy(branch)
    strict["type"] = "object"
    props = strict["properties"]
    props.setdefault("lora", {"type": "string"})  # the service's LoRA docs send lora with messages
    # qwen-ref extension (the service has no such field): per-token logprobs and the N best alternatives
    props["logprobs"] = {"type": "integer", "minimum": 0, "maximum": 20}
    props["max_tokens"]["minimum"] = 1
    response_format = props["response_format"]
    response_format["required"] = ["type"]
    _close(response_format)
    if "messages" in props:
        messages = props["messages"]
        messages["minItems"] = 1
        message = messages["items"]
        message["properties"]["role"]["enum"] = list(ROLES)
        message["properties"].update(_TOOL_CONVERSATION)
        _close(message)
        _close(props["functions"]["items"])
        tool = props["tools"]["items"]
        plain, wrapped = tool.pop("oneOf")  # {name, description, parameters} or {type, function: {...}}
        for function in (plain, wrapped["properties"]["function"]):
            # any JSON Schema as parameters (zod, pydantic, LangChain and OpenAI's helpers write anyOf, type
            # lists, properties without descriptions, or none); checked against the meta-schema below
            function["properties"]["parameters"] = {"type": "object"}
            function["required"] = ["name"]
            _close(function)
        _close(wrapped)
        tool.update({"if": {"required": ["function"]}, "then": wrapped, "else": plain})
        props["tool_choice"] = TOOL_CHOICE  # OpenAI's field; the service's own schema has none
    _close(strict)
    return strict


@cache
def _input_validators() -> dict[str, Draft202012Validator]:
    branches = {b["title"].lower(): b for b in _load("input.schema.json")["oneOf"]}
    return {
        "prompt": Draft202012Validator(_strict_branch(branches["prompt"])),
        "messages": Draft202012Validator(_strict_branch(branches["messages"])),
    }


@cache
def _output_schema() -> dict[str, Any]:
    return _load("output.schema.json")


def _defaults() -> Mapping[str, Any]:
    props = _load("input.schema.json")["oneOf"][0]["properties"]
    return MappingProxyType({k: v["default"] for k, v in props.items() if "default" in v})


DEFAULTS: Mapping[str, Any] = _defaults()  # max_tokens 256, temperature 0.6, raw false, stream false


# ----------------------------------------------------------------------------------------------------------
# Describing values and rules


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


def _show(value: Any, limit: int = 60) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _quoted(names: Any) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _allowed_range(schema: Mapping[str, Any]) -> str:
    kind = _article(str(schema.get("type", "number")))
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{kind} from {low} to {high}"
    if low is not None:
        return f"{kind} >= {low}"
    return kind if high is None else f"{kind} <= {high}"


def _type_detail(error: ValidationError) -> str:
    expected = error.validator_value
    wanted = _quoted(expected) if isinstance(expected, list) else _article(str(expected))
    if "minimum" in error.schema or "maximum" in error.schema:
        wanted = _allowed_range(error.schema)
    return f"expected {wanted}, got {_show(error.instance)} ({_article(_json_type(error.instance))})"


def _unknown_key_detail(key: str, allowed: list[str], path: Path) -> str:
    if not path and key in ("tools", "functions"):
        return f"'{key}' is only allowed in a 'messages' request, not with 'prompt'"
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
    guess = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"unknown key '{key}'{guess}; allowed keys: {_quoted(allowed)}"


def _schema_problems(error: ValidationError) -> Iterator[_Problem]:
    path: Path = tuple(error.absolute_path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if kind == "required":
        for key in value:
            if key not in instance:
                yield _Problem((*path, key), "required", f"required key '{key}' is missing; needed: {_quoted(value)}")
    elif kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        for key in sorted(k for k in instance if k not in allowed):
            yield _Problem((*path, key), kind, _unknown_key_detail(key, allowed, path))
    elif kind == "type":
        yield _Problem(path, kind, _type_detail(error))
    elif kind in ("minimum", "maximum"):
        bound = "below the minimum" if kind == "minimum" else "above the maximum"
        yield _Problem(path, kind, f"{_show(instance)} is {bound} {value}; allowed: {_allowed_range(error.schema)}")
    elif kind == "enum":
        yield _Problem(path, kind, f"{_show(instance)} is not one of {', '.join(_show(v) for v in value)}")
    elif kind == "minLength":
        shown = "the empty string" if instance == "" else _show(instance)
        yield _Problem(path, kind, f"{shown} is too short; at least {value} character(s) required")
    elif kind == "minItems":
        shown = "the empty list" if instance == [] else _show(instance)
        yield _Problem(path, kind, f"{shown} has too few items; at least {value} required")
    else:
        yield _Problem(path, kind, error.message)


# ----------------------------------------------------------------------------------------------------------
# Checks


def _not_json(value: Any) -> list[_Problem]:
    """Values no JSON document can hold: NaN and infinities, non-string keys, Python-only types, deep nesting."""
    problems: list[_Problem] = []
    stack: list[tuple[Path, Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if len(path) > MAX_DEPTH:
            problems.append(_Problem(path[:MAX_DEPTH], "maxDepth", f"nested deeper than {MAX_DEPTH} levels"))
        elif isinstance(item, float) and not math.isfinite(item):
            problems.append(_Problem(path, "finite", f"{_show(item)} is not a JSON number; numbers must be finite"))
        elif isinstance(item, str) and _SURROGATE.search(item):
            problems.append(_Problem(path, "unicode", "the text holds a lone UTF-16 surrogate (such as \\ud800), "
                                                      "which is not a Unicode character"))
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    problems.append(_Problem(path, "unicode", "an object key holds a lone UTF-16 surrogate"))
                elif isinstance(key, str):
                    stack.append(((*path, key), child))
                else:
                    problems.append(_Problem(path, "json", f"object key {key!r} is not a string"))
        elif isinstance(item, list):
            stack.extend(((*path, i), child) for i, child in enumerate(item))
        elif not (item is None or isinstance(item, (str, int, float))):
            problems.append(_Problem(path, "json", f"a Python {type(item).__name__} is not a JSON value"))
    return problems


def _branch(inputs: Mapping[str, Any]) -> str:
    present = [k for k in _BRANCH_KEYS if k in inputs]
    if len(present) == 1:
        return present[0]
    got = "both" if present else "neither"
    raise InvalidInput("/", "oneOf", f"exactly one of 'prompt' or 'messages' is required, got {got}")


def _json_schema_problems(schema: Any, path: Path) -> Iterator[_Problem]:
    if not isinstance(schema, (dict, bool)):
        detail = f"expected a JSON Schema (an object or a boolean), got {_show(schema)}"
        yield _Problem(path, "type", detail)
        return
    if isinstance(schema, dict) and not isinstance(schema.get("$schema", ""), str):
        yield _Problem((*path, "$schema"), "jsonSchema", f"expected a string URI, got {_show(schema['$schema'])}")
        return
    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as error:
        detail = f"not a valid JSON Schema: {error.message}"
        yield _Problem((*path, *error.absolute_path), "jsonSchema", detail)
    except RecursionError:  # a `pattern` with hundreds of nested groups: Python's regex parser recurses
        yield _Problem(path, "jsonSchema", "the schema nests too deeply (a pattern or subschema) to be checked")


def _response_format_problems(response_format: Any) -> Iterator[_Problem]:
    if not isinstance(response_format, dict):
        return
    path: Path = ("response_format", "json_schema")
    kind = response_format.get("type")
    if kind == "json_schema":
        if "json_schema" not in response_format:
            yield _Problem(path, "required", "required key 'json_schema' is missing; type 'json_schema' needs it")
        else:
            yield from _json_schema_problems(response_format["json_schema"], path)
    elif kind == "json_object" and "json_schema" in response_format:
        yield _Problem(path, "additionalProperties", "only allowed with type 'json_schema', not with 'json_object'")


def _tool_parameters_problems(tools: Any) -> Iterator[_Problem]:
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if not isinstance(tool, dict):
            continue
        function, path = (tool["function"], ("tools", i, "function")) if "function" in tool else (tool, ("tools", i))
        if isinstance(function, dict) and isinstance(function.get("parameters"), dict):
            yield from _json_schema_problems(function["parameters"], (*path, "parameters"))


def _first(problems: list[_Problem]) -> InvalidInput | None:
    if not problems:
        return None
    problem = min(problems, key=_Problem.sort_key)
    return InvalidInput(pointer(problem.path), problem.rule, problem.detail)


def _normalized(inputs: dict[str, Any]) -> dict[str, Any]:
    body = copy.deepcopy(inputs)
    for key in INTEGER_FIELDS:
        if isinstance(body.get(key), float):
            body[key] = int(body[key])  # JSON Schema's "integer" includes 2.0
    return body


def validate_input(inputs: Any, *, strict: bool = True, ignored: list[str] | None = None) -> dict[str, Any]:
    """Check a request body; return a deep copy with integral floats of integer fields made ints (2.0 -> 2).

    strict (the default here): a key the schema does not know is an error, naming it. strict=False, what the
    service does: unknown keys are left out of the returned body, and their JSON pointers appended to `ignored`.
    """
    if not isinstance(inputs, dict):
        detail = f"expected a JSON object (a request body), got {_show(inputs)} ({_article(_json_type(inputs))})"
        raise InvalidInput("/", "type", detail)
    error = _first(_not_json(inputs))
    if error is not None:
        raise error
    validator = _input_validators()[_branch(inputs)]
    problems = [p for e in validator.iter_errors(inputs) for p in _schema_problems(e)]
    problems.extend(_response_format_problems(inputs.get("response_format")))
    problems.extend(_tool_parameters_problems(inputs.get("tools")))
    unknown = [] if strict else [p for p in problems if p.rule == "additionalProperties"]
    error = _first([p for p in problems if p not in unknown])
    if error is not None:
        raise error
    body = _normalized(inputs)
    for problem in unknown:
        *parents, key = problem.path
        holder: Any = body
        for part in parents:
            holder = holder[part]
        holder.pop(key, None)
        if ignored is not None:
            ignored.append(pointer(problem.path))
    return body


def with_defaults(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: the schema defaults for the keys the request leaves out, the request's own values otherwise."""
    if not isinstance(inputs, Mapping):
        raise InvalidInput("/", "type", f"expected a JSON object (a request body), got {_show(inputs)}")
    return {**DEFAULTS, **inputs}


# ----------------------------------------------------------------------------------------------------------
# Output


def _schema_failure(validator: Draft202012Validator, instance: Any, prefix: Path = ()) -> str | None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: (_path_key(tuple(e.absolute_path)), e.message))
    if not errors:
        return None
    return f"{pointer((*prefix, *errors[0].absolute_path))}: {errors[0].message}"


def _usage_failure(usage: Any) -> str | None:
    if not isinstance(usage, dict):
        return None  # the schema check reports it
    names = ("prompt_tokens", "completion_tokens", "total_tokens")
    for name in names:
        count = usage.get(name)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            return f"/usage/{name}: expected a count (an integer >= 0), got {_show(count)}"
    prompt, completion, total = (usage[n] for n in names)
    if total != prompt + completion:
        return f"/usage/total_tokens: {total} != prompt_tokens {prompt} + completion_tokens {completion}"
    return None


def _tool_calls_failure(tool_calls: Any) -> str | None:
    for i, call in enumerate(tool_calls if isinstance(tool_calls, list) else []):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return f"/tool_calls/{i}/name: every tool call names its tool with a string"
        if not isinstance(call.get("arguments"), dict):
            return f"/tool_calls/{i}/arguments: every tool call carries its arguments as an object"
    return None


def _json_mode_failure(response: Any, response_format: Mapping[str, Any]) -> str | None:
    if response_format.get("type") == "json_object":
        return None if isinstance(response, dict) else f"/response: JSON mode needs an object, got {_show(response)}"
    schema = json_schema_of(response_format)[0]
    return _schema_failure(validator_for(schema, default=Draft202012Validator)(schema), response, ("response",))


def validate_output(output: Any, response_format: Mapping[str, Any] | None = None) -> None:
    """Check a non-stream result of generate(); pass the request's response_format when JSON mode was on."""
    if not isinstance(output, dict):
        raise InvalidOutput(f"invalid output: /: a non-stream result is an object, got {_show(output)}")
    schema = copy.deepcopy(_output_schema()["oneOf"][0])
    json_mode = bool(response_format) and response_format.get("type") in ("json_object", "json_schema")
    if json_mode:
        schema["properties"]["response"] = {}  # JSON mode's response is the parsed JSON value
    failure = (
        _schema_failure(Draft202012Validator(schema), output)
        or _usage_failure(output.get("usage"))
        or _tool_calls_failure(output.get("tool_calls"))
        or (_json_mode_failure(output["response"], response_format) if json_mode and response_format else None)
    )
    if failure is not None:
        raise InvalidOutput(f"invalid output: {failure}")
