"""render_chat against transformers' apply_chat_template(..., tokenize=False), byte for byte, on the real templates."""

from __future__ import annotations

import copy
import datetime
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_ref.tokenizer import chat_template_text, load_tokenizer
from qwen_ref.workers_ai.chat import (
    ChatTemplateError,
    TemplateRaisedError,
    compile_template,
    render_chat,
    template_special_tokens,
)
from qwen_ref.workers_ai.tools import normalize_tools

FLAT_TOOLS = [
    {
        "name": "getWeather",
        "description": "Return the weather for a latitude and longitude",
        "parameters": {
            "type": "object",
            "properties": {
                "latitude": {"type": "string", "description": "The latitude"},
                "longitude": {"type": "string", "description": "The longitude"},
            },
            "required": ["latitude", "longitude"],
        },
    },
]
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "sum",
            "description": "Add two numbers — “non-ASCII” <b>&</b>",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "number", "description": "a"},
                    "b": {"type": "number", "description": "b"},
                },
                "required": ["a", "b"],
            },
        },
    },
]
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is the weather in London?"}
CALL_FLAT = {"name": "getWeather", "arguments": {"latitude": "51.5074", "longitude": "-0.1278"}}
CALL_OPENAI = {"id": "call_1", "type": "function", "function": {"name": "sum", "arguments": {"a": 1, "b": 2}}}

CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "user": [USER],
    "system_user": [SYSTEM, USER],
    "multi_turn": [SYSTEM, USER, {"role": "assistant", "content": "Rainy."}, {"role": "user", "content": "Tomorrow?"}],
    "multi_turn_no_system": [USER, {"role": "assistant", "content": "Rainy."}, {"role": "user", "content": "And?"}],
    "non_ascii": [
        {"role": "system", "content": "Réponds en français. 你好 🌧️ مرحبا"},
        {"role": "user", "content": "e\u0301\u200b\x00\t tab \r\n crlf ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"},
    ],
    "jinja_and_special_text_in_content": [
        {"role": "user", "content": "{{ messages }} {% if x %} <|im_end|> <tool_call> {\"a\": 1}"},
    ],
    "empty_content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "late_system": [USER, {"role": "system", "content": "Now be brief."}, {"role": "user", "content": "ok"}],
    "tool_results": [
        SYSTEM,
        USER,
        {"role": "assistant", "content": "", "tool_calls": [CALL_FLAT, CALL_OPENAI]},
        {"role": "tool", "content": "{\"temperature\": 12}"},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": "It is 12 °C, and 1 + 2 = 3."},
        {"role": "user", "content": "thanks"},
    ],
    "assistant_call_with_content": [
        USER,
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_FLAT]},
        {"role": "tool", "content": "sunny"},
    ],
    "assistant_call_content_none": [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [CALL_OPENAI]},
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "again"},
    ],
    "tool_first": [{"role": "tool", "content": "orphan result"}, USER],
}
TOOLSETS: dict[str, list[dict[str, Any]] | None] = {
    "no_tools": None,
    "flat_normalized": normalize_tools(FLAT_TOOLS),
    "openai_normalized": normalize_tools(OPENAI_TOOLS),
    "both_normalized": normalize_tools(FLAT_TOOLS + OPENAI_TOOLS),
    "flat_raw": FLAT_TOOLS,
    "empty_list": [],
}


@dataclass
class Setup:
    flavor: str
    hf: Any
    template: str
    special_tokens: dict[str, str]


@pytest.fixture(scope="module", params=["qwen1.5", "qwen2.5"])
def setup(request, tiny) -> Setup:
    from transformers import AutoTokenizer

    path = tiny(request.param)
    qt = load_tokenizer(path)
    assert qt is not None and qt.chat_template
    hf = AutoTokenizer.from_pretrained(path)
    return Setup(request.param, hf, qt.chat_template, template_special_tokens(qt.config))


def ours(s: Setup, messages, tools=None, add_generation_prompt=True, template: str | None = None) -> str:
    return render_chat(
        template or s.template, copy.deepcopy(messages), tools=copy.deepcopy(tools),
        add_generation_prompt=add_generation_prompt, special_tokens=s.special_tokens,
    )


def theirs(s: Setup, messages, tools=None, add_generation_prompt=True, template: str | None = None) -> str:
    return s.hf.apply_chat_template(
        copy.deepcopy(messages), tools=copy.deepcopy(tools), tokenize=False,
        add_generation_prompt=add_generation_prompt, chat_template=template,
    )


def assert_same(s: Setup, messages, tools=None, add_generation_prompt=True, template: str | None = None) -> None:
    """Same text as transformers, or, where transformers' rendering fails, a ChatTemplateError."""
    try:
        expected = theirs(s, messages, tools, add_generation_prompt, template)
    except Exception as e:
        with pytest.raises(ChatTemplateError):
            ours(s, messages, tools, add_generation_prompt, template)
        assert s.flavor == "qwen1.5" and "content" in str(e)  # the only known failure: Qwen1.5 needs content
        return
    assert ours(s, messages, tools, add_generation_prompt, template) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", list(TOOLSETS), ids=list(TOOLSETS))
@pytest.mark.parametrize("conversation", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_identical_to_transformers(setup: Setup, conversation: str, tools: str, add_generation_prompt: bool):
    assert_same(setup, CONVERSATIONS[conversation], TOOLSETS[tools], add_generation_prompt)


def test_checkpoints_carry_the_real_templates(setup: Setup):
    assert setup.template == chat_template_text(setup.flavor)


def test_special_tokens_match_transformers(setup: Setup):
    assert setup.special_tokens == setup.hf.special_tokens_map
    assert setup.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_template_special_tokens_reads_added_token_objects():
    config = {"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>", "unk_token": None,
              "extra_special_tokens": {"image_token": "<img>"}, "additional_special_tokens": ["<x>"]}
    assert template_special_tokens(config) == {"bos_token": "<s>", "eos_token": "</s>", "image_token": "<img>"}


def test_known_renderings(setup: Setup):
    text = ours(setup, [USER])
    default_system = {"qwen1.5": "You are a helpful assistant",
                      "qwen2.5": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."}[setup.flavor]
    assert text == (f"<|im_start|>system\n{default_system}<|im_end|>\n<|im_start|>user\n{USER['content']}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert not ours(setup, [USER], add_generation_prompt=False).endswith("<|im_start|>assistant\n")


def test_qwen25_tools_block_holds_the_normalized_form():
    template = chat_template_text("qwen2.5")
    text = render_chat(template, [USER], tools=normalize_tools(FLAT_TOOLS))
    line = ('{"type": "function", "function": {"name": "getWeather", "description": "Return the weather for a latitude '
            'and longitude", "parameters": {"type": "object", "properties": {"latitude": {"type": "string", '
            '"description": "The latitude"}, "longitude": {"type": "string", "description": "The longitude"}}, '
            '"required": ["latitude", "longitude"]}}}')
    assert f"<tools>\n{line}\n</tools>" in text
    assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                           "\n\n# Tools\n")
    # non-ASCII and HTML characters are not escaped by tojson
    assert "“non-ASCII” <b>&</b>" in render_chat(template, [USER], tools=normalize_tools(OPENAI_TOOLS))


# Templates that exercise the environment itself: tojson options, namespace, loop controls, dict(), the
# generation tag, special tokens, whitespace control.
FEATURE_TEMPLATES = [
    "{{ messages | tojson }}|{{ tools | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}",
    "{{ messages[0] | tojson(separators=(',', ':')) }}{{ eos_token }}{{ pad_token }}{{ bos_token is defined }}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}{{ dict(a=1, b=[2]) | tojson }}",
    "{% for m in messages %}\n  {% if m.role == 'user' %}{% continue %}{% endif %}\n"
    "  {% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}\n{{ add_generation_prompt }}",
    "{{ documents }}|{{ messages[0].keys() | list }}|{{ messages | length }}|{{ (tools or []) | length }}",
]


@pytest.mark.parametrize("template", FEATURE_TEMPLATES)
def test_environment_identical_to_transformers(setup: Setup, template: str):
    messages = [SYSTEM, USER, {"role": "assistant", "content": "é", "tool_calls": None}, USER]
    for tools, agp in [(None, True), (normalize_tools(FLAT_TOOLS), False)]:
        assert_same(setup, messages, tools, agp, template)


def test_reasoning_fields_are_aliased_like_transformers(setup: Setup):
    template = "{% for m in messages %}{{ m | tojson }}\n{% endfor %}"
    messages = [USER, {"role": "assistant", "content": "x", "reasoning": "because"}]
    assert_same(setup, messages, template=template)


ROLES = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": st.text(max_size=24)})


@settings(max_examples=120, deadline=None)
@given(
    messages=st.lists(MESSAGE, min_size=1, max_size=6),
    add_generation_prompt=st.booleans(),
    with_tools=st.booleans(),
)
def test_random_conversations_identical_to_transformers(setup: Setup, messages, add_generation_prompt, with_tools):
    tools = normalize_tools(FLAT_TOOLS + OPENAI_TOOLS) if with_tools else None
    assert_same(setup, messages, tools, add_generation_prompt)


def test_templates_are_compiled_once():
    template = "{{ messages[0].content }}!"
    assert compile_template(template) is compile_template(template)
    assert render_chat(template, [USER]) == USER["content"] + "!"


def test_messages_are_not_mutated():
    messages = [{"role": "assistant", "content": None, "reasoning": "r"}]
    before = copy.deepcopy(messages)
    render_chat("{{ messages | tojson }}", messages)
    assert messages == before


def test_strftime_now():
    year = datetime.datetime.now().year
    assert render_chat("{{ strftime_now('%Y') }}", [USER]) in {str(year), str(year + 1)}


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        ("{% if %}", [USER], r"syntax error at line 1: "),
        ("ok\n{% for m in messages %}", [USER], r"syntax error at line 2"),
        ("{{ raise_exception('only user/assistant') }}", [USER], r"rejected the conversation at line 1: only user/"),
        ("a\n{{ messages[0].content + 1 }}", [USER], r"at line 2: TypeError: can only concatenate"),
        ("{{ ''.__class__.__mro__ }}", [USER], r"SecurityError"),
        ("{% set x = [] %}{{ x.append(1) }}", [USER], r"SecurityError: .*append"),
        ("{% set ns = namespace(_secret=1) %}", [USER], r"underscore-prefixed"),
        ("{{ messages[3].content.upper() }}", [USER], r"UndefinedError"),
        ("{{ 1 // 0 }}", [USER], r"ZeroDivisionError"),
        ("{{ m }}", [], r"empty conversation"),
        ("{{ m }}", [USER, "hello"], r"messages\[1\] must be an object"),
        ("{{ m }}", "hello", r"messages must be a list"),
    ],
)
def test_template_errors_are_typed(template, messages, match):
    with pytest.raises(ChatTemplateError, match=match) as info:
        render_chat(template, messages)
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)


def test_raise_exception_has_its_own_type():
    with pytest.raises(TemplateRaisedError):
        render_chat("{{ raise_exception('no') }}", [USER])


def test_real_template_on_bad_messages(setup: Setup):
    with pytest.raises(ChatTemplateError, match=r"Undefined|TypeError"):
        render_chat(setup.template, [{"role": "user"}])  # no content
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat(setup.template, [{"role": "user", "content": ["a", "list"]}])


def test_bad_tools_and_special_tokens():
    with pytest.raises(ChatTemplateError, match="tools must be a list"):
        render_chat("x", [USER], tools="getWeather")  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match=r"tools\[0\] must be an object"):
        render_chat("x", [USER], tools=["getWeather"])  # type: ignore[list-item]
    with pytest.raises(ChatTemplateError, match="may not set the template variables messages"):
        render_chat("x", [USER], special_tokens={"messages": "x"})
    with pytest.raises(ChatTemplateError, match="must be a string"):
        compile_template(None)  # type: ignore[arg-type]
