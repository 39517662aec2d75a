"""A local Workers-AI-compatible HTTP server, with OpenAI-compatible chat completions (docs/server.md).

    qwen-ref serve tiny --name @cf/qwen/qwen1.5-0.5b-chat=tiny:qwen1.5 --api-token secret

Each loaded checkpoint gets one engine thread that owns the model and runs continuous batching: a request is
validated and tokenized by generate()'s own `prepare`, queued first-in first-out, prefilled when a slot is free
and then decoded together with the running batch, one token per request per step. A request finishes at a stop
token, at max_tokens, at its deadline or when its client goes away, and its row leaves the batch at once.
Every request keeps its own sampler state (seed, step, penalties), and the model computes each row on its own,
so a request gets the tokens generate() gives it alone.

The HTTP layer needs the `serve` extra (starlette, uvicorn); `add_serve_arguments` works without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

import qwen_ref.known_models as models
from qwen_ref.engine.decode import SamplingChooser, right_pad
from qwen_ref.errors import QwenRefError
from qwen_ref.models.kv_cache import KVCache
from qwen_ref.qwen import Qwen, load
from qwen_ref.sampling.json_mask import JsonModeNotMet
from qwen_ref.tokenizer.detok import IncrementalDetokenizer, detokenize
from qwen_ref.workers_ai.generate import (
    PADDING,
    ContextWindowExceeded,
    LoraUnavailable,
    Prepared,
    generate,
    prepare,
    shape_output,
)
from qwen_ref.workers_ai.tools import parse_tool_calls
from qwen_ref.workers_ai.validate import InvalidInput

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response

TOKEN_ENV = "QWEN_REF_API_TOKEN"
DEFAULT_PORT = 8080
DEFAULT_MAX_BODY = 8 * 1024 * 1024
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_QUEUE = 1024
DONE = b"data: [DONE]\n\n"
# the content types a JSON body may arrive with: curl -d sends form-urlencoded, and the service reads it as JSON
JSON_LIKE_TYPES = ("", "application/json", "text/plain", "application/x-www-form-urlencoded")
# OpenAI request keys that change nothing here, and keys whose non-default values the engine cannot honour
CHAT_IGNORED = ("user", "metadata", "store", "parallel_tool_calls", "service_tier", "options")
CHAT_SAMPLING = ("temperature", "top_p", "top_k", "seed", "frequency_penalty", "presence_penalty",
                 "repetition_penalty")
CHAT_UNSUPPORTED = {"n": (None, 1), "stop": (None, [], ""), "logprobs": (None, False), "top_logprobs": (None, 0),
                    "logit_bias": (None, {}), "functions": (None,), "function_call": (None,),
                    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}
CHAT_KEYS = frozenset(("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "tools",
                       "tool_choice", "response_format", *CHAT_SAMPLING, *CHAT_IGNORED, *CHAT_UNSUPPORTED))


class ApiError(Exception):
    """An HTTP error answer: status, the service's error code, and its message."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_input(path: str, detail: str) -> ApiError:
    return ApiError(400, InvalidInput.code, f"AiError: Bad input: {path}: {detail}")


def timed_out() -> ApiError:
    return ApiError(408, 3007, "Timeout: the request ran past the server's per-request timeout")


# ----------------------------------------------------------------------------------------------------------
# The engine: one thread per model, continuous batching


Event = tuple[str, Any]  # ("token", id) | ("end", "stop" | "length" | "timeout") | ("result", dict) | ("error", e)


@dataclass(eq=False)
class Job:
    qwen: Qwen
    body: dict[str, Any]
    prepared: Prepared
    deliver: Callable[[Event], None]
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0

    @property
    def alone(self) -> bool:
        # a LoRA request changes the weights every row reads, so it runs by itself through generate()
        return self.prepared.inputs.get("lora") is not None


def _active_adapter(model: torch.nn.Module) -> Any:
    try:
        from qwen_ref.lora.core import active_adapter
    except ImportError:  # a qwen_ref without LoRA support
        return None
    return active_adapter(model)


def _new_cache(model: torch.nn.Module, rows: int, capacity: int) -> KVCache:
    weight = model.lm_head.weight
    return KVCache(model.config, rows, capacity, dtype=weight.dtype, device=weight.device)


@dataclass
class Lane:
    """Requests that share one forward pass: their KV cache rows and the logits of each one's next token."""

    jobs: list[Job]
    cache: KVCache
    logits: torch.Tensor  # [len(jobs), vocab]

    @classmethod
    def prefill(cls, model: torch.nn.Module, jobs: list[Job]) -> Lane:
        """The prompts prefilled together, right-padded, exactly as engine.decode() prefills a batch."""
        device = model.lm_head.weight.device
        ids, lengths = right_pad([job.prepared.prompt_ids for job in jobs])
        ids, lengths = ids.to(device), lengths.to(device)
        cache = _new_cache(model, len(jobs), int(ids.shape[1]) + max(job.prepared.max_tokens for job in jobs))
        return cls(jobs, cache, model(ids, cache=cache, num_new=lengths, last_only=True)[:, 0])

    def merge(self, other: Lane) -> Lane:
        return Lane(self.jobs + other.jobs, KVCache.stack([self.cache, other.cache]),
                    torch.cat([self.logits, other.logits]))

    def keep(self, rows: list[int]) -> Lane | None:
        if len(rows) == len(self.jobs):
            return self
        if not rows:
            return None  # its cache is freed with it
        index = torch.tensor(rows, dtype=torch.long, device=self.logits.device)
        return Lane([self.jobs[i] for i in rows], KVCache.stack([self.cache], [index]), self.logits[index])

    def advance(self, model: torch.nn.Module, tokens: list[int]) -> None:
        """Feed each row its new token; the logits become those of the token after it."""
        device = self.logits.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        ones = torch.ones(len(tokens), dtype=torch.long, device=device)
        self.logits = model(ids, cache=self.cache, num_new=ones)[:, 0]


class Engine:
    """Owns one model and runs every request for it: a new request joins the running batch at the next step.

    Every step samples one token for every running request in one sampler call. With exact=True (the default)
    the model runs each request in a lane of its own, so its numbers are bit for bit those of generate() alone;
    with exact=False all requests share one forward, which is faster, but a batched matmul rounds differently
    from a single row's, and a draw that lands within that rounding of a token boundary picks its neighbour.
    """

    def __init__(self, qwen: Qwen, *, max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
                 exact: bool = True):
        self.model = qwen.model
        self.stop_ids = frozenset(qwen.eos_token_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.exact = exact
        self._loaded_adapter = _active_adapter(self.model)  # a LoRA merged at load time stays for every request
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counters = {"active": 0, "steps": 0, "tokens": 0, "requests": 0}

    def start(self) -> None:
        if self._thread is None:
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="qwen-ref-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ApiError(503, 503, "the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, 3040, "Capacity temporarily exceeded, please try again")
            self._pending.append(job)
            self.counters["requests"] += 1
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        return {**self.counters, "queued": len(self._pending)}

    def _take(self, running: int) -> tuple[list[Job], Job | None] | None:
        """New jobs for the batch in arrival order (or one job that must run alone); None once closed."""
        with self._cond:
            while not self._closed and not self._pending and running == 0:
                self._cond.wait()
            if self._closed:
                return None
            joiners: list[Job] = []
            now = time.monotonic()
            while self._pending and running + len(joiners) < self.max_batch:
                job = self._pending[0]
                if job.alone and (running or joiners):
                    break  # it waits for the batch to drain; nothing overtakes it
                self._pending.popleft()
                if job.cancelled.is_set():
                    continue
                if now > job.deadline:
                    job.deliver(("end", "timeout"))
                elif job.alone:
                    return [], job
                else:
                    joiners.append(job)
            return joiners, None

    def _run(self) -> None:
        lanes: list[Lane] = []
        while (taken := self._take(sum(len(lane.jobs) for lane in lanes))) is not None:
            joiners, solo = taken
            try:
                if solo is not None:
                    self._run_alone(solo)
                    continue
                if joiners:
                    lanes = self._admit(lanes, joiners)
                lanes = self._step(lanes)
            except Exception as e:  # the engine outlives any one failure; its requests get a 500
                error = ApiError(500, 500, f"internal error in the engine: {type(e).__name__}: {e}")
                for job in dict.fromkeys([*(j for lane in lanes for j in lane.jobs), *joiners]):
                    job.deliver(("error", error))
                lanes = []
            self.counters["active"] = sum(len(lane.jobs) for lane in lanes)
        with self._cond:
            for job in self._pending:
                job.deliver(("error", ApiError(503, 503, "the server is shutting down")))
            self._pending.clear()

    def _run_alone(self, job: Job) -> None:
        body = {**job.body, "stream": False}
        try:
            job.deliver(("result", generate(job.qwen, body)))
        except QwenRefError as e:
            job.deliver(("error", error_from(e)))
        except Exception as e:  # as in _run: a 500 for this request, the engine goes on
            job.deliver(("error", ApiError(500, 500, f"internal error in the engine: {type(e).__name__}: {e}")))
        finally:
            self._restore_weights()

    def _restore_weights(self) -> None:
        """Batched requests bypass generate(), so the adapter a LoRA request merged must not outlive it."""
        if _active_adapter(self.model) is self._loaded_adapter:
            return
        import qwen_ref.lora.core as lora

        lora.unmerge(self.model)
        if self._loaded_adapter is not None:
            lora.merge(self.model, self._loaded_adapter)

    @torch.inference_mode()
    def _admit(self, lanes: list[Lane], jobs: list[Job]) -> list[Lane]:
        if self.exact and not self.model.backends.batch_invariant:
            return lanes + [Lane.prefill(self.model, [job]) for job in jobs]
        # exact on a batch-invariant model: each prompt prefilled alone, then all rows decode in one lane
        joined = [Lane.prefill(self.model, [job]) for job in jobs] if self.exact else [Lane.prefill(self.model, jobs)]
        for lane in joined:
            lanes = [lanes[0].merge(lane)] if lanes else [lane]
        return lanes

    @torch.inference_mode()
    def _step(self, lanes: list[Lane]) -> list[Lane]:
        """One token for every running request; finished and abandoned rows leave before the next forward."""
        lanes = self._keep(lanes, lambda job: not job.cancelled.is_set())
        if not lanes:
            return lanes
        jobs = [job for lane in lanes for job in lane.jobs]
        logits = torch.cat([lane.logits for lane in lanes])
        chooser = SamplingChooser([job.prepared.state for job in jobs], [job.prepared.constraint for job in jobs])
        tokens = chooser(logits, torch.ones(len(jobs), dtype=torch.bool, device=logits.device), 0).tolist()
        now = time.monotonic()
        chosen = {id(job): token for job, token in zip(jobs, tokens)}
        going = {id(job) for job in jobs if self._emit(job, chosen[id(job)], now)}
        self.counters["steps"] += 1
        self.counters["tokens"] += len(tokens)
        lanes = self._keep(lanes, lambda job: id(job) in going)
        for lane in lanes:
            lane.advance(self.model, [chosen[id(job)] for job in lane.jobs])
        return lanes

    def _keep(self, lanes: list[Lane], wanted: Callable[[Job], bool]) -> list[Lane]:
        kept = (lane.keep([i for i, job in enumerate(lane.jobs) if wanted(job)]) for lane in lanes)
        return [lane for lane in kept if lane is not None]

    def _emit(self, job: Job, token: int, now: float) -> bool:
        """Hand the token over; True while the job goes on."""
        job.produced += 1
        job.deliver(("token", token))
        if token in self.stop_ids:
            job.deliver(("end", "stop"))
        elif job.produced >= job.prepared.max_tokens:
            job.deliver(("end", "length"))
        elif now > job.deadline:
            job.deliver(("end", "timeout"))
        else:
            return not job.cancelled.is_set()
        return False


class Ticket:
    """The event-loop side of one job: its events in order, and cancel() for a client that went away."""

    def __init__(self, job: Job, events: asyncio.Queue[Event]):
        self.job = job
        self.events = events
        self.finish = "stop"
        self.result: dict[str, Any] | None = None

    def cancel(self) -> None:
        self.job.cancelled.set()

    async def tokens(self) -> AsyncIterator[int]:
        """The job's tokens; then `finish` (stop or length) or `result` (a job run alone) is set."""
        while True:
            left = self.job.deadline - time.monotonic() + 5.0  # the engine enforces the deadline; this is a net
            try:
                kind, value = await asyncio.wait_for(self.events.get(), max(left, 0.05))
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                self.cancel()
                raise timed_out() from None
            if kind == "token":
                yield value
            elif kind == "result":
                self.result = value
                return
            elif kind == "error":
                raise value
            elif value == "timeout":
                raise timed_out()
            else:
                self.finish = value
                return


def submit(served: Served, body: dict[str, Any], prepared: Prepared, timeout_s: float) -> Ticket:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutdown)
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(served.qwen, body, prepared, deliver, time.monotonic() + timeout_s)
    served.engine.submit(job)
    return Ticket(job, events)


# ----------------------------------------------------------------------------------------------------------
# Models: what is served under which name


@dataclass
class Served:
    name: str
    qwen: Qwen
    engine: Engine


def parse_alias(text: str) -> tuple[str, str]:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise QwenRefError(f"--name: {text!r}: expected NAME=SOURCE, e.g. @cf/qwen/qwen1.5-0.5b-chat=tiny:qwen1.5")
    return name, source


def as_named(qwen: Qwen, name: str) -> Qwen:
    """The model as served under name: a Workers AI id brings that model's context window and LoRA support."""
    known = models.lookup(name)
    return qwen if known is None or qwen.known == known else replace(qwen, known=known)


def load_models(
    sources: Sequence[str] = (),
    aliases: Sequence[str] = (),
    load_options: Mapping[str, Any] | None = None,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    exact: bool = True,
) -> dict[str, Served]:
    """Load each source once; serve it under its Workers AI id (when loaded by one) or its source text, and
    under every NAME of a NAME=SOURCE alias. Names of one checkpoint share its engine."""
    wanted = [(None, s) for s in sources] + [parse_alias(a) for a in aliases]
    if not wanted:
        raise QwenRefError("serve: give at least one SOURCE or --name NAME=SOURCE")
    loaded: dict[str, tuple[Qwen, Engine]] = {}
    served: dict[str, Served] = {}
    for name, source in wanted:
        if source not in loaded:
            qwen = load(source, **(load_options or {}))
            loaded[source] = (qwen, Engine(qwen, max_batch=max_batch, max_queue=max_queue, exact=exact))
        qwen, engine = loaded[source]
        name = name or (qwen.known.workers_ai_id if qwen.known is not None else source)
        if name in served:
            raise QwenRefError(f"serve: the model name {name!r} is given twice")
        served[name] = Served(name, as_named(qwen, name), engine)
    return served


# ----------------------------------------------------------------------------------------------------------
# Requests: auth, body, JSON


@dataclass(frozen=True)
class Settings:
    api_token: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY
    timeout_s: float = DEFAULT_TIMEOUT_S


def check_auth(request: Request, token: str | None) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, 10000, "Authentication error")


def too_large(limit: int) -> ApiError:
    return ApiError(413, 3006, f"Request too large: the body is over the server's limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in JSON_LIKE_TYPES and not kind.endswith("+json"):
        raise ApiError(415, 415, f"Bad input: the body must be JSON, not {kind!r} (send application/json)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} does not fit a double")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise bad_input("/", f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise bad_input("/", "the body nests arrays or objects too deeply") from None
    except ValueError as e:  # JSONDecodeError, a non-finite number, an integer of too many digits
        raise bad_input("/", f"the body is not valid JSON ({e})") from None


async def read_json(request: Request, settings: Settings) -> Any:
    check_content_type(request)
    return parse_json(await read_body(request, settings.max_body_bytes))


def error_from(e: QwenRefError) -> ApiError:
    """The HTTP answer to an error of generate(); the service's code where it is known, else the status."""
    if isinstance(e, InvalidInput):
        return ApiError(400, e.code, f"AiError: {e}")
    if isinstance(e, LoraUnavailable):
        return ApiError(405, e.code, f"AiError: {e}")
    if isinstance(e, (ContextWindowExceeded, JsonModeNotMet)):
        return ApiError(400, 400, f"AiError: {e}")
    return ApiError(400, InvalidInput.code, f"AiError: Bad input: {e}")


def prepare_request(qwen: Qwen, body: Any) -> Prepared:
    try:
        prepared = prepare(qwen, body)
    except QwenRefError as e:
        raise error_from(e) from None
    if prepared.inputs.get("logprobs") is not None:  # the engine's batched lanes do not collect them yet
        raise error_from(InvalidInput("/logprobs", "server", "the logprobs extension is available through "
                                      "qwen_ref.generate() and the CLI, not through the server yet"))
    return prepared


def lookup(served: Mapping[str, Served], name: Any) -> Served:
    if not isinstance(name, str) or name not in served:
        raise ApiError(400, 5007, f"No such model {name} or task")
    return served[name]


async def start(served: Served, body: Any, settings: Settings) -> tuple[Prepared, Ticket]:
    from starlette.concurrency import run_in_threadpool

    prepared = await run_in_threadpool(prepare_request, served.qwen, body)
    return prepared, submit(served, body, prepared, settings.timeout_s)


async def unless_disconnected(request: Request, ticket: Ticket, work: Awaitable[Any]) -> Any:
    """Await work; if the client hangs up first, cancel the job (its slot frees at the next step)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, 499, "the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            ticket.cancel()


# ----------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Outcome:
    output: dict[str, Any]  # the Workers AI result object
    text: str  # the generated text as decoded (with any tool-call blocks still in it)
    finish: str  # "stop", "length" or "tool_calls"


def _finish(output: dict[str, Any], fallback: str) -> str:
    return "tool_calls" if output.get("tool_calls") else fallback


def result_outcome(result: dict[str, Any], prepared: Prepared) -> Outcome:
    """The outcome of a job generate() ran alone."""
    response = result["response"]
    text = response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)
    length = result["usage"]["completion_tokens"] >= prepared.max_tokens
    return Outcome(result, text, _finish(result, "length" if length else "stop"))


def outcome_of(qwen: Qwen, prepared: Prepared, ticket: Ticket, tokens: list[int]) -> Outcome:
    if ticket.result is not None:
        return result_outcome(ticket.result, prepared)
    try:
        output = shape_output(qwen, prepared, tokens)
    except JsonModeNotMet as e:
        raise error_from(e) from None
    return Outcome(output, detokenize(qwen.tokenizer, tokens), _finish(output, ticket.finish))


async def collect(qwen: Qwen, prepared: Prepared, ticket: Ticket) -> Outcome:
    tokens = [token async for token in ticket.tokens()]
    return outcome_of(qwen, prepared, ticket, tokens)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def padding() -> str:
    return (PADDING * 2)[: 1 + secrets.randbelow(len(PADDING) + 12)]


def usage(prepared: Prepared, completion: int) -> dict[str, int]:
    prompt = len(prepared.prompt_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def native_events(qwen: Qwen, prepared: Prepared, ticket: Ticket) -> AsyncIterator[bytes]:
    """generate()'s stream: a padded event per text chunk, a final event with usage, then [DONE]."""
    detok = IncrementalDetokenizer(qwen.tokenizer)
    tokens: list[int] = []
    try:
        async for token in ticket.tokens():
            tokens.append(token)
            chunk = detok.push(token)
            if chunk:
                yield sse({"response": chunk, "p": padding()})
        if ticket.result is not None:  # a job generate() ran alone: its whole text in one event
            yield sse({"response": result_outcome(ticket.result, prepared).text, "p": padding()})
            final = {**ticket.result, "response": ""}
        else:
            tail = detok.flush()
            if tail:
                yield sse({"response": tail, "p": padding()})
            final = {"response": "", "usage": usage(prepared, len(tokens)), **stream_extras(qwen, prepared, tokens)}
        yield sse(final)
    except ApiError as e:
        yield sse({"response": "", "usage": usage(prepared, len(tokens)), "error": e.message})
    finally:
        ticket.cancel()
    yield DONE


def stream_extras(qwen: Qwen, prepared: Prepared, tokens: list[int]) -> dict[str, Any]:
    """What generate()'s final stream event adds: a JSON-mode failure, or the parsed tool calls."""
    if prepared.constraint is not None:
        return {} if prepared.constraint.is_complete() else {"error": "JSON Mode couldn't be met"}
    _, calls = parse_tool_calls(detokenize(qwen.tokenizer, tokens), prepared.tool_names or None)
    return {"tool_calls": calls} if calls else {}


# ----------------------------------------------------------------------------------------------------------
# OpenAI chat completions


@dataclass
class Chat:
    model: str
    body: dict[str, Any]  # the Workers AI request it maps to
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def _text_content(content: Any, path: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_input(path, "expected a string or a list of {type: 'text', text} parts")


def _call_block(call: Any, path: str) -> str:
    """An assistant's earlier tool call as the text Qwen's template renders for it."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_input(path, "expected {id, type: 'function', function: {name, arguments}}")
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'<tool_call>\n{{"name": "{function["name"]}", "arguments": {arguments}}}\n</tool_call>'


def chat_message(message: Any, path: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad_input(path, "expected a message object {role, content}")
    role = "system" if message.get("role") == "developer" else message.get("role")
    content = _text_content(message.get("content"), f"{path}/content")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise bad_input(f"{path}/tool_calls", "expected an array")
    blocks = [_call_block(c, f"{path}/tool_calls/{i}") for i, c in enumerate(calls)]
    return {"role": role, "content": "\n".join(([content] if content else []) + blocks)}


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
    choice = chat.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad_input("/tool_choice", f"{choice!r} is not supported; use 'auto' or 'none'")
    tools = chat.get("tools")
    if not tools or choice == "none":
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
    max_tokens = chat.get("max_completion_tokens", chat.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update((k, chat[k]) for k in CHAT_SAMPLING if chat.get(k) is not None)
    tools = _tools(chat)
    if tools:
        body["tools"] = tools
    response_format = chat.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        body["response_format"] = response_format
    stream = chat.get("stream") or False
    options = chat.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise bad_input("/stream", "stream must be a boolean and stream_options an object")
    return Chat(chat["model"], body, stream, bool(options.get("include_usage")))


def openai_tool_calls(calls: Iterable[dict[str, Any]], with_index: bool = False) -> list[dict[str, Any]]:
    out = []
    for i, call in enumerate(calls):
        item = {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        out.append({"index": i, **item} if with_index else item)
    return out


def chat_content(prepared: Prepared, outcome: Outcome) -> str:
    response = outcome.output["response"]
    if prepared.constraint is not None or not isinstance(response, str):
        return outcome.text  # JSON mode: the JSON text as generated
    return response


def chat_completion(chat: Chat, prepared: Prepared, outcome: Outcome) -> dict[str, Any]:
    content = chat_content(prepared, outcome)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    calls = outcome.output.get("tool_calls") or []
    if calls:
        message["content"] = content or None
        message["tool_calls"] = openai_tool_calls(calls)
    return {"id": chat.id, "object": "chat.completion", "created": chat.created, "model": chat.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": outcome.finish}],
            "usage": outcome.output["usage"]}


def chunk(chat: Chat, delta: dict[str, Any], finish: str | None = None) -> bytes:
    obj: dict[str, Any] = {"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                           "model": chat.model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": finish}]}
    if chat.include_usage:
        obj["usage"] = None
    return sse(obj)


async def chat_events(qwen: Qwen, chat: Chat, prepared: Prepared, ticket: Ticket) -> AsyncIterator[bytes]:
    """chat.completion.chunk events. With tools offered, the text is held back to the end, where it splits
    into content and tool calls; otherwise text goes out as it is decoded."""
    hold = bool(prepared.tool_names) or prepared.constraint is not None
    detok = IncrementalDetokenizer(qwen.tokenizer)
    tokens: list[int] = []
    yield chunk(chat, {"role": "assistant", "content": ""})
    try:
        async for token in ticket.tokens():
            tokens.append(token)
            text = detok.push(token)
            if text and not hold:
                yield chunk(chat, {"content": text})
        tail = detok.flush()
        if tail and not hold:
            yield chunk(chat, {"content": tail})
        outcome = outcome_of(qwen, prepared, ticket, tokens)
        if hold or ticket.result is not None:
            content = chat_content(prepared, outcome)
            if content:
                yield chunk(chat, {"content": content})
            if outcome.output.get("tool_calls"):
                yield chunk(chat, {"tool_calls": openai_tool_calls(outcome.output["tool_calls"], with_index=True)})
        yield chunk(chat, {}, outcome.finish)
        if chat.include_usage:
            yield sse({"id": chat.id, "object": "chat.completion.chunk", "created": chat.created,
                       "model": chat.model, "choices": [], "usage": outcome.output["usage"]})
    except ApiError as e:
        yield sse(openai_error_body(e))
    finally:
        ticket.cancel()
    yield DONE


def openai_error_body(e: ApiError) -> dict[str, Any]:
    kinds = {401: "authentication_error", 404: "not_found_error", 408: "timeout", 429: "rate_limit_error"}
    kind = kinds.get(e.status, "server_error" if e.status >= 500 else "invalid_request_error")
    return {"error": {"message": e.message, "type": kind, "param": None, "code": e.code}}


# ----------------------------------------------------------------------------------------------------------
# The app


def envelope(result: Any) -> dict[str, Any]:
    return {"result": result, "success": True, "errors": [], "messages": []}


def error_envelope(e: ApiError) -> dict[str, Any]:
    return {"result": None, "success": False, "errors": [{"code": e.code, "message": e.message}], "messages": []}


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or "/ai/v1/" in path


def error_response(path: str, e: ApiError) -> Response:
    from starlette.responses import JSONResponse

    body = openai_error_body(e) if is_openai_path(path) else error_envelope(e)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(body, status_code=e.status, headers=headers)


def event_stream(events: AsyncIterator[bytes]) -> Response:
    from starlette.responses import StreamingResponse

    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(served: Mapping[str, Served], settings: Settings | None = None) -> Starlette:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    settings = settings or Settings()
    engines = list({id(s.engine): s.engine for s in served.values()}.values())

    async def run_model(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
            model = lookup(served, request.path_params["model"])
            body = await read_json(request, settings)
            prepared, ticket = await start(model, body, settings)
        except ApiError as e:
            return error_response(request.url.path, e)
        if prepared.inputs.get("stream"):
            return event_stream(native_events(model.qwen, prepared, ticket))
        try:
            outcome = await unless_disconnected(request, ticket, collect(model.qwen, prepared, ticket))
        except ApiError as e:
            return error_response(request.url.path, e)
        return JSONResponse(envelope(outcome.output))

    async def chat_completions(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
            chat = chat_request(await read_json(request, settings))
            model = lookup(served, chat.model)
            prepared, ticket = await start(model, chat.body, settings)
        except ApiError as e:
            return error_response(request.url.path, e)
        if chat.stream:
            return event_stream(chat_events(model.qwen, chat, prepared, ticket))
        try:
            outcome = await unless_disconnected(request, ticket, collect(model.qwen, prepared, ticket))
        except ApiError as e:
            return error_response(request.url.path, e)
        return JSONResponse(chat_completion(chat, prepared, outcome))

    async def list_models(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
        except ApiError as e:
            return error_response(request.url.path, e)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "qwen-ref"} for name in served]
        return JSONResponse({"object": "list", "data": data})

    async def stats(request: Request) -> Response:
        try:
            check_auth(request, settings.api_token)
        except ApiError as e:
            return error_response(request.url.path, e)
        return JSONResponse({"models": {name: s.engine.stats() for name, s in served.items()}})

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: "No route for that URI", 405: "Method not allowed"}.get(status, "Internal server error")
        return error_response(request.url.path, ApiError(status, status, message))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for engine in engines:
            engine.start()
        yield
        for engine in engines:
            engine.close()

    run = "/ai/run/{model:path}"
    chat = "/ai/v1/chat/completions"
    routes = [
        Route("/client/v4/accounts/{account_id}" + run, run_model, methods=["POST"]),
        Route(run, run_model, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}" + chat, chat_completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/client/v4/accounts/{account_id}/ai/v1/models", list_models, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/qwen-ref/stats", stats, methods=["GET"]),
    ]
    handlers = {404: http_error, 405: http_error, Exception: http_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# Command line
