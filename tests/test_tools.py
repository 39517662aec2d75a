"""normalize_tools, check_functions and parse_tool_calls."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_ref.tokenizer import chat_template_text
from qwen_ref.workers_ai.chat import render_chat
from qwen_ref.workers_ai.tools import ToolSpecError, check_functions, normalize_tools, parse_tool_calls, tool_names

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "description": "City"}}, "required": ["city"]}
FLAT = {"name": "weather", "description": "Weather now", "parameters": PARAMS}
WRAPPED = {"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": PARAMS}}
NORMALIZED = {"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": PARAMS}}


def block(name: str, arguments: object) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "\n</tool_call>"


# --- normalize_tools -------------------------------------------------------------------------------------------


def test_both_forms_normalize_to_the_openai_form():
    assert normalize_tools([FLAT]) == [NORMALIZED]
    assert normalize_tools([WRAPPED]) == [NORMALIZED]
    assert normalize_tools([FLAT, WRAPPED]) == [NORMALIZED, NORMALIZED]
    assert normalize_tools(None) == [] and normalize_tools([]) == []


def test_key_order_is_stable():
    shuffled = {"parameters": PARAMS, "x-extra": 1, "description": "Weather now", "name": "weather"}
    (tool,) = normalize_tools([shuffled])
    assert list(tool) == ["type", "function"]
    assert list(tool["function"]) == ["name", "description", "parameters", "x-extra"]
    (tool,) = normalize_tools([{"function": {"parameters": PARAMS, "name": "w"}, "type": "function", "strict": 1}])
    assert list(tool) == ["type", "function", "strict"] and list(tool["function"]) == ["name", "parameters"]
    assert list(tool["function"]["parameters"]) == list(PARAMS)  # the schema itself is passed as given


def test_normalized_tools_do_not_alias_the_request():
    request = [copy.deepcopy(FLAT)]
    tools = normalize_tools(request)
    tools[0]["function"]["parameters"]["properties"]["city"]["type"] = "number"
    assert request == [FLAT]


def test_type_defaults_to_function_and_is_kept():
    assert normalize_tools([{"function": FLAT}]) == [NORMALIZED]
    assert normalize_tools([{"type": "other", "function": FLAT}])[0]["type"] == "other"


def test_tool_names():
    assert tool_names(normalize_tools([FLAT, {"name": "b"}])) == {"weather", "b"}


@pytest.mark.parametrize(
    ("tools", "match"),
    [
        ("weather", r"^tools: must be a list"),
        ([1], r"^tools\[0\]: must be an object, got 1"),
        ([{"description": "x"}], r"^tools\[0\]\.name: must be a non-empty string, got null"),
        ([{"name": ""}], r"^tools\[0\]\.name: must be a non-empty string"),
        ([FLAT, {"name": "x", "description": 3}], r"^tools\[1\]\.description: must be a string, got 3"),
        ([{"name": "x", "parameters": "{}"}], r"^tools\[0\]\.parameters: must be an object"),
        ([{"type": "function", "function": "weather"}], r"^tools\[0\]\.function: must be an object"),
        ([{"type": "function", "function": {"name": 5}}], r"^tools\[0\]\.function\.name: must be a non-empty"),
        ([{"type": 1, "function": FLAT}], r"^tools\[0\]\.type: must be a string"),
        ([{"name": "x", "function": FLAT}], r"both 'name' and 'function'"),
    ],
)
def test_bad_tools(tools, match):
    with pytest.raises(ToolSpecError, match=match) as info:
        normalize_tools(tools)
    assert isinstance(info.value, ValueError)


# --- functions ---------------------------------------------------------------------------------------------------


def test_functions_are_validated_and_ignored():
    check_functions(None)
    check_functions([])
    check_functions([{"name": "f", "code": "raise SystemExit"}, {"name": "g", "code": "", "extra": 1}])


@pytest.mark.parametrize(
    ("functions", "match"),
    [
        ({"name": "f"}, r"^functions: must be a list"),
        (["f"], r"^functions\[0\]: must be an object"),
        ([{"name": "f"}], r"^functions\[0\]: missing required key 'code'"),
        ([{"name": "f", "code": "x"}, {"code": "x"}], r"^functions\[1\]: missing required key 'name'"),
        ([{"name": 1, "code": "x"}], r"^functions\[0\]\.name: must be a string, got 1"),
        ([{"name": "f", "code": None}], r"^functions\[0\]\.code: must be a string, got null"),
    ],
)
def test_bad_functions(functions, match):
    with pytest.raises(ToolSpecError, match=match):
        check_functions(functions)


# --- parse_tool_calls: <tool_call> blocks ------------------------------------------------------------------------


def test_one_call():
    expected = [{"name": "weather", "arguments": {"city": "Paris"}}]
    assert parse_tool_calls(block("weather", {"city": "Paris"})) == ("", expected)


def test_several_calls_and_content_before():
    text = "Let me look both up.\n" + block("weather", {"city": "Paris"}) + "\n" + block("time", {}) + "\n"
    assert parse_tool_calls(text) == (
        "Let me look both up.",
        [{"name": "weather", "arguments": {"city": "Paris"}}, {"name": "time", "arguments": {}}],
    )


def test_unterminated_last_call_counts():
    text = block("a", {"x": 1}) + '\n<tool_call>\n{"name": "b", "arguments": {"y": [1, 2]}}\n'
    expected = [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": [1, 2]}}]
    assert parse_tool_calls(text) == ("", expected)


def test_truncated_last_call_stays_text():
    cut = '<tool_call>\n{"name": "b", "arguments": {"y": [1, '
    # with a call found, the content is stripped, so the cut block loses its trailing space
    assert parse_tool_calls(block("a", {}) + "\n" + cut) == (cut.rstrip(), [{"name": "a", "arguments": {}}])
    assert parse_tool_calls(cut) == (cut, [])


def test_arguments_as_json_string_are_decoded():
    text = block("a", json.dumps({"q": "é", "n": 2}))
    assert parse_tool_calls(text) == ("", [{"name": "a", "arguments": {"q": "é", "n": 2}}])


def test_missing_arguments_fall_back_to_parameters_then_empty():
    assert parse_tool_calls('<tool_call>{"name": "a"}</tool_call>') == ("", [{"name": "a", "arguments": {}}])
    text = '<tool_call>{"name": "a", "parameters": {"k": 1}}</tool_call>'
    assert parse_tool_calls(text) == ("", [{"name": "a", "arguments": {"k": 1}}])


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>',  # unbalanced JSON
        '<tool_call>\n{"arguments": {"x": 1}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',  # empty name
        '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>',  # name not a string
        '<tool_call>\n{"name": "a", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "a", "arguments": null}\n</tool_call>',
        '<tool_call>\n{"name": "a", "arguments": "[1]"}\n</tool_call>',  # a JSON string, but not of an object
        '<tool_call>\n{"name": "a", "arguments": "{oops"}\n</tool_call>',
        '<tool_call>\n{"name": "a", "arguments": {}} trailing\n</tool_call>',  # junk after the JSON
        '<tool_call>\n[{"name": "a", "arguments": {}}, {"arguments": {}}]\n</tool_call>',  # one bad entry: all text
        "<tool_call>\n[]\n</tool_call>",
        "<tool_call>\n\"just a string\"\n</tool_call>",
        "<tool_call></tool_call>",
    ],
)
def test_malformed_block_stays_text(bad):
    assert parse_tool_calls(bad) == (bad, [])
    # ... and only voids itself: the good block next to it is still a call, the bad one is left in the content
    content, calls = parse_tool_calls("Hi.\n" + bad + "\n" + block("ok", {}))
    assert calls == [{"name": "ok", "arguments": {}}]
    assert content == "Hi.\n" + bad


def test_json_list_in_one_block():
    text = '<tool_call>\n[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{}"}]\n</tool_call>'
    assert parse_tool_calls(text) == ("", [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}])


def test_tool_call_blocks_accept_any_name():
    assert parse_tool_calls(block("not_offered", {}), {"weather"}) == ("", [{"name": "not_offered", "arguments": {}}])


def test_extra_keys_in_a_call_are_dropped():
    text = '<tool_call>{"id": "1", "name": "a", "arguments": {}, "type": "function"}</tool_call>'
    assert parse_tool_calls(text) == ("", [{"name": "a", "arguments": {}}])


def test_no_tool_call_leaves_text_unchanged():
    for text in ["", "  plain answer \n", "\n", "{\"name\": \"weather\", \"arguments\": {}}", "</tool_call>"]:
        assert parse_tool_calls(text) == (text, [])


def test_tool_call_mentioned_in_prose():
    prose = "Wrap calls in <tool_call> and </tool_call> tags, like <tool_call>...</tool_call>."
    assert parse_tool_calls(prose) == (prose, [])
    assert parse_tool_calls(prose, {"weather"}) == (prose, [])
    # prose that mentions the tag, followed by a real call: the real call is found, the prose stays
    text = "I will use a <tool_call> tag:\n" + block("weather", {"city": "Oslo"})
    expected = [{"name": "weather", "arguments": {"city": "Oslo"}}]
    assert parse_tool_calls(text) == ("I will use a <tool_call> tag:", expected)
    # a trailing mention after a real call is kept in the content
    text = block("a", {}) + "\nDone; that was a <tool_call>."
    assert parse_tool_calls(text) == ("Done; that was a <tool_call>.", [{"name": "a", "arguments": {}}])


def test_tags_inside_argument_strings():
    arguments = {"doc": "write </tool_call> then <tool_call> in text"}
    assert parse_tool_calls(block("a", arguments)) == ("", [{"name": "a", "arguments": arguments}])


def test_text_between_and_after_calls_is_kept():
    text = "First.\n" + block("a", {}) + "\nThen.\n" + block("b", {}) + "\nAfter.\n"
    assert parse_tool_calls(text) == ("First.\n\nThen.\n\nAfter.", [{"name": "a", "arguments": {}},
                                                                     {"name": "b", "arguments": {}}])


def test_whitespace_variants():
    text = '<tool_call>{"name":"a","arguments":{}}</tool_call><tool_call>  \r\n\t{"name":"b","arguments":{}} \n'
    assert parse_tool_calls(text) == ("", [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}])


# --- parse_tool_calls: fenced and bare JSON (only for offered tools) ---------------------------------------------

CODER_OUTPUT = 'I will call the tool.\n```json\n{"name": "weather", "arguments": {"city": "Paris"}}\n```'


def test_fenced_json_with_an_offered_name():
    assert parse_tool_calls(CODER_OUTPUT, {"weather"}) == (
        "I will call the tool.", [{"name": "weather", "arguments": {"city": "Paris"}}],
    )


@pytest.mark.parametrize("fence", ["```json\n{}\n```", "```\n{}\n```", "```JSON  \r\n{}```", "```json\n  {}  \n   ```"])
def test_fence_variants(fence):
    text = fence.replace("{}", '{"name": "weather", "arguments": "{\\"city\\": \\"Rome\\"}"}')
    assert parse_tool_calls(text, {"weather"}) == ("", [{"name": "weather", "arguments": {"city": "Rome"}}])


def test_fenced_json_needs_offered_tools():
    assert parse_tool_calls(CODER_OUTPUT) == (CODER_OUTPUT, [])
    assert parse_tool_calls(CODER_OUTPUT, set()) == (CODER_OUTPUT, [])
    assert parse_tool_calls(CODER_OUTPUT, {"time"}) == (CODER_OUTPUT, [])  # the name is not one of the offered


def test_fenced_non_call_json_and_other_languages_stay_text():
    data = 'Here is data:\n```json\n{"name": "weather", "value": 3, "arguments": 5}\n```'
    assert parse_tool_calls(data, {"weather"}) == (data, [])
    code = '```python\n{"name": "weather", "arguments": {}}\n```'
    assert parse_tool_calls(code, {"weather"}) == (code, [])
    two = '```json\n{"name": "weather", "arguments": {}}\n{"x": 1}\n```'
    assert parse_tool_calls(two, {"weather"}) == (two, [])


def test_fenced_list_and_several_fences():
    text = ('```json\n[{"name": "weather", "arguments": {"city": "A"}}, {"name": "time", "arguments": {}}]\n```\n'
            "and\n```json\n{\"name\": \"weather\", \"arguments\": {\"city\": \"B\"}}\n```")
    content, calls = parse_tool_calls(text, {"weather", "time"})
    assert content == "and"
    assert calls == [{"name": "weather", "arguments": {"city": "A"}}, {"name": "time", "arguments": {}},
                     {"name": "weather", "arguments": {"city": "B"}}]


def test_bare_json_as_the_whole_output():
    text = '\n {"name": "weather", "arguments": {"city": "Lima"}} \n'
    assert parse_tool_calls(text, {"weather"}) == ("", [{"name": "weather", "arguments": {"city": "Lima"}}])
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls(text, {"time"}) == (text, [])
    with_prose = 'Calling {"name": "weather", "arguments": {}}'
    assert parse_tool_calls(with_prose, {"weather"}) == (with_prose, [])


def test_hermes_blocks_win_over_fences():
    text = block("time", {}) + "\n```json\n{\"name\": \"weather\", \"arguments\": {}}\n```"
    content, calls = parse_tool_calls(text, {"weather", "time"})
    assert calls == [{"name": "time", "arguments": {}}]
    assert content.startswith("```json")


# --- the template's own call format parses back -----------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
ARGUMENTS = st.dictionaries(st.text(), JSON_VALUES, max_size=4)
NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@settings(max_examples=150, deadline=None)
@given(calls=st.lists(st.tuples(NAMES, ARGUMENTS), min_size=1, max_size=3), content=st.text(max_size=30))
def test_calls_rendered_by_the_qwen25_template_parse_back(calls, content):
    message = {"role": "assistant", "content": content,
               "tool_calls": [{"name": name, "arguments": arguments} for name, arguments in calls]}
    rendered = render_chat(chat_template_text("qwen2.5"), [message], add_generation_prompt=False)
    start = rendered.index("<|im_start|>assistant") + len("<|im_start|>assistant")
    model_output = rendered[start : rendered.rindex("<|im_end|>")]
    parsed_content, parsed_calls = parse_tool_calls(model_output)
    assert parsed_calls == [{"name": name, "arguments": arguments} for name, arguments in calls]
    if "<tool_call>" not in content:
        assert parsed_content == content.strip()


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_text_without_calls_is_unchanged(text):
    content, calls = parse_tool_calls(text.replace("<tool_call>", ""), {"weather"})
    assert calls == [] or '"weather"' in text
    if not calls:
        assert content == text.replace("<tool_call>", "")
