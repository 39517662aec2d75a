"""A local Workers-AI-compatible HTTP server, with OpenAI-compatible chat completions (docs/server.md).

    qwen-ref serve tiny --name @cf/qwen/qwen1.5-0.5b-chat=tiny:qwen1.5 --api-token secret

Each loaded checkpoint has one engine (qwen_ref.engine.Engine) on a thread of its own: continuous batching with
chunked prefill, every request isolated from the others. The server only feeds requests in and events out
(server/bridge.py); the Workers AI output is shaped by the same code generate() uses (workers_ai/output.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qwen_ref.disk_cache import cache_root
from qwen_ref.engine import Engine
from qwen_ref.errors import EngineError, MethodNotAllowed, NoRoute, QwenRefError
from qwen_ref.qwen import Qwen, load
from qwen_ref.scripted import Rule, scripted
from qwen_ref.server.bridge import Served, as_named, lookup
from qwen_ref.server.completions import completions
from qwen_ref.server.http import check_auth, error_response, hide_paths
from qwen_ref.server.native import run_model
from qwen_ref.server.openai import chat_completions
from qwen_ref.server.settings import Settings


def parse_alias(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise QwenRefError(f"--name: {text!r}: expected NAME=SOURCE, e.g. @cf/qwen/qwen1.5-0.5b-chat=tiny:qwen1.5")
    return name, source


def load_models(sources: Sequence[str] = (), aliases: Sequence[str] = (),
                load_options: Mapping[str, Any] | None = None, script: Sequence[Rule] | None = None,
                **engine_options: Any) -> dict[str, Served]:
    """Load each source once; serve it under its Workers AI id (when loaded by one) or its source text, and
    under every NAME of a NAME=SOURCE alias. Names of one checkpoint share its engine. engine_options go to
    qwen_ref.engine.Engine (exact, prefill_chunk, max_running, kv_memory). script: the models write these
    rules' replies (qwen_ref.scripted, for testing clients)."""
    wanted = [(None, s) for s in sources] + [parse_alias(a) for a in aliases]
    if not wanted:
        raise QwenRefError("serve: give at least one SOURCE or --name NAME=SOURCE")
    if (load_options or {}).get("tp", 1) != 1 and len({source for _, source in wanted}) > 1:
        raise QwenRefError("serve: --tp serves one checkpoint per server (one process group per process); "
                           "start a server for each")
    loaded: dict[str, tuple[Qwen, Engine]] = {}
    served: dict[str, Served] = {}
    for name, source in wanted:
        if source not in loaded:
            qwen = load(source, **(load_options or {}))
            if script is not None:
                qwen = scripted(qwen, list(script))
            loaded[source] = (qwen, Engine(qwen.model, **engine_options))
        qwen, engine = loaded[source]
        name = name or (qwen.known.workers_ai_id if qwen.known is not None else source)
        if name in served:
            raise QwenRefError(f"serve: the model name {name!r} is given twice")
        served[name] = Served(name, as_named(qwen, name), engine)
    return served


def model_card(name: str) -> dict[str, Any]:
    """A served model in OpenAI's model object shape."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "qwen-ref"}


def create_app(served: Mapping[str, Served], settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    served = dict(served)
    for s in served.values():
        hide_paths(s.qwen.path, getattr(s.qwen.adapters, "directory", None))
    hide_paths(cache_root(), Path.cwd())
    engines = list({id(s.engine): s.engine for s in served.values()}.values())

    async def native(request: Request) -> Response:
        return await run_model(request, served, settings)

    async def chat(request: Request) -> Response:
        return await chat_completions(request, served, settings)

    async def complete(request: Request) -> Response:
        return await completions(request, served, settings)

    async def list_models(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
        except QwenRefError as e:
            return error_response(request.url.path, e)
        return JSONResponse({"object": "list", "data": [model_card(name) for name in served]})

    async def get_model(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
            return JSONResponse(model_card(lookup(served, request.path_params["model"]).name))
        except QwenRefError as e:
            return error_response(request.url.path, e)

    async def stats(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
        except QwenRefError as e:
            return error_response(request.url.path, e)
        return JSONResponse({"models": {name: s.engine.stats() for name, s in served.items()}})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        error = {404: NoRoute("No route for that URI"), 405: MethodNotAllowed("Method not allowed")}.get(
            status, EngineError("Internal server error"))
        return error_response(request.url.path, error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for engine in engines:
            engine.start()
        yield
        for engine in engines:
            engine.close()

    run = "/ai/run/{model:path}"
    chat_path = "/ai/v1/chat/completions"
    routes = [
        Route("/client/v4/accounts/{account_id}" + run, native, methods=["POST"]),
        Route(run, native, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}" + chat_path, chat, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}/ai/v1/completions", complete, methods=["POST"]),
        Route("/v1/completions", complete, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}/ai/v1/models", list_models, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/client/v4/accounts/{account_id}/ai/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/qwen-ref/stats", stats, methods=["GET"]),
    ]
    handlers = {404: http_error, 405: http_error, Exception: http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]
