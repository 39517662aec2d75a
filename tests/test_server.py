"""The local Workers AI server, end to end: a real server process on loopback, real HTTP clients."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
requests = pytest.importorskip("requests")
sseclient = pytest.importorskip("sseclient")

import qwen_ref  # noqa: E402
from qwen_ref.engine import Engine, Finished, Token  # noqa: E402
from qwen_ref.errors import JsonModeNotMet, QwenRefError  # noqa: E402
from qwen_ref.server.app import load_models, parse_alias  # noqa: E402
from qwen_ref.server.bridge import Served, collect, start  # noqa: E402
from qwen_ref.server.openai import chat_completion, chat_request  # noqa: E402
from qwen_ref.server.settings import Settings  # noqa: E402
from qwen_ref.workers_ai.generate import generate  # noqa: E402
from qwen_ref.workers_ai.output import Response  # noqa: E402
from qwen_ref.workers_ai.request import prepare  # noqa: E402
from qwen_ref.workers_ai.validate import validate_output  # noqa: E402

TOKEN = "test-token-123"
QWEN15 = "@cf/qwen/qwen1.5-0.5b-chat"
MAX_BODY = 256 * 1024
SYSTEM = {"role": "system", "content": "You are a friendly assistant"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Server:
    def __init__(self, proc: subprocess.Popen, base: str):
        self.proc = proc
        self.base = base
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def run_url(self, model: str, account: str = "your-account-id") -> str:
        return f"{self.base}/client/v4/accounts/{account}/ai/run/{model}"

    def stats(self, model: str = QWEN15) -> dict[str, int]:
        return requests.get(f"{self.base}/qwen-ref/stats", headers=self.auth, timeout=10).json()["models"][model]

    def wait_idle(self, model: str = QWEN15, timeout: float = 30) -> dict[str, int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            stats = self.stats(model)
            if stats["active"] == 0 and stats["queued"] == 0:
                return stats
            time.sleep(0.05)
        raise AssertionError(f"the engine is still busy: {stats}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for the in-process runs: on a busy small machine it is the fastest."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def qwen15(tiny):
    return qwen_ref.load(tiny("qwen1.5"))


@pytest.fixture(scope="module")
def qwen25(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


@pytest.fixture(scope="module")
def srv(tiny):
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen_ref.server", "--port", str(port), "--api-token", TOKEN,
           "--max-body-bytes", str(MAX_BODY), "--timeout", "60", "--threads", "1",
           "--name", f"tiny={tiny('qwen2.5')}", "--name", f"{QWEN15}={tiny('qwen1.5')}"]
    env = {**os.environ, "QWEN_REF_API_TOKEN": ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    s = Server(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stdout.read().decode()}")
        try:
            if requests.get(f"{s.base}/v1/models", headers=s.auth, timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    yield s
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def sse_payloads(chunks) -> list[str]:
    """The data of each event, as a standard SSE client reads them."""
    return [event.data for event in sseclient.SSEClient(chunks).events()]


def without_padding(payloads: list[str]) -> list[Any]:
    out = []
    for p in payloads:
        obj = p if p == "[DONE]" else json.loads(p)
        if isinstance(obj, dict):
            obj.pop("p", None)
        out.append(obj)
    return out


# ----------------------------------------------------------------------------------------------------------
# The seeds' own examples, host changed


def test_seed_python_requests_example(srv, qwen15, monkeypatch):
    monkeypatch.setenv("CLOUDFLARE_AUTH_TOKEN", TOKEN)
    # --- the seed's Python example, with only the host changed
    ACCOUNT_ID = "your-account-id"
    AUTH_TOKEN = os.environ.get("CLOUDFLARE_AUTH_TOKEN")

    prompt = "Tell me all about PEP-8"
    response = requests.post(
        f"{srv.base}/client/v4/accounts/{ACCOUNT_ID}/ai/run/@cf/qwen/qwen1.5-0.5b-chat",
        headers={"Authorization": f"Bearer {AUTH_TOKEN}"},
        json={
            "messages": [
                {"role": "system", "content": "You are a friendly assistant"},
                {"role": "user", "content": prompt}
            ]
        }
    )
    result = response.json()
    # ---
    assert response.status_code == 200
    assert result["success"] is True and result["errors"] == [] and result["messages"] == []
    validate_output(result["result"])
    assert result["result"]["usage"]["completion_tokens"] <= 256
    expected = prepare(qwen15, {"messages": [SYSTEM, {"role": "user", "content": prompt}]})
    assert result["result"]["usage"]["prompt_tokens"] == len(expected.prompt_ids)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_seed_curl_example(srv):
    host = srv.base
    script = (
        f'curl {host}/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/@cf/qwen/qwen1.5-0.5b-chat \\\n'
        '  -X POST \\\n'
        '  -H "Authorization: Bearer $CLOUDFLARE_AUTH_TOKEN" \\\n'
        '  -d \'{ "messages": [{ "role": "system", "content": "You are a friendly assistant" }, '
        '{ "role": "user", "content": "Why is pizza so good" }]}\''
    )
    env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": "0123abcd", "CLOUDFLARE_AUTH_TOKEN": TOKEN}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, timeout=60, check=True)
    result = json.loads(done.stdout)
    assert result["success"] is True
    validate_output(result["result"])


def test_seed_streaming_example_parses_as_sse_and_matches_generate(srv, qwen15):
    body = {"messages": [SYSTEM, {"role": "user", "content": "What is the origin of the phrase Hello, World"}],
            "stream": True, "max_tokens": 24, "seed": 11}
    with requests.post(srv.run_url(QWEN15), headers=srv.auth, json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_payloads(r)
    assert payloads[-1] == "[DONE]"
    for p in payloads[:-2]:
        event = json.loads(p)
        assert set(event) == {"response", "p"} and event["p"]
    assert without_padding(payloads) == without_padding(sse_payloads(generate(qwen15, body)))


def test_ai_run_short_route_and_prompt_body(srv, qwen25):
    body = {"prompt": "Tell me all about PEP-8", "max_tokens": 12, "seed": 5, "temperature": 1.1}
    r = httpx.post(f"{srv.base}/ai/run/tiny", headers=srv.auth, json=body, timeout=60)
    assert r.status_code == 200
    assert r.json()["result"] == generate(qwen25, body)


def test_json_mode_matches_generate(srv, qwen25):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    body = {"prompt": "Answer in JSON", "max_tokens": 40, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": schema}}
    r = httpx.post(srv.run_url("tiny"), headers=srv.auth, json=body, timeout=60)
    try:
        expected = generate(qwen25, body)
    except JsonModeNotMet as e:
        assert (r.status_code, r.json()["errors"][0]["message"]) == (400, f"AiError: {e}")
    else:
        assert r.status_code == 200 and r.json()["result"] == expected
        validate_output(r.json()["result"], body["response_format"])


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
    done = chat_completion(chat, output)
    choice = done["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_openai_history_with_tool_calls_renders_as_qwen_does():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    chat = chat_request({"model": "m", "messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [call, call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]})
    block = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert chat.body["messages"][1] == {"role": "assistant", "content": f"{block}\n{block}"}
    assert chat.body["messages"][2] == {"role": "tool", "content": "42"}


# ----------------------------------------------------------------------------------------------------------
# Concurrency: continuous batching, disconnects, memory


def _stream_text(base: str, body: dict[str, Any], stop_after: int | None, start: threading.Barrier) -> str | int:
    """The streamed text, or (with stop_after) the number of events read before hanging up."""
    start.wait()
    r = requests.post(f"{base}/ai/run/{QWEN15}", headers={"Authorization": f"Bearer {TOKEN}"}, json=body,
                      stream=True, timeout=120)
    text: list[str] = []
    for event in sseclient.SSEClient(r).events():
        if event.data == "[DONE]":
            break
        text.append(json.loads(event.data)["response"])
        if stop_after is not None and len(text) >= stop_after:
            r.close()  # hang up mid-stream
            return len(text)
    r.close()
    return "".join(text)


def _run_clients(base: str, bodies: list[dict[str, Any]], stop_after: list[int | None]) -> list[str | int]:
    start = threading.Barrier(len(bodies))
    results: list[str | int] = [""] * len(bodies)

    def client(i: int) -> None:
        results[i] = _stream_text(base, bodies[i], stop_after[i], start)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_sixteen_streams_four_hang_up(srv, qwen15):
    max_tokens, cut = 32, 8
    bodies = [{"messages": [SYSTEM, {"role": "user", "content": f"Question number {i}?"}], "stream": True,
               "max_tokens": max_tokens, "seed": 100 + i, "temperature": 1.0} for i in range(16)]
    quitters = {1, 6, 9, 14}
    stop_after = [cut if i in quitters else None for i in range(16)]

    _run_clients(srv.base, [{**b, "max_tokens": 8} for b in bodies], [None] * 16)  # warm-up: 16 at once
    srv.wait_idle()
    baseline = _rss_bytes(srv.proc.pid)
    before = srv.stats()

    results = _run_clients(srv.base, bodies, stop_after)
    after = srv.wait_idle()
    rss = _rss_bytes(srv.proc.pid)

    alone = {i: generate(qwen15, {**bodies[i], "stream": False}) for i in range(16) if i not in quitters}
    for i, out in alone.items():
        assert results[i] == out["response"], f"client {i} got other text in the batch than alone"
    assert all(results[i] == cut for i in quitters)
    # a hung-up stream stops decoding within a few steps, long before its max_tokens
    generated = after["tokens"] - before["tokens"]
    finished = sum(out["usage"]["completion_tokens"] for out in alone.values())
    assert generated <= finished + len(quitters) * (cut + 12), (generated, finished)
    assert after["requests"] - before["requests"] == 16
    assert rss <= baseline * 1.05 + 8 * 2**20, (rss, baseline)


def test_requests_that_arrive_together_share_steps(srv, qwen15):
    bodies = [{"prompt": f"Item {i}", "max_tokens": 16, "seed": i + 1, "temperature": 0.8} for i in range(6)]
    before = srv.stats()

    async def run_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, headers=srv.auth) as client:
            return await asyncio.gather(*(client.post(srv.run_url(QWEN15), json=b) for b in bodies))

    responses = asyncio.run(run_all())
    after = srv.wait_idle()
    assert [r.json()["result"] for r in responses] == [generate(qwen15, b) for b in bodies]
    steps = after["steps"] - before["steps"]
    assert steps < 6 * 16 / 2, f"{steps} steps for 6 requests of 16 tokens: they were not batched"


def test_a_non_streamed_client_that_hangs_up_frees_its_slot(srv):
    before = srv.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.run_url(QWEN15), headers=srv.auth, json={"prompt": "x", "max_tokens": 3000}, timeout=1.0)
    after = srv.wait_idle(timeout=10)
    assert after["tokens"] - before["tokens"] < 1000


def test_binds_loopback_by_default():
    from qwen_ref.cli import build_parser

    args = build_parser().parse_args(["serve", "tiny"])
    assert (args.host, args.batching, args.api_token) == ("127.0.0.1", "exact", None)


# ----------------------------------------------------------------------------------------------------------
# Bad requests: each gets its status and code, the server keeps answering

RUN = "/client/v4/accounts/acct/ai/run/" + QWEN15
CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON_TYPE = {"Content-Type": "application/json"}
GOOD = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _chat(**kw: Any) -> bytes:
    body = {"model": QWEN15, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    return json.dumps(body).encode()


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
    ("unknown-key", "POST", RUN, AUTH, _body({"prompt": "x", "wibble": 1}), 400, 5006),
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
    ("no-route", "POST", "/client/v4/accounts/a/ai/nothing", AUTH, _body(GOOD), 404, 404),
    ("chat-no-token", "POST", CHAT, JSON_TYPE, _chat(), 401, 10000),
    ("chat-unknown-model", "POST", CHAT, AUTH, _chat(model="gpt-4o"), 400, 5007),
    ("chat-no-model", "POST", CHAT, AUTH, _body({"messages": [{"role": "user", "content": "hi"}]}), 400, 5006),
    ("chat-messages-object", "POST", CHAT, AUTH, _chat(messages={"role": "user"}), 400, 5006),
    ("chat-n-2", "POST", CHAT, AUTH, _chat(n=2), 400, 5006),
    ("chat-stop", "POST", CHAT, AUTH, _chat(stop=["\n"]), 400, 5006),
    ("chat-unknown-arg", "POST", CHAT, AUTH, _chat(wibble=True), 400, 5006),
    ("chat-tool-choice-required", "POST", CHAT, AUTH, _chat(tool_choice="required"), 400, 5006),
    ("chat-negative-frequency", "POST", CHAT, AUTH, _chat(frequency_penalty=-1), 400, 5006),
    ("chat-image-part", "POST", CHAT, AUTH,
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400, 5006),
    ("chat-bad-json", "POST", CHAT, AUTH, b"{model", 400, 5006),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(srv, case):
    _, method, path, headers, body, status, code = case
    content = _chunked(b'{"prompt": "' + b"a" * (MAX_BODY + 10) + b'"}') if body == "chunked" else body
    r = httpx.request(method, srv.base + path, headers=headers, content=content, timeout=60)
    assert r.status_code == status, r.text
    answer = r.json()
    if path == CHAT:
        assert answer["error"]["code"] == code and answer["error"]["message"]
    else:
        assert answer["success"] is False and answer["result"] is None and answer["messages"] == []
        assert [e["code"] for e in answer["errors"]] == [code] and answer["errors"][0]["message"]


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


# ----------------------------------------------------------------------------------------------------------
# The engine in-process: a request that must run alone, and deadlines


def _run_engine(qwen, jobs: list[tuple[dict[str, Any], float]]) -> list[Any]:
    """Submit (body, timeout) jobs at once through the server's bridge; each one's result or typed error."""
    served = Served("m", qwen, Engine(qwen.model, max_running=4))
    served.engine.start()

    async def one(body: dict[str, Any], timeout: float) -> Any:
        output = await collect(await start(served, body, Settings(timeout_s=timeout)))
        try:
            return output.result()
        except QwenRefError as e:
            return e

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(one(*job) for job in jobs))

    try:
        return asyncio.run(run_all())
    finally:
        served.engine.close()


def test_requests_through_the_bridge_match_generate(qwen15):
    bodies = [{"prompt": f"p{i}", "max_tokens": 6 + i, "seed": i + 1} for i in range(6)]
    assert _run_engine(qwen15, [(b, 60) for b in bodies]) == [generate(qwen15, b) for b in bodies]


def test_a_request_past_its_deadline_is_a_408(qwen15):
    outcomes = _run_engine(qwen15, [({"prompt": "x", "max_tokens": 4}, 0.0),
                                    ({"prompt": "y", "max_tokens": 4, "seed": 2}, 60)])
    assert isinstance(outcomes[0], QwenRefError) and (outcomes[0].status, outcomes[0].code) == (408, 3007)
    assert outcomes[1] == generate(qwen15, {"prompt": "y", "max_tokens": 4, "seed": 2})


def test_the_logprobs_extension_through_the_server(srv, qwen25):
    body = {"prompt": "Hello", "max_tokens": 5, "seed": 3, "logprobs": 2}
    r = httpx.post(srv.run_url("tiny"), headers=srv.auth, json=body, timeout=60)
    assert r.status_code == 200 and r.json()["result"] == generate(qwen25, body)


def test_aliases_take_the_workers_ai_model(tmp_path, tiny):
    with pytest.raises(qwen_ref.QwenRefError, match="NAME=SOURCE"):
        parse_alias("no-equals-sign")
    served = load_models([str(tiny("qwen1.5"))], [f"{QWEN15}={tiny('qwen1.5')}"])
    assert set(served) == {str(tiny("qwen1.5")), QWEN15}
    assert served[QWEN15].engine is served[str(tiny("qwen1.5"))].engine  # one checkpoint, one engine
    assert served[QWEN15].qwen.known.context_window == 32000
    assert served[str(tiny("qwen1.5"))].qwen.known is None
