"""tool_choice: 'required' and a named function enforced by the tool-call grammar, 'none' hiding the tools, and the
bad values; and the scripted model the client tests use to make a random-weight checkpoint write a tool call."""

from __future__ import annotations

import json

import jsonschema
import pytest

import qwen_ref
from qwen_ref.errors import InvalidInput
from qwen_ref.scripted import Rule, ScriptError, load_script, scripted
from qwen_ref.workers_ai.request import prepare
from qwen_ref.workers_ai.tools import TOOL_CALL_OPEN

pytest.importorskip("llguidance")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
# pydantic's shape: a $ref into $defs, an optional argument as anyOf with null
PYDANTIC = {"$defs": {"Unit": {"enum": ["c", "f"], "type": "string"}},
            "properties": {"unit": {"$ref": "#/$defs/Unit"},
                           "round": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}},
            "required": ["unit", "round"], "type": "object", "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "Weather", "parameters": WEATHER},
         {"type": "function", "function": {"name": "temperature", "parameters": PYDANTIC}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen25(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


def _valid(call: dict) -> None:
    schema = {"get_weather": WEATHER, "temperature": PYDANTIC}[call["name"]]
    jsonschema.validate(call["arguments"], schema)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_named_function_is_called_once_with_valid_arguments(qwen25, seed):
    choice = {"type": "function", "function": {"name": "temperature"}}
    out = qwen_ref.generate(qwen25, {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 200,
                                     "seed": seed, "temperature": 1.0})
    assert out["response"] == ""
    (call,) = out["tool_calls"]
    assert call["name"] == "temperature"
    _valid(call)


@pytest.mark.parametrize("seed", [1, 2])
def test_required_writes_only_tool_call_blocks_each_valid(qwen25, seed):
    response = qwen_ref.generate(qwen25, {"messages": ASK, "tools": TOOLS, "tool_choice": "required",
                                          "max_tokens": 120, "seed": seed})
    assert response["tool_calls"]
    for call in response["tool_calls"]:
        _valid(call)
    # nothing but calls: only a last block that max_tokens cut short stays as text
    assert response["response"] == "" or (response["response"].startswith(TOOL_CALL_OPEN + "\n")
                                          and response["usage"]["completion_tokens"] == 120)


def test_unusual_names_and_local_references(qwen25):
    # a name needing escapes, and a "#/properties/..." reference: the arguments are their own root
    name = 'get "the" \\weather é'
    params = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                               "alias": {"$ref": "#/properties/city"}},
              "required": ["city", "alias"], "additionalProperties": False}
    out = qwen_ref.generate(qwen25, {"messages": ASK, "tools": [{"name": name, "parameters": params}],
                                     "tool_choice": {"type": "function", "function": {"name": name}},
                                     "max_tokens": 120, "seed": 2})
    (call,) = out["tool_calls"]
    assert call["name"] == name and call["arguments"]["alias"] in ("Paris", "Rome")
    jsonschema.validate(call["arguments"], params)


def test_none_hides_the_tools_from_the_model(qwen25):
    with_none = prepare(qwen25, {"messages": ASK, "tools": TOOLS, "tool_choice": "none"})
    without = prepare(qwen25, {"messages": ASK})
    with_auto = prepare(qwen25, {"messages": ASK, "tools": TOOLS, "tool_choice": "auto"})
    assert with_none.prompt_ids == without.prompt_ids != with_auto.prompt_ids
    assert with_none.constraint is None and with_auto.constraint is None and not with_none.tool_names


@pytest.mark.parametrize(("body", "path", "needle"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "/tool_choice/function/name",
     "not an offered tool"),
    ({"tool_choice": "required", "tools": None}, "/tool_choice", "needs tools"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "/tool_choice", "response_format"),
    ({"tool_choice": "sometimes"}, "/tool_choice", ""),
    ({"tool_choice": {"type": "function", "function": {}}}, "/tool_choice", ""),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}, "extra": 1}}, "/tool_choice", ""),
    ({"tool_choice": 3}, "/tool_choice", ""),
])
def test_bad_tool_choice_is_a_typed_error_naming_it(qwen25, body, path, needle):
    request = {"messages": ASK, "tools": TOOLS, **body}
    if request.get("tools") is None:
        request.pop("tools")
    with pytest.raises(InvalidInput) as e:
        prepare(qwen25, request, strict=True)
    assert e.value.path.startswith(path) and needle in str(e.value)


def test_tool_choice_is_not_a_prompt_key(qwen25):
    # the prompt branch has no tools, so a tool_choice there is an unknown key: ignored, or refused when strict
    assert prepare(qwen25, {"prompt": "hi", "tool_choice": "required"}).ignored == ["/tool_choice"]
    with pytest.raises(InvalidInput, match="tool_choice"):
        prepare(qwen25, {"prompt": "hi", "tool_choice": "required"}, strict=True)


# --- the scripted model ------------------------------------------------------------------------------------------

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
RULES = [Rule("<tool_response>", "It is sunny in Paris."), Rule("weather", CALL)]


def test_scripted_model_runs_a_whole_tool_loop(qwen25):
    s = scripted(qwen25, RULES)
    first = qwen_ref.generate(s, {"messages": ASK, "tools": TOOLS, "temperature": 1.7, "seed": 9,
                                  "repetition_penalty": 1.5})
    assert first["response"] == "" and first["tool_calls"] == [{"name": "get_weather",
                                                                  "arguments": {"city": "Paris", "days": 2}}]
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": first["tool_calls"]},
               {"role": "tool", "content": "sunny, 24C"}]
    second = qwen_ref.generate(s, {"messages": history, "tools": TOOLS})
    assert second["response"] == "It is sunny in Paris."


def test_scripted_model_leaves_unmatched_prompts_and_the_weights_alone(qwen25):
    s = scripted(qwen25, RULES)
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "seed": 3}
    assert qwen_ref.generate(s, body) == qwen_ref.generate(qwen25, body)
    assert s.model.lm_head.weight is qwen25.model.lm_head.weight
    assert type(qwen25.model).__name__ == "QwenForCausalLM"  # the original model is not scripted


def test_scripted_stream_shows_the_reply(qwen25):
    s = scripted(qwen25, [Rule("hello", "Hi there!")])
    stream = b"".join(qwen_ref.generate(s, {"messages": [{"role": "user", "content": "hello"}], "stream": True}))
    events = [json.loads(line[6:]) for line in stream.decode().splitlines()
              if line.startswith("data: {")]
    text = "".join(e["response"] for e in events)
    assert text == "Hi there!"


@pytest.mark.parametrize(("content", "needle"), [
    ("not json", "not valid JSON"),
    ('{"when": "a", "reply": "b"}', "expected a JSON list"),
    ('[{"when": "a"}]', "rule 0"),
    ('[{"when": "a", "reply": 3}]', "rule 0"),
    ('[{"when": "a", "reply": "b", "x": 1}]', "rule 0"),
    ("[" * 100000, "nested too deeply"),
])
def test_bad_script_files_are_typed_errors(tmp_path, content, needle):
    path = tmp_path / "script.json"
    path.write_text(content)
    with pytest.raises(ScriptError, match=needle):
        load_script(path)


def test_script_file_loads(tmp_path):
    path = tmp_path / "script.json"
    path.write_text(json.dumps([{"when": r.when, "reply": r.reply} for r in RULES]))
    assert load_script(path) == RULES
