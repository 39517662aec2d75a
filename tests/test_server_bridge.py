"""The server's parts in-process, with no HTTP: the bridge to the engine (results the same as generate(),
deadlines), model aliases, and the CLI's defaults for `serve`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from server_helpers import (
    QWEN15,
    one_thread_fixture,  # noqa: F401 (a fixture)
    qwen15_fixture,  # noqa: F401 (a fixture)
)

import qwen_ref
from qwen_ref.engine import Engine
from qwen_ref.errors import QwenRefError
from qwen_ref.server.app import load_models, parse_alias
from qwen_ref.server.bridge import Served, collect, start
from qwen_ref.server.settings import Settings
from qwen_ref.workers_ai.generate import generate

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


def test_aliases_take_the_workers_ai_model(tmp_path, tiny):
    with pytest.raises(qwen_ref.QwenRefError, match="NAME=SOURCE"):
        parse_alias("no-equals-sign")
    served = load_models([str(tiny("qwen1.5"))], [f"{QWEN15}={tiny('qwen1.5')}"])
    assert set(served) == {str(tiny("qwen1.5")), QWEN15}
    assert served[QWEN15].engine is served[str(tiny("qwen1.5"))].engine  # one checkpoint, one engine
    assert served[QWEN15].qwen.known.context_window == 32000
    assert served[str(tiny("qwen1.5"))].qwen.known is None


def test_binds_loopback_by_default():
    from qwen_ref.cli import build_parser

    args = build_parser().parse_args(["serve", "tiny"])
    assert (args.host, args.batching, args.api_token) == ("127.0.0.1", "exact", None)


def test_reject_if_busy_answers_429_while_requests_wait(qwen15):
    from qwen_ref.errors import OutOfCapacity

    served = Served("m", qwen15, Engine(qwen15.model))  # not started: what is added stays queued
    busy = {"prompt": "x", "max_tokens": 2, "options": {"rejectIfBusy": True}}

    async def attempt():
        return await start(served, busy, Settings())

    ticket = asyncio.run(attempt())  # an empty queue: accepted (the option is the service's, not a schema key)
    assert ticket.response.prepared.ignored == ["/options"]
    with pytest.raises(OutOfCapacity) as e:
        asyncio.run(attempt())  # the first one still waits
    assert (e.value.status, e.value.code) == (429, 3040)
