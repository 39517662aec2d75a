"""Hostile input to the server and the request path: size limits checked before expensive work, lone
surrogates, read deadlines and the connection limit. Each is refused with a typed error in bounded time, and the
server keeps answering."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from server_helpers import TOKEN, start_server, stop_server

import qwen_ref
from qwen_ref.errors import ContextWindowExceeded, InvalidInput
from qwen_ref.workers_ai.limits import Limits
from qwen_ref.workers_ai.request import prepare

requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")

ASK = [{"role": "user", "content": "hi"}]
TOOL = {"name": "f", "parameters": {"type": "object"}}


@pytest.fixture(scope="module")
def qwen25(tiny):
    return qwen_ref.load(tiny("qwen2.5"))


# ----------------------------------------------------------------------------------------------------------
# Limits, before any expensive work (the Python API and the server share them)

@pytest.mark.parametrize(("body", "path", "rule"), [
    ({"prompt": "a" * 1_000_001}, "/prompt", "maxLength"),
    ({"messages": [{"role": "user", "content": "a" * 600_000}] * 2}, "/messages", "maxLength"),
    ({"messages": [{"role": "user", "content": ""}] * 200_000}, "/messages", "maxItems"),
    ({"messages": ASK, "tools": [TOOL] * 10_000}, "/tools", "maxItems"),
    ({"messages": ASK, "tools": [{"name": "f", "description": "d" * 300_000}]}, "/tools", "maxLength"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"enum": ["e" * 300_000]}}},
     "/response_format", "maxLength"),
])
def test_limits_come_before_validation_and_the_tokenizer(qwen25, monkeypatch, body, path, rule):
    def boom(*_):
        raise AssertionError("the tokenizer ran")

    monkeypatch.setattr(qwen25.tokenizer, "encode", boom)
    with pytest.raises(InvalidInput) as e:
        prepare(qwen25, body)
    assert e.value.path == path and e.value.rule == rule


def test_a_text_that_cannot_fit_is_refused_before_tokenizing(qwen25, monkeypatch):
    monkeypatch.setattr(qwen25.tokenizer, "encode", lambda *_: pytest.fail("the tokenizer ran"))
    window = 32768  # the tiny qwen2.5's max_position_embeddings
    chars = qwen25.tokenizer.longest_token * window + 1  # at least window + 1 tokens
    with pytest.raises(ContextWindowExceeded, match="at least"):
        prepare(qwen25, {"prompt": "a" * chars}, limits=Limits(prompt_chars=10**9))


def test_limits_are_settable(qwen25):
    with pytest.raises(InvalidInput, match="at most 2"):
        qwen_ref.generate(qwen25, {"messages": ASK * 3}, limits=Limits(messages=2))
    assert qwen_ref.generate(qwen25, {"messages": ASK * 3, "max_tokens": 1}, limits=Limits(messages=3))


@pytest.mark.parametrize("body", [
    {"prompt": "\ud800"},
    {"messages": [{"role": "user", "content": "ok \udfff"}]},
    {"messages": ASK, "tools": [{"name": "f\ud800"}]},
    {"messages": ASK, "tools": [{"name": "f", "parameters": {"type": "object", "properties": {"\ud800": {}}}}]},
    {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"const": "\ud83d"}}},
])
def test_lone_surrogates_are_bad_input(qwen25, body):
    with pytest.raises(InvalidInput, match="surrogate"):
        prepare(qwen25, body)


DEEP_PATTERN = "(" * 500 + "a" + ")" * 500  # Python's regex parser recurses once per group


@pytest.mark.parametrize(("body", "path"), [
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"type": "string",
                                                                               "pattern": DEEP_PATTERN}}},
     "/response_format/json_schema"),
    ({"messages": ASK, "tools": [{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string", "pattern": DEEP_PATTERN}}}}]}, "/tools/0/parameters"),
])
def test_deeply_nested_patterns_are_bad_input(qwen25, body, path):
    with pytest.raises(InvalidInput, match="nests too deeply") as e:
        prepare(qwen25, body)
    assert e.value.path == path


def test_long_texts_are_tokenized_without_holding_the_gil(qwen25):
    # tokenizers' encode holds the GIL (a server's event loop and engine stop); encode_batch releases it
    text = "Hello world, this is a test of the tokenizer. " * 20_000
    ticks, stop = [0], threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    time.sleep(0.05)
    before, started = ticks[0], time.perf_counter()
    ids = qwen25.tokenizer.encode(text)
    elapsed, during = time.perf_counter() - started, ticks[0] - before
    stop.set()
    thread.join()
    assert ids == qwen25.tokenizer._tok.encode(text, add_special_tokens=False).ids
    assert during >= 0.2 * elapsed / 0.0011, (during, elapsed)  # held, the other thread ticks 0-2 times


# ----------------------------------------------------------------------------------------------------------
# The server: deadlines, connections, error bodies

@pytest.fixture(scope="module")
def hard_srv(tiny):
    srv = start_server(["--header-timeout", "1", "--body-timeout", "1", "--max-connections", "6",
                        "--max-messages", "8", "--name", f"tiny={tiny('qwen2.5')}"])
    yield srv
    stop_server(srv)


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the connection, or None if it is still open after `seconds`."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        return None
    return data


@pytest.mark.parametrize("sent", [b"", b"POST /ai/run/tiny HTTP/1.1\r\nHost: x\r\n"])
def test_idle_and_half_header_connections_are_closed(hard_srv, sent):
    with socket.create_connection(("127.0.0.1", hard_srv.port)) as sock:
        sock.sendall(sent)
        assert _closed_within(sock, 8) is not None


def test_a_body_that_stops_coming_gets_408(hard_srv):
    head = (f"POST /ai/run/tiny HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
    with socket.create_connection(("127.0.0.1", hard_srv.port)) as sock:
        sock.sendall(head.encode())
        answer = _closed_within(sock, 8)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer


def test_connections_over_the_limit_get_503_and_the_server_recovers(hard_srv):
    idle = [socket.create_connection(("127.0.0.1", hard_srv.port)) for _ in range(8)]
    try:
        r = requests.get(f"{hard_srv.base}/v1/models", headers=hard_srv.auth, timeout=10)
        assert r.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.5)
    assert requests.get(f"{hard_srv.base}/v1/models", headers=hard_srv.auth, timeout=10).status_code == 200


@pytest.mark.parametrize("raw", [
    b'{"prompt": "\\ud800"}',
    b'{"messages": [{"role": "user", "content": "\\udc00"}], "tools": [{"name": "\\ud800"}]}',
])
def test_surrogates_get_400_with_a_body_that_encodes(hard_srv, raw):
    r = requests.post(f"{hard_srv.base}/ai/run/tiny", headers=hard_srv.auth, data=raw, timeout=30)
    assert r.status_code == 400 and "surrogate" in r.json()["errors"][0]["message"]


def test_surrogate_in_a_model_name_encodes(hard_srv):
    r = requests.post(f"{hard_srv.base}/v1/chat/completions", headers=hard_srv.auth, timeout=30,
                      data=b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_flag_limits_reach_the_requests(hard_srv):
    body = {"messages": [{"role": "user", "content": "hi"}] * 9}
    r = requests.post(f"{hard_srv.base}/ai/run/tiny", headers=hard_srv.auth, json=body, timeout=30)
    assert r.status_code == 400 and "at most 8" in r.json()["errors"][0]["message"]


def test_a_non_ascii_token_can_match(tiny):
    from starlette.testclient import TestClient

    from qwen_ref.server.app import create_app, load_models
    from qwen_ref.server.settings import Settings

    app = create_app(load_models([str(tiny("qwen2.5"))]), Settings(api_token="clé-secrète"))
    with TestClient(app) as client:
        ok = client.get("/v1/models", headers={"Authorization": "Bearer clé-secrète".encode()})  # UTF-8 bytes
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer cle-secrete"})
    assert ok.status_code == 200 and wrong.status_code == 401
    assert json.loads(ok.text)["data"]


def _app_client(tiny, tmp_path, **load_options):
    from starlette.testclient import TestClient

    from qwen_ref.server.app import create_app, load_models

    return TestClient(create_app(load_models([str(tiny("qwen2.5"))], load_options=load_options)))


def test_errors_never_show_server_paths(tiny, tmp_path):
    adapters = tmp_path / "adapters"
    (adapters / "broken").mkdir(parents=True)
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    (adapters / "broken" / "adapter_model.safetensors").write_bytes(b"")
    with _app_client(tiny, tmp_path, lora_dir=str(adapters)) as client:
        r = client.post(f"/ai/run/{tiny('qwen2.5')}", json={"prompt": "hi", "lora": "broken"})
    message = r.json()["errors"][0]["message"]
    assert r.status_code == 400 and "not valid JSON" in message
    assert str(tmp_path) not in message and str(tiny("qwen2.5")) not in message


def test_json_mode_without_llguidance_is_the_servers_fault(tiny, tmp_path, monkeypatch):
    from qwen_ref.sampling import json_mask, json_schema

    def missing():
        raise json_schema.JsonModeUnavailable("JSON mode needs llguidance, which is not installed")

    monkeypatch.setattr(json_schema, "load_llguidance", missing)
    monkeypatch.setattr(json_mask, "load_llguidance", missing)
    with _app_client(tiny, tmp_path) as client:
        r = client.post(f"/ai/run/{tiny('qwen2.5')}", json={"prompt": "hi",
                                                              "response_format": {"type": "json_object"}})
    assert r.status_code == 501 and "llguidance" in r.json()["errors"][0]["message"]
    assert "Bad input" not in r.json()["errors"][0]["message"]


# ----------------------------------------------------------------------------------------------------------
# Chat templates: every render runs in the bounded worker process (workers_ai/template_worker.py)

HOSTILE_TEMPLATES = [
    ("nested-empty-loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ("repeat", "{{ 'x' * 2000000000 }}"),
    ("concat-doubling", "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(40) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
    ("join-repeated-list", "{{ (['x' * 10000000] * 15)|join }}"),
    ("replace-filter", "{{ ('a' * 1000000)|replace('a', 'a' * 1000) }}"),
    ("tojson-indent", "{{ messages|tojson(indent=300000000) }}"),
    ("star-width", "{{ '%*d' % (50000000, 1) }}"),
    ("precision", "{{ '%.50000000d' % 1 }}"),
    ("nested-power", "{{ ((2 ** 4096) ** 4096) ** 4096 }}"),
    ("indent-string-width", "{{ 'a\\nb'|indent('a' * 300000000) }}"),
    ("sum-of-lists", "{{ ([['x'] * 10000000] * 30)|sum(start=[])|length }}"),
    ("sort-huge-list", "{{ (['y', 'x'] * 7000000)|sort|first }}"),
]


@pytest.mark.parametrize("template", [t for _, t in HOSTILE_TEMPLATES], ids=[i for i, _ in HOSTILE_TEMPLATES])
def test_hostile_templates_fail_alone_in_bounded_time_and_memory(template, monkeypatch):
    import resource

    from qwen_ref.workers_ai import template_worker
    from qwen_ref.workers_ai.chat import ChatTemplateError

    monkeypatch.setattr(template_worker, "KILL_AFTER_S", 8.0)
    before, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(ChatTemplateError):
        template_worker.render(template, ASK)
    assert time.monotonic() - started < 15
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: this process's peak
    assert template_worker.render("{{ messages[0].content }}", ASK) == "hi"  # the worker serves the next one


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ 'hello world'|wordwrap(5) }}", "hello\nworld"),
    ("{{ '{}'.format(1700000000) }}", "1700000000"),
    ("{{ '%d'|format(1700000000) }}", "1700000000"),
    ("{{ '%s=%05.1f' % ('x', 2.5) }}", "x=002.5"),
    ("{{ '{:>5}|{:{}}'.format('a', 'b', 3) }}", "    a|b  "),
    ("{{ 'a\nb'|indent(2) }}", "a\n  b"),
    ("{{ 'x'|center(5) }}", "  x  "),
    ("{{ messages|tojson(indent=2)|length > 0 }}", "True"),
])
def test_ordinary_template_operations_are_unchanged(template, expected):
    from qwen_ref.workers_ai import template_worker
    from qwen_ref.workers_ai.chat import render_chat

    assert template_worker.render(template, ASK) == render_chat(template, ASK) == expected


def test_pipelined_requests_are_not_cut_by_the_header_deadline():
    from qwen_ref.server.deadlines import protocol_with_deadline

    class Cycle:
        response_complete = False

    class Transport:
        closed = False

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

    protocol = object.__new__(protocol_with_deadline(1.0))
    protocol.transport, protocol.cycle = Transport(), Cycle()
    protocol._late(protocol.cycle)  # the timer saw this request start (pipelined): it is in flight
    assert not protocol.transport.closed
    protocol.cycle.response_complete = True
    protocol._late(protocol.cycle)  # answered, and no new request's headers since: closed
    assert protocol.transport.closed


def test_every_string_in_the_messages_counts_toward_the_limit(qwen25):
    call = {"name": "f", "arguments": {"x": "a" * 2_000_000}}
    body = {"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}, *ASK]}
    with pytest.raises(InvalidInput, match="characters of text"):
        prepare(qwen25, body)
