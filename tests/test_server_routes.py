"""The local Workers AI server end to end, native routes: the seeds' own examples with only the host
changed, the short route, JSON mode and the logprobs extension, each the same as generate()."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
requests = pytest.importorskip("requests")
sseclient = pytest.importorskip("sseclient")

from server_helpers import (  # noqa: E402
    QWEN15,
    SYSTEM,
    TOKEN,
    one_thread_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
    qwen25_fixture,  # noqa: F401 (a fixture)
    srv_fixture,  # noqa: F401 (a fixture)
)

from qwen_ref.errors import JsonModeNotMet  # noqa: E402
from qwen_ref.workers_ai.generate import generate  # noqa: E402
from qwen_ref.workers_ai.request import prepare  # noqa: E402
from qwen_ref.workers_ai.validate import validate_output  # noqa: E402


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


def test_the_logprobs_extension_through_the_server(srv, qwen25):
    body = {"prompt": "Hello", "max_tokens": 5, "seed": 3, "logprobs": 2}
    r = httpx.post(srv.run_url("tiny"), headers=srv.auth, json=body, timeout=60)
    assert r.status_code == 200 and r.json()["result"] == generate(qwen25, body)

