"""The Workers AI route: POST .../ai/run/{model}, the service's envelope, or its Server-Sent Events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from qwen_ref.errors import QwenRefError
from qwen_ref.server.bridge import Served, Ticket, collect, lookup, start, unless_disconnected
from qwen_ref.server.http import check_auth, envelope, error_response, message_of, read_json
from qwen_ref.server.settings import Settings
from qwen_ref.workers_ai.output import DONE, sse

IGNORED_HEADER = "X-Qwen-Ref-Ignored-Keys"  # the unknown request keys the server left out, as JSON pointers


def ignored_keys(ticket: Ticket) -> dict[str, str]:
    ignored = ticket.response.prepared.ignored
    return {IGNORED_HEADER: ", ".join(ignored)} if ignored else {}


def event_stream(events: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> Response:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **(headers or {})})


async def run_model(request: Request, served: dict[str, Served], settings: Settings) -> Response:
    try:
        check_auth(request, settings.api_token)
        model = lookup(served, request.path_params["model"])
        body = await read_json(request, settings)
    except QwenRefError as e:
        return error_response(request.url.path, e)
    try:
        ticket = await start(model, body, settings)
    except QwenRefError as e:
        return error_response(request.url.path, e, reached_model=True)
    if ticket.response.prepared.stream:
        return event_stream(native_events(ticket), ignored_keys(ticket))
    try:
        response = await unless_disconnected(request, ticket, collect(ticket))
        return JSONResponse(envelope(response.result()), headers=ignored_keys(ticket))
    except QwenRefError as e:
        return error_response(request.url.path, e, reached_model=True)


async def native_events(ticket: Ticket) -> AsyncIterator[bytes]:
    """generate()'s stream, event for event: the same Response shapes both."""
    try:
        async for _, event in ticket.events():
            for chunk in ticket.response.stream_events(event):
                yield chunk
    except Exception as e:  # shaping failed (a bug): the stream still ends as the service's do
        yield sse(ticket.response.final_event(message_of(e)))
        yield DONE
    finally:
        ticket.cancel()
