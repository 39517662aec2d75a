"""The local server's bad requests: each gets its HTTP status and Workers AI code, and the server keeps
answering."""

from __future__ import annotations

import json
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")

from server_helpers import (  # noqa: E402
    MAX_BODY,
    QWEN15,
    TOKEN,
    srv_fixture,  # noqa: F401 (a fixture)
)

# ----------------------------------------------------------------------------------------------------------
# Bad requests: each gets its status and code, the server keeps answering

RUN = "/client/v4/accounts/acct/ai/run/" + QWEN15
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_TYPE = {"Content-Type": "application/json"}
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _chat(**kw: Any) -> bytes:
    body = {"model": QWEN15, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    return json.dumps(body).encode()


def _completion(**kw: Any) -> bytes:
    return json.dumps({"model": QWEN15, "prompt": "hi", "max_tokens": 2, **kw}).encode()


def _body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _chunked(data: bytes):
    for i in range(0, len(data), 16384):
        yield data[i:i + 16384]


BAD_REQUESTS = [
    # (id, method, path, headers, body, status, code)
    ("no-token", "POST", RUN, JSON_TYPE, _body(GOOD), 401, 10000),
    ("wrong-token", "POST", RUN, {"Authorization": "Bearer nope"}, _body(GOOD), 401, 10000),
    ("basic-scheme", "POST", RUN, {"Authorization": f"Basic {TOKEN}"}, _body(GOOD), 401, 10000),
    ("bare-bearer", "POST", RUN, {"Authorization": "Bearer"}, _body(GOOD), 401, 10000),
    ("token-prefix", "POST", RUN, {"Authorization": f"Bearer {TOKEN[:-1]}"}, _body(GOOD), 401, 10000),
    ("unknown-model", "POST", "/client/v4/accounts/a/ai/run/@cf/qwen/nope", AUTH, _body(GOOD), 400, 5007),
    ("unknown-model-short-route", "POST", "/ai/run/@cf/meta/llama", AUTH, _body(GOOD), 400, 5007),
    ("truncated-json", "POST", RUN, AUTH, b'{"prompt": ', 400, 5006),
    ("empty-body", "POST", RUN, AUTH, b"", 400, 5006),
    ("not-utf8", "POST", RUN, AUTH, b'{"prompt": "\xff\xfe"}', 400, 5006),
    ("nan-literal", "POST", RUN, AUTH, b'{"prompt": "x", "temperature": NaN}', 400, 5006),
    ("huge-float", "POST", RUN, AUTH, b'{"prompt": "x", "temperature": 1e999}', 400, 5006),
    ("5000-digit-int", "POST", RUN, AUTH, b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", 400, 5006),
    ("huge-seed", "POST", RUN, AUTH, _body({"prompt": "x", "seed": 10**30}), 400, 5006),
    ("huge-max-tokens", "POST", RUN, AUTH, _body({"prompt": "x", "max_tokens": 10**30}), 400, 400),
    ("recursion-deep", "POST", RUN, AUTH, b'{"prompt": "x", "response_format": ' + b"[" * 50000, 400, 5006),
    ("nested-100", "POST", RUN, AUTH, _body({"prompt": "x", "raw": json.loads("[" * 100 + "]" * 100)}), 400, 5006),
    ("array-body", "POST", RUN, AUTH, b"[1, 2]", 400, 5006),
    ("string-body", "POST", RUN, AUTH, b'"hi"', 400, 5006),
    ("empty-object", "POST", RUN, AUTH, b"{}", 400, 5006),
    ("prompt-and-messages", "POST", RUN, AUTH, _body({"prompt": "x", **GOOD}), 400, 5006),
    ("empty-prompt", "POST", RUN, AUTH, _body({"prompt": ""}), 400, 5006),
    ("temperature-6", "POST", RUN, AUTH, _body({"prompt": "x", "temperature": 6}), 400, 5006),
    ("temperature-string", "POST", RUN, AUTH, _body({"prompt": "x", "temperature": "hot"}), 400, 5006),
    ("max-tokens-0", "POST", RUN, AUTH, _body({"prompt": "x", "max_tokens": 0}), 400, 5006),
    ("stream-string", "POST", RUN, AUTH, _body({"prompt": "x", "stream": "yes"}), 400, 5006),
    ("content-array", "POST", RUN, AUTH, _body({"messages": [{"role": "user", "content": ["x"]}]}), 400, 5006),
    ("role-robot", "POST", RUN, AUTH, _body({"messages": [{"role": "robot", "content": "x"}]}), 400, 5006),
    ("bad-json-schema", "POST", "/ai/run/tiny", AUTH,
     _body({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"type": "nonsense"}}}),
     400, 5006),
    ("lora-on-qwen1.5", "POST", RUN, AUTH, _body({"prompt": "x", "lora": "my-adapter"}), 405, 5005),
    ("over-long-prompt", "POST", RUN, AUTH, _body({"prompt": "a " * 40000}), 400, 400),
    ("prompt-plus-max-tokens", "POST", RUN, AUTH, _body({"prompt": "x", "max_tokens": 31999}), 400, 400),
    ("body-over-limit", "POST", RUN, AUTH, _body({"prompt": "a" * (MAX_BODY + 10)}), 413, 3006),
    ("chunked-over-limit", "POST", RUN, AUTH, "chunked", 413, 3006),
    ("multipart", "POST", RUN, {**AUTH, "Content-Type": "multipart/form-data; boundary=x"}, _body(GOOD), 415, 415),
    ("xml", "POST", RUN, {**AUTH, "Content-Type": "application/xml"}, b"<prompt>x</prompt>", 415, 415),
    ("get-on-run", "GET", RUN, AUTH, None, 405, 405),
    ("no-route", "POST", "/client/v4/accounts/a/ai/nothing", AUTH, _body(GOOD), 404, 7000),
    ("chat-no-token", "POST", CHAT, JSON_TYPE, _chat(), 401, 10000),
    ("chat-unknown-model", "POST", CHAT, AUTH, _chat(model="gpt-4o"), 400, 5007),
    ("chat-no-model", "POST", CHAT, AUTH, _body({"messages": [{"role": "user", "content": "hi"}]}), 400, 5006),
    ("chat-messages-object", "POST", CHAT, AUTH, _chat(messages={"role": "user"}), 400, 5006),
    ("chat-n-0", "POST", CHAT, AUTH, _chat(n=0), 400, 5006),
    ("chat-n-string", "POST", CHAT, AUTH, _chat(n="2"), 400, 5006),
    ("chat-five-stops", "POST", CHAT, AUTH, _chat(stop=["a", "b", "c", "d", "e"]), 400, 5006),
    ("chat-stop-number", "POST", CHAT, AUTH, _chat(stop=7), 400, 5006),
    ("chat-unknown-arg", "POST", CHAT, AUTH, _chat(wibble=True), 400, 5006),
    ("chat-tool-choice-required", "POST", CHAT, AUTH, _chat(tool_choice="required"), 400, 5006),
    ("chat-negative-frequency", "POST", CHAT, AUTH, _chat(frequency_penalty=-1), 400, 5006),
    ("chat-image-part", "POST", CHAT, AUTH,
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, 5006),
    ("chat-bad-json", "POST", CHAT, AUTH, b"{model", 400, 5006),
    ("chat-tool-choice-unknown-tool", "POST", CHAT, AUTH,
     _chat(tools=[{"type": "function", "function": {"name": "f"}}],
           tool_choice={"type": "function", "function": {"name": "g"}}), 400, 5006),
    ("completion-no-prompt", "POST", COMPLETIONS, AUTH, _body({"model": QWEN15}), 400, 5006),
    ("completion-empty-prompt-list", "POST", COMPLETIONS, AUTH, _completion(prompt=[]), 400, 5006),
    ("completion-empty-ids", "POST", COMPLETIONS, AUTH, _completion(prompt=[[]]), 400, 5006),
    ("completion-mixed-list", "POST", COMPLETIONS, AUTH, _completion(prompt=["a", 3]), 400, 5006),
    ("completion-id-out-of-vocab", "POST", COMPLETIONS, AUTH, _completion(prompt=[1, 10**7]), 400, 5006),
    ("completion-negative-id", "POST", COMPLETIONS, AUTH, _completion(prompt=[-1]), 400, 5006),
    ("completion-2**70-id", "POST", COMPLETIONS, AUTH, _completion(prompt=[2**70]), 400, 5006),
    ("completion-too-many-prompts", "POST", COMPLETIONS, AUTH, _completion(prompt=["a"] * 1025), 400, 5006),
    ("completion-logprobs-21", "POST", COMPLETIONS, AUTH, _completion(logprobs=21), 400, 5006),
    ("completion-logprobs-true", "POST", COMPLETIONS, AUTH, _completion(logprobs=True), 400, 5006),
    ("completion-max-tokens-negative", "POST", COMPLETIONS, AUTH, _completion(max_tokens=-1), 400, 5006),
    ("completion-echo-string", "POST", COMPLETIONS, AUTH, _completion(echo="yes"), 400, 5006),
    ("completion-suffix", "POST", COMPLETIONS, AUTH, _completion(suffix="end"), 400, 5006),
    ("completion-best-of", "POST", COMPLETIONS, AUTH, _completion(best_of=3), 400, 5006),
    ("completion-too-many-samples", "POST", COMPLETIONS, AUTH, _completion(prompt=["a"] * 4, n=300), 400, 5006),
    ("completion-unknown-arg", "POST", COMPLETIONS, AUTH, _completion(wibble=1), 400, 5006),
    ("completion-unknown-model", "POST", COMPLETIONS, AUTH, _completion(model="davinci-002"), 400, 5007),
    ("completion-no-token", "POST", COMPLETIONS, JSON_TYPE, _completion(), 401, 10000),
    # hostile input (#15): refused before any expensive work, with bodies that always encode
    ("5000-messages", "POST", RUN, AUTH, _body({"messages": [{"role": "user", "content": ""}] * 5000}), 400, 5006),
    ("300-tools", "POST", RUN, AUTH, _body({"messages": [{"role": "user", "content": "hi"}],
                                           "tools": [{"name": "f"}] * 300}), 400, 5006),
    ("surrogate-prompt", "POST", RUN, AUTH, b'{"prompt": "\\ud800"}', 400, 5006),
    ("surrogate-tool-name", "POST", RUN, AUTH,
     b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "\\udfff"}]}', 400, 5006),
    ("surrogate-chat", "POST", CHAT, AUTH, _chat().replace(b'"hi"', b'"\\ud800"'), 400, 5006),
    ("deep-regex-pattern", "POST", RUN, AUTH, _body({"prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"type": "string", "pattern": "(" * 500 + "a" + ")" * 500}}}),
     400, 5006),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(srv, case):
    _, method, path, headers, body, status, code = case
    content = _chunked(b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}') if body == "chunked" else body
    r = httpx.request(method, srv.base + path, headers=headers, content=content, timeout=60)
    assert r.status_code == status, r.text
    answer = r.json()
    if path in (CHAT, COMPLETIONS):
        assert answer["error"]["code"] == code and answer["error"]["message"]
    else:
        # as the service's: result {} once the request reached the model (its input), null before (auth, body)
        assert answer["success"] is False and answer["result"] in (None, {}) and answer["messages"] == []
        assert [e["code"] for e in answer["errors"]] == [code] and answer["errors"][0]["message"]


def test_error_envelopes_say_whether_the_request_reached_the_model(srv):
    reached = httpx.post(srv.base + RUN, headers=AUTH, json={"prompt": "x", "temperature": 6}, timeout=30).json()
    refused = httpx.post(srv.base + RUN, headers={"Authorization": "Bearer no"}, json=GOOD, timeout=30).json()
    route = httpx.post(srv.base + "/client/v4/accounts/a/ai/nothing", headers=AUTH, json=GOOD, timeout=30).json()
    assert reached["result"] == {} and refused["result"] is None and route["result"] is None
    assert route["errors"] == [{"code": 7000, "message": "No route for that URI"}]


def test_unknown_keys_are_ignored_and_named_in_a_header(srv):
    body = {**GOOD, "stop": None, "options": {"rejectIfBusy": False}, "wibble": 1}
    r = httpx.post(srv.base + RUN, headers=AUTH, json=body, timeout=60)
    assert r.status_code == 200 and r.json()["success"] is True
    assert r.headers["x-qwen-ref-ignored-keys"] == "/options, /stop, /wibble"


def test_models_by_id(srv):
    r = httpx.get(f"{srv.base}/v1/models/{QWEN15}", headers=AUTH, timeout=30)
    assert r.json() == {"id": QWEN15, "object": "model", "created": 0, "owned_by": "qwen-ref"}
    missing = httpx.get(f"{srv.base}/v1/models/@cf/meta/llama", headers=AUTH, timeout=30)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == 5007


def test_bad_request_messages_name_the_problem(srv):
    r = httpx.post(srv.base + RUN, headers=AUTH, json={"prompt": "x", "temperature": 6}, timeout=30)
    assert r.json()["errors"][0]["message"].startswith("AiError: Bad input: /temperature")
    r = httpx.post(srv.base + RUN, headers=AUTH, json={"prompt": "x", "lora": "a"}, timeout=30)
    assert r.json()["errors"][0]["message"] == f"AiError: The model {QWEN15} does not support LoRa inference"


def test_still_answers_after_the_bad_requests(srv):
    for case in BAD_REQUESTS[:10]:
        _, method, path, headers, body, *_ = case
        httpx.request(method, srv.base + path, headers=headers, content=body if body != "chunked" else b"", timeout=30)
    assert srv.proc.poll() is None
    r = httpx.post(srv.base + RUN, headers=AUTH, json=GOOD, timeout=30)
    assert r.status_code == 200 and r.json()["success"] is True

