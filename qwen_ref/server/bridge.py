"""Requests in, events out: between the event loop and the engine's thread.

submit() hands a prepared request to the model's engine; its events come back through an asyncio queue. A
client that goes away, a dropped stream or a deadline cancels the request: its row leaves the batch at the next
step, LoRA or not. The server never touches the model, a cache or a tensor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from qwen_ref import known_models
from qwen_ref.engine import Engine, Event, Failed
from qwen_ref.errors import ClientClosed, NoSuchModel, OutOfCapacity, RequestTimeout
from qwen_ref.qwen import Qwen
from qwen_ref.server.settings import Settings
from qwen_ref.workers_ai.output import Response
from qwen_ref.workers_ai.request import Prepared, samples

log = logging.getLogger("qwen_ref.server")
DEADLINE_GRACE_S = 5.0  # the engine enforces the deadline; the event loop waits this much longer as a net


@dataclass
class Served:
    name: str
    qwen: Qwen  # as served under `name` (a Workers AI id brings its context window and LoRA support)
    engine: Engine


def as_named(qwen: Qwen, name: str) -> Qwen:
    known = known_models.lookup(name)
    return qwen if known is None or qwen.known == known else replace(qwen, known=known)


def lookup(served: dict[str, Served], name: Any) -> Served:
    if not isinstance(name, str) or name not in served:
        raise NoSuchModel(f"No such model {name} or task")
    return served[name]


class Ticket:
    """The event loop's side of one request, or of n samples of one request (they share its prefill): their
    engine events in order, as (sample index, event), and cancel()."""

    def __init__(self, served: Served, prepared: Sequence[Prepared], settings: Settings,
                 stop: tuple[str, ...] = ()):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink(index: int) -> Callable[[Event], None]:
            def put(event: Event) -> None:
                with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            return put

        if served.engine.stats()["queued"] >= settings.max_queue:
            raise OutOfCapacity("Capacity temporarily exceeded, please try again")
        self.deadline = time.monotonic() + settings.timeout_s
        self.responses = [Response(served.qwen.tokenizer, p, stop) for p in prepared]
        requests = [(p.engine_request(served.qwen, self.deadline), sink(i)) for i, p in enumerate(prepared)]
        first = served.engine.add(*requests[0], requests[1:])
        self.handles = [first, *first.followers]
        for response, handle in zip(self.responses, self.handles):
            response.cancel = handle.cancel  # a stop string ends that sample in the engine

    @property
    def response(self) -> Response:
        return self.responses[0]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(sample index, engine event) until every sample has finished (or failed)."""
        while not all(r.done for r in self.responses):
            left = self.deadline - time.monotonic() + DEADLINE_GRACE_S
            try:
                index, event = await asyncio.wait_for(self.queue.get(), max(left, 0.05))
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                self.cancel()
                for i, r in enumerate(self.responses):
                    if not r.done:
                        yield i, Failed(RequestTimeout("Timeout: the request ran past the server's per-request "
                                                       "timeout"))
                return
            if not self.responses[index].done:  # after a stop string, the engine may still send a token
                yield index, event


async def start(served: Served, body: Any, settings: Settings, stop: tuple[str, ...] = (), n: int = 1) -> Ticket:
    """Validate, template and tokenize off the event loop, then queue the request (n samples: seed + i)."""
    options = body.get("options") if isinstance(body, dict) else None
    if isinstance(options, dict) and options.get("rejectIfBusy") is True and served.engine.stats()["queued"]:
        raise OutOfCapacity("Capacity temporarily exceeded, please try again")  # the service's rejectIfBusy
    return await start_prepared(served, lambda: samples(served.qwen, body, n, strict=settings.strict,
                                                        limits=settings.limits), settings, stop)


async def start_prepared(served: Served, make: Callable[[], list[Prepared]], settings: Settings,
                         stop: tuple[str, ...] = ()) -> Ticket:
    """Queue the requests make() prepares (n samples of one prompt), preparing them off the event loop."""
    prepared = await run_in_threadpool(make)
    if prepared[0].ignored:
        log.info("ignored unknown request keys: %s", ", ".join(prepared[0].ignored))
    return Ticket(served, prepared, settings, stop)


async def collect(ticket: Ticket) -> Response:
    """Every event of a non-stream request (all its samples); the first sample's Response."""
    async for index, event in ticket.events():
        ticket.responses[index].push(event)
    return ticket.response


async def unless_disconnected(request: Request, ticket: Ticket, work: Awaitable[Any]) -> Any:
    """Await work; if the client hangs up first, cancel the request (its row frees at the next step)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientClosed("the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            ticket.cancel()

