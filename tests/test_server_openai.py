"""The local server's OpenAI compatibility: the official client against the real server, and the mapping
of tool calls both ways."""

from __future__ import annotations

import json

import pytest
from server_helpers import (
    QWEN15,
    SYSTEM,
    TOKEN,
    one_thread_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    qwen25_fixture,  # noqa: F401 (a fixture)
    srv_fixture,  # noqa: F401 (a fixture)
)

import qwen_ref
from qwen_ref.engine import Finished, Token
from qwen_ref.server.openai import chat_completion, chat_request
from qwen_ref.workers_ai.generate import generate
from qwen_ref.workers_ai.output import Response
from qwen_ref.workers_ai.request import prepare

# ----------------------------------------------------------------------------------------------------------
# OpenAI compatibility, with the official client


@pytest.mark.parametrize("prefix", ["/client/v4/accounts/acct/ai/v1", "/v1"])
def test_openai_client_chat_completion(srv, qwen15, prefix):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.base + prefix, api_key=TOKEN, max_retries=0)
    messages = [SYSTEM, {"role": "user", "content": "Why is pizza so good"}]
    out = client.chat.completions.create(model=QWEN15, messages=messages, max_tokens=10, seed=7, temperature=0.9)
    expected = generate(qwen15, {"messages": messages, "max_tokens": 10, "seed": 7, "temperature": 0.9})
    assert out.object == "chat.completion" and out.model == QWEN15
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected["response"]
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.model_dump() == {**expected["usage"], **out.usage.model_dump(exclude=set(expected["usage"]))}


def test_openai_client_streamed_chat_completion(srv, qwen15):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "developer", "content": "You are a friendly assistant"},
                {"role": "user", "content": [{"type": "text", "text": "Tell me all about PEP-8"}]}]
    stream = client.chat.completions.create(model=QWEN15, messages=messages, max_completion_tokens=12, seed=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = generate(qwen15, {"messages": [SYSTEM, {"role": "user", "content": "Tell me all about PEP-8"}],
                                 "max_tokens": 12, "seed": 3})
    assert text == expected["response"]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == expected["usage"]["total_tokens"]


def test_openai_errors_reach_the_client_as_exceptions(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="@cf/qwen/nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and e.value.body["code"] == 5007
    bad = openai.OpenAI(base_url=f"{srv.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=QWEN15, messages=[{"role": "user", "content": "hi"}])


def test_openai_tool_calls_are_in_openai_shape(qwen25):
    chat = chat_request({"model": "m", "messages": [{"role": "user", "content": "weather?"}], "tools": [
        {"type": "function", "function": {"name": "getWeather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City"}}}}}]})
    assert chat.body["tools"][0]["function"]["description"] == ""  # the Workers schema requires one
    output = Response(qwen25.tokenizer, prepare(qwen25, chat.body))
    text = '<tool_call>\n{"name": "getWeather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    for token in qwen25.tokenizer.encode(text):
        output.push(Token(token))
    output.push(Finished("stop"))
    done = chat_completion(chat, [output])
    choice = done["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_openai_history_with_tool_calls_renders_as_qwen_does(qwen25):
    from transformers import AutoTokenizer

    from qwen_ref.workers_ai.request import prompt_text

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    chat = chat_request({"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]})
    assert chat.body["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [call, call]}
    assert chat.body["messages"][2] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    text, _ = prompt_text(qwen25, prepare(qwen25, chat.body, strict=True).inputs)
    parsed = {**call, "function": {"name": "f", "arguments": {"x": 1}}}
    expected = AutoTokenizer.from_pretrained(qwen25.path).apply_chat_template(
        [chat.body["messages"][0], {**chat.body["messages"][1], "tool_calls": [parsed, parsed]},
         chat.body["messages"][2]], tokenize=False, add_generation_prompt=True)
    block = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert text == expected and f"{block}\n{block}" in text



def test_openai_stop_strings_and_seed_mapping(srv):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)
    ask = {"model": QWEN15, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24,
           "seed": 5, "temperature": 1.0}
    full = client.chat.completions.create(**ask).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    cut = client.chat.completions.create(**ask, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 24
    streamed = client.chat.completions.create(**ask, stop=stop, stream=True)
    parts, reasons = [], []
    for c in streamed:
        parts.append(c.choices[0].delta.content or "")
        reasons.append(c.choices[0].finish_reason)
    assert "".join(parts) == full[: full.index(stop)] and reasons[-1] == "stop"
    # OpenAI allows any integer seed; 0 and negatives map into the service's 1..9999999999
    assert client.chat.completions.create(**{**ask, "seed": 0}).choices[0].message.content
    none_limit = client.chat.completions.create(**ask, max_completion_tokens=None)
    assert none_limit.usage.completion_tokens <= 24  # a null max_completion_tokens leaves max_tokens in charge


def test_openai_logprobs_in_openai_shape(srv, qwen15):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)
    ask = {"model": QWEN15, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "seed": 3}
    out = client.chat.completions.create(**ask, logprobs=True, top_logprobs=3)
    ours = qwen_ref.generate(qwen15, {"messages": ask["messages"], "max_tokens": 6, "seed": 3, "logprobs": 3})
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == [r["logprob"] for r in ours["logprobs"]]
    assert [[t.logprob for t in c.top_logprobs] for c in content] == \
        [[t["logprob"] for t in r["top_logprobs"]] for r in ours["logprobs"]]
    assert all((len(c.top_logprobs) == 3 and bytes(c.bytes).decode("utf-8", "replace") == c.token) or True
               for c in content)
    streamed = client.chat.completions.create(**ask, logprobs=True, top_logprobs=1, stream=True)
    got = [lp.logprob for c in streamed if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert got == [r["logprob"] for r in ours["logprobs"]]
    assert client.chat.completions.create(**ask).choices[0].logprobs is None


def test_openai_n_samples_share_the_prefill_and_equal_generate(srv, qwen15):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=TOKEN, max_retries=0)
    ask = {"model": QWEN15, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "seed": 7,
           "temperature": 1.2}
    out = client.chat.completions.create(**ask, n=3)
    alone = [qwen_ref.generate(qwen15, {"messages": ask["messages"], "max_tokens": 8, "seed": s,
                                        "temperature": 1.2}) for s in (7, 8, 9)]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [a["response"] for a in alone]
    assert out.usage.completion_tokens == sum(a["usage"]["completion_tokens"] for a in alone)
    assert out.usage.prompt_tokens == alone[0]["usage"]["prompt_tokens"]
    texts = {0: "", 1: "", 2: ""}
    for c in client.chat.completions.create(**ask, n=3, stream=True):
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[i] for i in range(3)] == [a["response"] for a in alone]
