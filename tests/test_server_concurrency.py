"""The local server under concurrent clients: continuous batching, clients that hang up, memory; every
client gets the text it would get alone."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
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
    srv_fixture,  # noqa: F401 (a fixture)
)

from qwen_ref.workers_ai.generate import generate  # noqa: E402


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


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

    # warm-up: the same 16 at once, so the allocator holds what this load needs; a leak shows as growth after it
    _run_clients(srv.base, [{**b, "seed": b["seed"] + 1000} for b in bodies], [None] * 16)
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

