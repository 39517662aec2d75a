"""OpenAI's completions (POST /v1/completions): a raw prompt in, text out, with `echo` and `logprobs` over the
prompt's own tokens too. lm-evaluation-harness's `local-completions` model scores with it (echo, logprobs: 1,
max_tokens: 1, temperature 0) and generates with it (stop, max_tokens).

Each prompt (text, token ids, or a list of either) is one request on the engine, sampled n times; choice
p * n + j is prompt p's sample j. The prompt is read as given: no chat template (Workers AI's `raw: true`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from qwen_ref.engine import Failed, Prompt
from qwen_ref.errors import QwenRefError
from qwen_ref.sampling import ForcedLogprobs, TokenLogprobs
from qwen_ref.server.bridge import Served, Ticket, collect, lookup, start_prepared, unless_disconnected
from qwen_ref.server.http import bad_input, check_auth, error_response, openai_error_body, read_json
from qwen_ref.server.native import event_stream
from qwen_ref.server.openai import samples_n, sampling_fields, stop_strings, total_usage
from qwen_ref.server.settings import Settings
from qwen_ref.workers_ai.limits import Limits
from qwen_ref.workers_ai.output import DONE, sse
from qwen_ref.workers_ai.output import Response as Output
from qwen_ref.workers_ai.request import MAX_SAMPLES, Prepared, samples

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_LOGPROBS = 20
IGNORED = ("user", "suffix", "best_of", "logit_bias")  # accepted when they ask for nothing: checked below
KEYS = frozenset(("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "frequency_penalty",
                  "presence_penalty", "repetition_penalty", "seed", "stop", "n", "logprobs", "echo", "stream",
                  "stream_options", *IGNORED))

PromptInput = str | list[int]


@dataclass
class Completion:
    model: str
    prompts: list[PromptInput]
    body: dict[str, Any]  # the Workers AI fields every prompt's request shares
    max_tokens: int
    echo: bool
    logprobs: int | None
    n: int
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]
    id: str = field(default_factory=lambda: "cmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in value)


def _prompts(prompt: Any) -> list[PromptInput]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of token-id lists."""
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_input("/prompt", "required: a string, a list of strings, a list of token ids or a list of token-id "
                                   "lists (none empty)")
    if len(prompts) > MAX_SAMPLES:
        raise bad_input("/prompt", f"at most {MAX_SAMPLES} prompts per request, got {len(prompts)}")
    return prompts


def _check_unused(request: dict[str, Any]) -> None:
    for key in request:
        if key not in KEYS:
            raise bad_input(f"/{key}", "unrecognized request argument")
    if request.get("suffix") not in (None, ""):
        raise bad_input("/suffix", "is not supported by this server (the Qwen models have no insertion mode)")
    if request.get("logit_bias") not in (None, {}):
        raise bad_input("/logit_bias", "is not supported by this server")
    if request.get("best_of") not in (None, request.get("n") or 1):
        raise bad_input("/best_of", "is not supported by this server, except equal to n")


def completion_request(request: Any) -> Completion:
    if not isinstance(request, dict):
        raise bad_input("/", "expected a JSON object (a completion request)")
    _check_unused(request)
    if not isinstance(request.get("model"), str):
        raise bad_input("/model", "required: the name of a served model")
    prompts = _prompts(request.get("prompt"))
    max_tokens = request.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise bad_input("/max_tokens", f"expected an integer >= 0 (0: only the prompt, with echo), got "
                                       f"{max_tokens!r:.40}")
    logprobs = request.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int)
                                 or not 0 <= logprobs <= MAX_LOGPROBS):
        raise bad_input("/logprobs", f"expected an integer from 0 to {MAX_LOGPROBS}, got {logprobs!r:.40}")
    echo, stream = request.get("echo") or False, request.get("stream") or False
    options = request.get("stream_options") or {}
    if not isinstance(echo, bool) or not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad_input("/echo", "echo and stream must be booleans, stream_options an object")
    n = samples_n(request, MAX_SAMPLES // len(prompts))
    body = {"raw": True, **sampling_fields(request)}
    if logprobs is not None:
        body["logprobs"] = logprobs
    return Completion(request["model"], prompts, body, max_tokens, echo, logprobs, n, stream,
                      bool(options.get("include_usage")), stop_strings(request.get("stop")))


def _prepare(served: Served, c: Completion, prompt: PromptInput, strict: bool, limits: Limits) -> list[Prepared]:
    """n samples of one prompt; with max_tokens 0 only the prompt runs; with echo and logprobs it is scored."""
    ids = prompt if isinstance(prompt, list) else None
    if ids is not None:
        vocab = served.qwen.config.vocab_size
        if not all(0 <= i < vocab for i in ids):
            raise bad_input("/prompt", f"token ids must be integers from 0 to {vocab - 1}, the model's vocabulary")
    text = served.qwen.tokenizer.decode(ids) if ids is not None and served.qwen.tokenizer else prompt
    body = {**c.body, "prompt": text or " ", "max_tokens": max(c.max_tokens, 1)}  # the schema's minimums
    scored = c.logprobs if c.echo and c.logprobs is not None else None
    return [replace(p, prompt_logprobs=scored) for p in samples(served.qwen, body, c.n, strict=strict,
                                                                prompt_ids=ids, max_tokens=c.max_tokens,
                                                                limits=limits)]


# ----------------------------------------------------------------------------------------------------------
# The answer


Entry = tuple[int, float | None, Sequence[tuple[int, float]] | None]  # token, logprob, top alternatives


def prompt_entries(output: Output) -> list[Entry]:
    """The prompt's tokens as echoed: the first has nothing before it to predict it (null)."""
    first = (output.prepared.prompt_ids[0], None, None)
    return [first, *((i.token, i.raw, i.raw_top) for i in output.prompt_infos)]


def token_entries(infos: Sequence[ForcedLogprobs | TokenLogprobs]) -> list[Entry]:
    return [(i.token, i.raw, i.raw_top) for i in infos]


def legacy_logprobs(output: Output, entries: list[Entry], offset: int = 0) -> dict[str, Any]:
    """OpenAI's completions logprobs: per token its text, log-probability (the raw distribution's, as the chat
    route reports) and top alternatives as {text: logprob}. text_offset: where each token's text starts, counted
    from `offset` (each token's text decoded alone, so a character split across tokens shows as U+FFFD)."""
    tok = output.tokenizer
    tokens, offsets = [], []
    for token, _, _ in entries:
        text = tok.decode([token])
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if top is None else {tok.decode([t]): lp for t, lp in top} for _, _, top in entries],
            "text_offset": offsets}


def _echoed(prompt: PromptInput, output: Output) -> str:
    """The prompt as echoed: as sent, or token ids decoded."""
    return prompt if isinstance(prompt, str) else output.tokenizer.decode(prompt)


def completion_choice(c: Completion, prompt: PromptInput, index: int, output: Output) -> dict[str, Any]:
    """The text as generated (a completion has no tool calls or JSON mode: nothing is parsed out of it)."""
    if output.error is not None:
        raise output.error
    text = (_echoed(prompt, output) if c.echo else "") + output.text
    entries = (prompt_entries(output) if c.echo else []) + token_entries(output.infos)
    logprobs = None if c.logprobs is None else legacy_logprobs(output, entries)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": output.reason or "stop"}


def completion_body_usage(outputs: list[list[Output]]) -> dict[str, int]:
    """Each prompt counts once (its n samples share it); every completion counts."""
    usages = [total_usage([o.usage() for o in group]) for group in outputs]
    prompt, completion = sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(c: Completion, tickets: list[Ticket]) -> dict[str, Any]:
    choices = [completion_choice(c, c.prompts[p], p * c.n + j, output)
               for p, ticket in enumerate(tickets) for j, output in enumerate(ticket.responses)]
    return {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model, "choices": choices,
            "usage": completion_body_usage([t.responses for t in tickets])}


def _chunk(c: Completion, index: int, text: str, logprobs: dict[str, Any] | None = None,
           finish: str | None = None) -> bytes:
    obj: dict[str, Any] = {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
                           "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if c.include_usage:
        obj["usage"] = None
    return sse(obj)


async def completion_events(c: Completion, tickets: list[Ticket]) -> AsyncIterator[bytes]:
    """Streamed choices, prompt by prompt (all of them run at once; later ones wait in their queues). With echo,
    a choice's first chunk is its prompt (with its logprobs once the prompt is scored)."""
    try:
        for p, ticket in enumerate(tickets):
            shown = [0] * len(ticket.responses)  # characters of each choice's text sent so far
            if c.echo and c.logprobs is None:
                for j, output in enumerate(ticket.responses):
                    yield _chunk(c, p * c.n + j, _echoed(c.prompts[p], output))
                    shown[j] = len(_echoed(c.prompts[p], output))
            async for j, event in ticket.events():
                output, index = ticket.responses[j], p * c.n + j
                text = output.push(event)
                if isinstance(event, Failed):
                    raise event.error
                if isinstance(event, Prompt) and c.echo:
                    echoed = _echoed(c.prompts[p], output)
                    yield _chunk(c, index, echoed, legacy_logprobs(output, prompt_entries(output)))
                    shown[j] = len(echoed)
                if text:
                    logprobs = (None if c.logprobs is None
                                else legacy_logprobs(output, token_entries(output.take_pending()), shown[j]))
                    yield _chunk(c, index, text, logprobs)
                    shown[j] += len(text)
                if output.done:
                    yield _chunk(c, index, "", None, output.reason or "stop")
        if c.include_usage:
            usage = completion_body_usage([t.responses for t in tickets])
            yield sse({"id": c.id, "object": "text_completion", "created": c.created, "model": c.model,
                       "choices": [], "usage": usage})
    except QwenRefError as e:
        yield sse(openai_error_body(e))
    finally:
        for ticket in tickets:
            ticket.cancel()
    yield DONE


async def completions(request: Request, served: dict[str, Served], settings: Settings) -> Response:
    tickets: list[Ticket] = []
    try:
        check_auth(request, settings.api_token)
        c = completion_request(await read_json(request, settings))
        model = lookup(served, c.model)
        for prompt in c.prompts:
            make = lambda p=prompt: _prepare(model, c, p, settings.strict, settings.limits)  # noqa: E731
            tickets.append(await start_prepared(model, make, settings, c.stop))
    except BaseException as e:
        for ticket in tickets:  # the prompts already queued stop: the request fails as a whole
            ticket.cancel()
        if isinstance(e, QwenRefError):
            return error_response(request.url.path, e)
        raise
    if c.stream:
        return event_stream(completion_events(c, tickets))
    try:
        for ticket in tickets:
            await unless_disconnected(request, ticket, collect(ticket))
        return JSONResponse(completion_body(c, tickets))
    except QwenRefError as e:
        for ticket in tickets:
            ticket.cancel()
        return error_response(request.url.path, e)
