"""OpenAI's chat completions (POST /v1/chat/completions): the request mapped to the Workers AI request, the
answer shaped as chat.completion or chat.completion.chunk events, from the same engine events as the native route.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwen_ref.engine import Failed
from qwen_ref.errors import QwenRefError
from qwen_ref.sampling import SAMPLING_FIELDS, TokenLogprobs, sample_seed
from qwen_ref.server.bridge import Served, Ticket, collect, lookup, start, unless_disconnected
from qwen_ref.server.http import bad_input, check_auth, error_response, openai_error_body, read_json
from qwen_ref.server.native import event_stream
from qwen_ref.server.settings import Settings
from qwen_ref.workers_ai.output import DONE, sse
from qwen_ref.workers_ai.output import Response as Output
from qwen_ref.workers_ai.request import MAX_SAMPLES

# OpenAI request keys that change nothing here, and keys whose non-default values the engine cannot honour
CHAT_IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "options")
CHAT_SAMPLING = tuple(f for f in SAMPLING_FIELDS if f != "max_tokens")
CHAT_UNSUPPORTED = {"logit_bias": (None, {}), "functions": (None,), "function_call": (None,),
                    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}
CHAT_KEYS = frozenset(("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "tools",
                       "tool_choice", "response_format", "stop", "logprobs", "top_logprobs", "n", *CHAT_SAMPLING,
                       *CHAT_IGNORED, *CHAT_UNSUPPORTED))
MAX_STOP = 4  # OpenAI's limit on stop strings


@dataclass
class Chat:
    model: str
    body: dict[str, Any]  # the Workers AI request it maps to
    stream: bool
    include_usage: bool
    stop: tuple[str, ...] = ()
    n: int = 1
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def _text_content(content: Any, path: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_input(path, "expected a string or a list of {type: 'text', text} parts")


def chat_message(message: Any, path: str) -> dict[str, Any]:
    """An OpenAI message as a Workers AI message: text parts joined, `developer` as `system`, an assistant's
    tool calls and a tool message's call id and name kept for the chat template (request validation checks
    their shapes)."""
    if not isinstance(message, dict):
        raise bad_input(path, "expected a message object {role, content}")
    role = "system" if message.get("role") == "developer" else message.get("role")
    out: dict[str, Any] = {"role": role, "content": _text_content(message.get("content"), f"{path}/content")}
    out.update((k, message[k]) for k in ("tool_calls", "tool_call_id", "name") if message.get(k) is not None)
    return out


def chat_tool(tool: Any) -> Any:
    """An OpenAI tool with the keys the Workers AI schema requires filled in when absent."""
    if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
        return tool  # validation names the problem
    function = {"description": "", "parameters": {"type": "object", "properties": {}}, **tool["function"]}
    function.pop("strict", None)
    return {"type": tool.get("type", "function"), "function": function}


def _check_chat_keys(chat: dict[str, Any]) -> None:
    for key, value in chat.items():
        if key in CHAT_UNSUPPORTED and value not in CHAT_UNSUPPORTED[key]:
            raise bad_input(f"/{key}", f"{value!r} is not supported by this server")
        if key not in CHAT_KEYS:
            raise bad_input(f"/{key}", "unrecognized request argument")


def _tools(chat: dict[str, Any]) -> list[Any] | None:
    tools = chat.get("tools")
    if not tools:
        return None
    if not isinstance(tools, list):
        raise bad_input("/tools", "expected an array")
    return [chat_tool(t) for t in tools]


def chat_request(chat: Any) -> Chat:
    """An OpenAI chat.completions request as the Workers AI request generate() runs."""
    if not isinstance(chat, dict):
        raise bad_input("/", "expected a JSON object (a chat completion request)")
    _check_chat_keys(chat)
    if not isinstance(chat.get("model"), str):
        raise bad_input("/model", "required: the name of a served model")
    messages = chat.get("messages")
    if not isinstance(messages, list):
        raise bad_input("/messages", "required: an array of messages")
    body: dict[str, Any] = {"messages": [chat_message(m, f"/messages/{i}") for i, m in enumerate(messages)]}
    max_tokens = chat.get("max_completion_tokens")
    if max_tokens is None:  # OpenAI's newer name wins; a null one leaves max_tokens in charge
        max_tokens = chat.get("max_tokens")
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(sampling_fields(chat))
    tools = _tools(chat)
    if tools:
        body["tools"] = tools
    if chat.get("tool_choice") is not None:
        body["tool_choice"] = chat["tool_choice"]  # validated with the rest; "required" and named are enforced
    response_format = chat.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        body["response_format"] = response_format
    logprobs, top = chat.get("logprobs"), chat.get("top_logprobs")
    if logprobs not in (None, True, False) or (top is not None and (not logprobs or isinstance(top, bool))):
        raise bad_input("/logprobs", "logprobs must be a boolean, and top_logprobs needs logprobs: true")
    if logprobs:
        body["logprobs"] = 0 if top is None else top  # the qwen-ref extension field, validated (0..20) with the rest
    stream = chat.get("stream") or False
    options = chat.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad_input("/stream", "stream must be a boolean and stream_options an object")
    return Chat(chat["model"], body, stream, bool(options.get("include_usage")), stop_strings(chat.get("stop")),
                samples_n(chat))


def sampling_fields(request: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields an OpenAI request sets, as Workers AI fields (validated with the rest)."""
    out = {k: request[k] for k in CHAT_SAMPLING if request.get(k) is not None}
    if isinstance(out.get("seed"), int) and not isinstance(out["seed"], bool):
        out["seed"] = sample_seed(out["seed"], 0)  # OpenAI takes any integer: mapped into 1..SEED_MAX
    return out


def samples_n(request: dict[str, Any], most: int = MAX_SAMPLES) -> int:
    n = request.get("n")
    n = 1 if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise bad_input("/n", f"expected an integer from 1 to {most}, got {n!r:.40}")
    return n


def stop_strings(stop: Any) -> tuple[str, ...]:
    """OpenAI's stop: a string or up to 4 strings, matched on the decoded text; the match is not returned."""
    if stop is None or stop == "":
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops) or len(stops) > MAX_STOP:
        raise bad_input("/stop", f"expected a string or a list of at most {MAX_STOP} strings, got {stop!r:.80}")
    return tuple(x for x in stops if x)


def openai_tool_calls(calls: Iterable[dict[str, Any]], with_index: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        item = {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        out.append({"index": i, **item} if with_index else item)
    return out


def chat_content(output: Output, result: dict[str, Any]) -> str:
    if output.prepared.json_mode or not isinstance(result["response"], str):
        return output.text  # JSON mode: the JSON text as generated
    return result["response"]


def chat_choice(index: int, output: Output) -> tuple[dict[str, Any], dict[str, int]]:
    """One choice of a chat.completion, and its usage."""
    result = output.result()
    content = chat_content(output, result)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    calls = result.get("tool_calls") or []
    if calls:
        message["content"] = content or None
        message["tool_calls"] = openai_tool_calls(calls)
    return ({"index": index, "message": message, "logprobs": openai_logprobs(output, output.infos),
             "finish_reason": output.finish_reason}, result["usage"])


def total_usage(usages: list[dict[str, int]]) -> dict[str, int]:
    """n samples share one prompt: its tokens count once, the completions add up."""
    prompt, completion = usages[0]["prompt_tokens"], sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_completion(chat: Chat, outputs: list[Output]) -> dict[str, Any]:
    choices, usages = zip(*(chat_choice(i, output) for i, output in enumerate(outputs)))
    return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": chat.model,
            "choices": list(choices), "usage": total_usage(list(usages))}


def openai_logprobs(output: Output, infos: list[TokenLogprobs]) -> dict[str, Any] | None:
    """OpenAI's logprobs object: each generated token's log-probability under the model's distribution (the raw
    one, as OpenAI reports it) with its top alternatives; None when logprobs were not asked for."""
    if output.prepared.logprobs is None:
        return None
    tok = output.tokenizer

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": tok.decode([token]), "logprob": logprob, "bytes": list(tok.token_bytes(token))}

    return {"content": [{**entry(i.token, i.raw), "top_logprobs": [entry(t, lp) for t, lp in i.raw_top]}
                        for i in infos]}


def chunk(chat: Chat, delta: dict[str, Any], finish: str | None = None,
          logprobs: dict[str, Any] | None = None, index: int = 0) -> bytes:
    obj: dict[str, Any] = {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                           "model": chat.model, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                             "finish_reason": finish}]}
    if chat.include_usage:
        obj["usage"] = None
    return sse(obj)


async def chat_events(chat: Chat, ticket: Ticket) -> AsyncIterator[bytes]:
    """chat.completion.chunk events: text deltas as the text is decoded (with tools offered, tool-call markup is
    held back, as on the native route), then each choice's tool calls as tool_calls deltas and its finish, as
    OpenAI streams them; with n > 1 the choices' chunks interleave, each with its index."""
    for i in range(len(ticket.responses)):
        yield chunk(chat, {"role": "assistant", "content": ""}, index=i)
    try:
        async for i, event in ticket.events():
            output = ticket.responses[i]
            text = output.shown(event)
            if isinstance(event, Failed):
                raise event.error
            if text:
                yield chunk(chat, {"content": text}, logprobs=openai_logprobs(output, output.take_pending()), index=i)
            if output.done:
                result = output.result()
                if result.get("tool_calls"):
                    yield chunk(chat, {"tool_calls": openai_tool_calls(result["tool_calls"], with_index=True)},
                                index=i)
                yield chunk(chat, {}, output.finish_reason, index=i)
        if chat.include_usage:
            usage = total_usage([r.usage() for r in ticket.responses])
            yield sse({"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                       "model": chat.model, "choices": [], "usage": usage})
    except QwenRefError as e:
        yield sse(openai_error_body(e))
    finally:
        ticket.cancel()
    yield DONE


async def chat_completions(request: Request, served: dict[str, Served], settings: Settings) -> Response:
    try:
        check_auth(request, settings.api_token)
        chat = chat_request(await read_json(request, settings))
        ticket = await start(lookup(served, chat.model), chat.body, settings, chat.stop, chat.n)
    except QwenRefError as e:
        return error_response(request.url.path, e)
    if chat.stream:
        return event_stream(chat_events(chat, ticket))
    try:
        await unless_disconnected(request, ticket, collect(ticket))
        return JSONResponse(chat_completion(chat, ticket.responses))
    except QwenRefError as e:
        return error_response(request.url.path, e)
