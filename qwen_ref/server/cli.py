"""`qwen-ref serve`: the server's own flags (the model-loading flags are the CLI's shared ones), and the run."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch

from qwen_ref.engine import DEFAULT_PREFILL_CHUNK, DEFAULT_PREFILL_RATIO
from qwen_ref.errors import QwenRefError
from qwen_ref.scripted import load_script
from qwen_ref.server.settings import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_PORT,
    DEFAULT_TIMEOUT_S,
    TOKEN_ENV,
    Settings,
)
from qwen_ref.workers_ai.limits import Limits


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SOURCE",
                        help="a model to serve, as qwen_ref.load takes it ('tiny', 'tiny:PRESET', a directory, a "
                             "hub repo id or a Workers AI id); served under its Workers AI id or this text")
    parser.add_argument("--name", action="append", default=[], metavar="NAME=SOURCE",
                        help="also serve SOURCE under NAME (repeatable); a Workers AI id as NAME gives the model "
                             "that id's context window and LoRA support, e.g. @cf/qwen/qwen1.5-0.5b-chat=tiny:qwen1.5")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--api-token", default=None,
                        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; none: no auth)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is often fastest for small models)")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"requests decoded together per model (default {DEFAULT_MAX_BATCH})")
    parser.add_argument("--batching", choices=["exact", "fast"], default="exact",
                        help="exact (default): each request's forward pass runs on its own, so it gets the tokens "
                             "generate() gives it alone; fast: one forward for all, faster, rounding may differ")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"waiting requests per model before 429 (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds a request may take, queueing included (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
                        help=f"largest request body accepted (default {DEFAULT_MAX_BODY})")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="prompt tokens per prefill forward; smaller: running requests wait less while a long "
                             f"prompt is prefilled; larger (256): faster prefill (default {DEFAULT_PREFILL_CHUNK})")
    parser.add_argument("--prefill-ratio", type=float, default=DEFAULT_PREFILL_RATIO,
                        help="while requests decode, each engine step spends at most this times the decode step's "
                             f"time on prefill, a decoder layer at a time (default {DEFAULT_PREFILL_RATIO})")
    parser.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                        help="KV cache budget per model in GiB: requests that could need more wait, or are refused "
                             "when they never fit (default: half the memory available at start)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open connections and requests at once; more get 503 (default "
                             f"{DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S, metavar="S",
                        help="a connection that sends no complete request headers within S seconds of opening (or "
                             f"of its last answer) is closed (default {DEFAULT_HEADER_TIMEOUT_S:g})")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S, metavar="S",
                        help=f"the request body must arrive within S seconds, or 408 (default "
                             f"{DEFAULT_BODY_TIMEOUT_S:g})")
    limits = Limits()
    parser.add_argument("--max-prompt-chars", type=int, default=limits.prompt_chars,
                        help=f"characters of prompt or message text per request (default {limits.prompt_chars})")
    parser.add_argument("--max-messages", type=int, default=limits.messages,
                        help=f"messages per request (default {limits.messages})")
    parser.add_argument("--max-tools", type=int, default=limits.tools,
                        help=f"tools per request (default {limits.tools})")
    parser.add_argument("--max-schema-chars", type=int, default=limits.schema_chars,
                        help="characters of response_format, and of the tools, as JSON (default "
                             f"{limits.schema_chars})")
    parser.add_argument("--strict", action="store_true",
                        help="refuse request keys the Workers AI schema does not know, naming them (default: ignore "
                             "them, as the service does, and list them in the X-Qwen-Ref-Ignored-Keys header)")
    parser.add_argument("--script", default=None, metavar="FILE",
                        help="for testing clients: the models write chosen replies, from a JSON list of "
                             "{\"when\": TEXT, \"reply\": TEXT} rules matched on the prompt (qwen_ref/scripted.py)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])


def _check_numbers(args: argparse.Namespace) -> None:
    for flag in ("max_batch", "max_queue", "max_body_bytes", "timeout", "threads", "prefill_chunk", "prefill_ratio",
                 "kv_memory", "max_connections", "header_timeout", "body_timeout", "max_prompt_chars",
                 "max_messages", "max_tools", "max_schema_chars"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise QwenRefError(f"--{flag.replace('_', '-')} must be > 0")


def run_server(args: argparse.Namespace, load_options: Mapping[str, Any]) -> int:
    """Load the models and serve until interrupted (the `qwen-ref serve` command)."""
    try:
        # the serve extra's one boundary: starlette and uvicorn are imported when the server runs
        import uvicorn

        from qwen_ref.server.app import create_app, load_models
        from qwen_ref.server.deadlines import protocol_with_deadline
    except ImportError as e:
        raise QwenRefError(f"serve needs the serve extra: pip install 'qwen-ref[serve]' ({e})") from None
    _check_numbers(args)
    token = args.api_token or os.environ.get(TOKEN_ENV) or None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    kv_memory = None if args.kv_memory is None else int(args.kv_memory * 2**30)
    script = None if args.script is None else load_script(args.script)
    served = load_models(args.sources, args.name, load_options, script, exact=args.batching == "exact",
                         max_running=args.max_batch, prefill_chunk=args.prefill_chunk,
                         prefill_ratio=args.prefill_ratio, kv_memory=kv_memory)
    limits = Limits(args.max_prompt_chars, args.max_messages, args.max_tools, args.max_schema_chars)
    app = create_app(served, Settings(token, args.max_body_bytes, args.timeout, args.max_queue, args.strict, limits,
                                      args.body_timeout))
    base = f"http://{args.host}:{args.port}"
    for name in served:
        print(f"qwen-ref serve: {name} at {base}/client/v4/accounts/ACCOUNT_ID/ai/run/{name}", file=sys.stderr)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"qwen-ref serve: warning: {args.host} is reachable from other machines and no token is set",
              file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, limit_concurrency=args.max_connections,
                http=protocol_with_deadline(args.header_timeout))
    return 0
